"""One evaluation scenario end to end, as benchmarks/eval/run.py runs it (the full suite is not in CI)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "eval" / "run.py"


@pytest.mark.slow
def test_quick_scenario_end_to_end():
    result = subprocess.run([sys.executable, str(RUN), "--quick", "--scenarios", "outlier_batches"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| scenario | label | flagged | advice | R gradscope")
    row = next(line for line in lines if line.startswith("| outlier_batches "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    regret = dict(zip(["gradscope", "none", "fixed-1.0", "autoclip", "zclip", "oracle"], map(float, cells[4:])))
    assert cells[2] == "1/1"  # flagged
    assert regret["oracle"] <= 0.05 and regret["none"] > 0.5  # unclipped training diverges; a threshold rescues it
    assert 0.0 <= regret["gradscope"] <= 1.0
    assert any(line.startswith("detection ") for line in lines)
