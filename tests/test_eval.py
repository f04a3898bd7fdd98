"""One evaluation scenario end to end, as benchmarks/eval/run.py runs it (the full suite is not in CI)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_S

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "eval" / "run.py"


@pytest.mark.slow
def test_quick_scenario_end_to_end():
    result = subprocess.run([sys.executable, str(RUN), "--quick", "--scenarios", "outlier_batches"],
                            capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| scenario | label | flagged | advice | R gradscope")
    row = next(line for line in lines if line.startswith("| outlier_batches "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    regret = {name[2:]: float(cell) for name, cell in zip(columns, cells) if name.startswith("R ")}
    assert {"gradscope", "none", "fixed-1.0", "zclip", "zclip-percentile", "oracle"} <= set(regret)
    assert cells[2] == "1/1"  # flagged
    assert regret["oracle"] <= 0.05 and regret["none"] > 0.5  # unclipped training diverges; a threshold rescues it
    assert 0.0 <= regret["gradscope"] <= 1.0
    assert any(line.startswith("detection ") for line in lines)
    assert any(line.startswith("no harm: worst pair outlier_batches seed 0") for line in lines)


@pytest.mark.slow
def test_the_held_out_set_runs_apart_from_the_main_one():
    """`--set heldout` scores scenarios no choice in the advice was made on; a name from the other set is
    refused rather than silently run."""
    result = subprocess.run([sys.executable, str(RUN), "--set", "heldout", "--quick", "--scenarios",
                             "mlp_momentum_hot"], capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| mlp_momentum_hot | explode "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "1/1" and float(cells[5]) > 0.5  # flagged; unclipped training diverges
    assert "cost where trials ran (1 pairs)" in result.stdout
    refused = subprocess.run([sys.executable, str(RUN), "--set", "heldout", "--scenarios", "outlier_batches"],
                             capture_output=True, text=True, timeout=HANG_S)
    assert refused.returncode == 2 and "not in --set heldout: outlier_batches" in refused.stderr
