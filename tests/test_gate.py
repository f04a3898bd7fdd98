"""The CI gate: baselines that ratchet, config from pyproject.toml, determinism, and the pytest helper."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradscope.cli import main

ROOT = Path(__file__).resolve().parent.parent

# One model; LR and SPIKE_AT choose a healthy run or a deliberately worsened one.
MODEL = """
import itertools, os
import torch
from torch import nn
import gradscope

def experiment(lr=1e-3, spike_at=None, scale=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    steps = itertools.count()
    def batch():
        x = torch.randn(16, 8, generator=g)
        y = x @ w
        return x, (y * 300 if next(steps) == spike_at else y) * scale
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=lr), batch,
                                loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))

def worse():
    return experiment(spike_at=20)

def louder():
    return experiment(scale=30.0)
"""


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return "model.py"


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_baseline_ratchet_fails_the_worsened_model_and_passes_the_unchanged_one(model_file, capsys):
    code, _, err = run(["diagnose", model_file, "--write-baseline", "base.json"], capsys)
    assert code == 0 and "wrote baseline base.json" in err
    assert json.loads(Path("base.json").read_text())["kind"] == "gradscope-baseline"
    code, out, _ = run(["diagnose", model_file, "--baseline", "base.json", "--fail-on", "warning"], capsys)
    assert code == 0, out
    assert "0 new or worse" in out
    code, out, _ = run(["diagnose", f"{model_file}:worse", "--baseline", "base.json", "--fail-on", "warning",
                        "--format", "json"], capsys)
    gate = json.loads(out)["gate"]
    assert code == 1
    assert {"rule_id": "gradient-spike", "layer": None, "severity": "warning"} in gate["baseline"]["new"]


def test_known_findings_do_not_fail_and_fixed_ones_are_reported(model_file, capsys):
    assert run(["diagnose", f"{model_file}:worse", "--write-baseline", "base.json"], capsys)[0] == 0
    code, out, _ = run(["diagnose", f"{model_file}:worse", "--baseline", "base.json", "--fail-on", "warning"],
                       capsys)
    # the spike, a layer, the Adam guard's info, beta2 under the spike, and the spike's batch as its cause
    assert code == 0 and "0 new or worse, 5 known" in out
    code, out, _ = run(["diagnose", model_file, "--baseline", "base.json", "--format", "json"], capsys)
    assert code == 0
    assert {"rule_id": "gradient-spike", "layer": None} in json.loads(out)["gate"]["baseline"]["fixed"]


def test_the_text_report_in_a_file_keeps_the_baseline_verdict(model_file, capsys):
    assert run(["diagnose", f"{model_file}:worse", "--write-baseline", "base.json"], capsys)[0] == 0
    code, out, _ = run(["diagnose", f"{model_file}:worse", "--baseline", "base.json", "--output", "report.txt"],
                       capsys)
    text = Path("report.txt").read_text(encoding="utf-8")
    assert code == 0 and "baseline base.json: 0 new or worse, 5 known" in text


def test_norm_regression_past_tolerance_fails(model_file, capsys):
    assert run(["diagnose", model_file, "--write-baseline", "base.json"], capsys)[0] == 0
    code, out, _ = run(["diagnose", f"{model_file}:louder", "--baseline", "base.json", "--format", "json"], capsys)
    regressions = json.loads(out)["gate"]["baseline"]["regressions"]
    assert code == 1 and {r["metric"] for r in regressions} >= {"global_norm_p95"}
    assert run(["diagnose", f"{model_file}:louder", "--baseline", "base.json", "--baseline-tolerance", "100"],
               capsys)[0] == 0


def test_stale_baseline_entries_are_reported(model_file, capsys):
    """A baseline of this model from before a layer was removed: the gone layer's entry is stale."""
    assert run(["diagnose", model_file, "--write-baseline", "base.json"], capsys)[0] == 0
    doc = json.loads(Path("base.json").read_text())
    doc["findings"].append({"rule_id": "dead-layer", "layer": "encoder.gone", "severity": "warning"})
    doc["layers"].append("encoder.gone")
    Path("base.json").write_text(json.dumps(doc))
    code, out, _ = run(["diagnose", model_file, "--baseline", "base.json", "--format", "json"], capsys)
    assert code == 0
    assert json.loads(out)["gate"]["baseline"]["stale"] == [{"rule_id": "dead-layer", "layer": "encoder.gone"}]


@pytest.mark.parametrize("content, fragment", [(None, "baseline file not found"), ("{", "not a JSON baseline"),
                                               ('{"kind": "other"}', "not a gradscope baseline")])
def test_bad_baseline_files_are_clear_errors(model_file, capsys, content, fragment):
    if content is not None:
        Path("base.json").write_text(content)
    code, _, err = run(["diagnose", model_file, "--baseline", "base.json"], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_pyproject_table_sets_defaults_and_flags_win(model_file, capsys):
    Path("pyproject.toml").write_text(textwrap.dedent("""
        [tool.gradscope]
        steps = 4
        fail-on = "warning"
        rules = "extra.yaml"
    """))
    Path("extra.yaml").write_text("rules:\n  - id: always\n    severity: warning\n    scope: model\n"
                                  "    when: {metric: steps, op: '>', value: 0}\n    message: always\n")
    code, out, _ = run(["diagnose", model_file, "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["steps"] == 4 and doc["rules"][-1].endswith("extra.yaml")
    code, out, _ = run(["diagnose", model_file, "--format", "json", "--steps", "2", "--fail-on", "error"], capsys)
    assert code == 0 and json.loads(out)["steps"] == 2


def test_unknown_pyproject_key_is_a_clear_error(model_file, capsys):
    Path("pyproject.toml").write_text("[tool.gradscope]\nstep = 4\n")
    code, _, err = run(["diagnose", model_file], capsys)
    assert code == 2 and "unknown key(s) in [tool.gradscope]: step" in err


def test_same_target_and_seed_give_byte_identical_json_across_processes(model_file):
    def once():
        return subprocess.run([sys.executable, "-m", "gradscope", "diagnose", f"{model_file}:worse", "--seed", "7",
                               "--format", "json"], capture_output=True, text=True, check=False).stdout
    first, second = once(), once()
    assert first and first == second


PYTEST_FILE = """
import gradscope.testing

def test_healthy_model():
    gradscope.testing.assert_gradients_healthy("{model}", steps=6)

def test_exploding_model():
    gradscope.testing.assert_gradients_healthy("{sample}", steps=12)

def test_fixture(gradscope_report):
    report = gradscope_report("{model}", steps=5)
    assert report.healthy
    assert False, "show the attached report"
"""


def test_pytest_helper_and_fixture(pytester):
    model = pytester.path / "model.py"
    model.write_text(MODEL)
    pytester.makepyfile(PYTEST_FILE.format(model=model, sample=ROOT / "samples" / "exploding_rnn.py"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*AssertionError: gradscope: exploding_rnn*findings at or above error*",
                                 "*error*global-norm-growing*(model)*", "*advice: clip by norm at*"])
    result.stdout.fnmatch_lines(["*Captured gradscope Sequential*", "*HEALTHY*"])


@pytest.mark.parametrize("name", ["explosion", "healthy", "spike"])
def test_a_json_report_serves_as_the_baseline_it_would_record(name, tmp_path):
    """``--baseline report.json``: a JSON report of a known-good run is read by the one reader
    (Report.from_json) into the same baseline write_baseline records from the Report."""
    from stored import load
    from gradscope.baseline import load_baseline, write_baseline
    report = load(name)
    write_baseline(report, tmp_path / "baseline.json")
    (tmp_path / "report.json").write_text(report.to_json())
    recorded, read = load_baseline(tmp_path / "baseline.json"), load_baseline(tmp_path / "report.json")
    assert (read.model, read.findings, read.layers) == (recorded.model, recorded.findings, recorded.layers)
    assert read.metrics == pytest.approx(recorded.metrics, rel=1e-5)  # the JSON keeps 6 significant digits
    assert read.source.endswith("report.json")
