"""Bad input through the CLI: one line and a hint, the documented exit code, no traceback, nothing lost.

Each test is one class of bad input: destinations checked before any training step, machine output kept
clean of user prints, numbers and config validated, baselines that do not fit refused, and Ctrl-C at the
moments that used to print a traceback or lose a report.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradscope.baseline import load_baseline
from gradscope.config import load_config
from gradscope.errors import GradscopeError
from gradscope.report import Report

from test_cli import GOOD, assert_clean_error, run, target
from conftest import HANG_S

# A target whose loss announces every call on stderr, so a test can tell whether training started.
LOUD = GOOD.replace("loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])",
                    "loss_fn=lambda m, b: (print('LOSS CALLED', file=__import__('sys').stderr), "
                    "nn.functional.mse_loss(m(b[0]), b[1]))[1]")


@pytest.mark.parametrize("flag, where, fragment", [
    ("--output", "missing/report.json", "the folder"),
    ("--output", ".", "is a folder, not a file"),
    ("--output", "/proc/gradscope-report.json", "cannot be written"),
    ("--write-baseline", "missing/baseline.json", "does not exist"),
])
def test_unwritable_destinations_fail_before_training(tmp_path, capsys, flag, where, fragment):
    dest = where if where.startswith("/") else str(tmp_path / where)
    code, out, err = run(["diagnose", target(tmp_path, LOUD), "--steps", "5", flag, dest], capsys)
    assert code == 2
    assert_clean_error(err, flag, fragment, "hint:")
    assert "LOSS CALLED" not in err  # refused before the first step
    assert not Path(dest).is_file()


def test_unwritable_step_summary_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))  # a folder
    code, out, err = run(["diagnose", target(tmp_path, LOUD), "--steps", "5", "--format", "github"], capsys)
    assert code == 2
    assert_clean_error(err, "$GITHUB_STEP_SUMMARY", "is a folder")
    assert "LOSS CALLED" not in err


def test_outputs_are_replaced_whole_and_leave_no_temporary_files(tmp_path, capsys):
    out_file, baseline = tmp_path / "out" / "report.json", tmp_path / "out" / "baseline.json"
    out_file.parent.mkdir()
    out_file.write_text("old contents")
    code, _, err = run(["diagnose", target(tmp_path, GOOD), "--steps", "5", "--format", "json",
                        "--output", str(out_file), "--write-baseline", str(baseline)], capsys)
    assert code == 0, err
    assert Report.from_json(out_file)["steps"] == 5
    assert load_baseline(baseline).layers
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["baseline.json", "report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert baseline.stat().st_mode & 0o777 == 0o666 & ~umask, "a new file gets the mode open() would give it"
    out_file.chmod(0o640)
    run(["diagnose", target(tmp_path, GOOD), "--steps", "5", "--format", "json", "--output", str(out_file)], capsys)
    assert out_file.stat().st_mode & 0o777 == 0o640, "a replaced file keeps its mode"


CHATTY = """
print("hello from the target module")

def experiment():
    print("building the model")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    def loss(m, b):
        print("a loss")
        import os
        os.write(1, b"native code writing to fd 1\\n")
        return nn.functional.mse_loss(m(b[0]), b[1])
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), 1e-3), data(), loss_fn=loss)
"""


@pytest.mark.parametrize("fmt", ["json", "sarif", "junit"])
def test_user_prints_do_not_corrupt_a_machine_format_on_stdout(tmp_path, fmt):
    proc = subprocess.run([sys.executable, "-m", "gradscope", "diagnose", target(tmp_path, CHATTY), "--steps", "3",
                           "--format", fmt], capture_output=True, text=True, cwd=tmp_path, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    assert "hello" not in proc.stdout and "a loss" not in proc.stdout and "native" not in proc.stdout
    for said in ("hello from the target module", "building the model", "a loss", "native code writing"):
        assert said in proc.stderr
    if fmt == "junit":
        import xml.etree.ElementTree as ET
        ET.fromstring(proc.stdout)
    else:
        json.loads(proc.stdout)


@pytest.mark.parametrize("args, fragment", [
    (["--seed", str(2 ** 64)], "expected a seed from 0 to 2**64 - 1"),
    (["--seed", "-1"], "expected a seed from 0"),
    (["--baseline-tolerance", "-1"], "expected a finite factor of at least 1"),
    (["--baseline-tolerance", "nan"], "expected a finite factor of at least 1"),
    (["--baseline-tolerance", "inf"], "expected a finite factor of at least 1"),
])
def test_out_of_range_numbers_are_usage_errors(tmp_path, capsys, args, fragment):
    with pytest.raises(SystemExit) as info:
        run(["diagnose", target(tmp_path, GOOD), *args], capsys)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("pyproject, fragments", [
    ("tool = 3\n", ["'tool' must be a table", "hint:"]),
    ("[tool]\ngradscope = 'x'\n", ["[tool.gradscope] must be a table"]),
    ("[tool.gradscope]\nsteps = 0\n", ["steps in [tool.gradscope] of", "pyproject.toml must be between 1 and"]),
])
def test_bad_pyproject_names_the_file_not_a_flag(tmp_path, capsys, monkeypatch, pyproject, fragments):
    (tmp_path / "pyproject.toml").write_text(pyproject)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["diagnose", target(tmp_path, GOOD)], capsys)
    assert code == 2
    assert_clean_error(err, *fragments)
    assert "--steps" not in err.splitlines()[0]


def baseline_doc(**changes):
    doc = {"kind": "gradscope-baseline", "schema_version": 1, "model": "target", "findings": [],
           "metrics": {"global_norm_p95": 1.0, "global_norm_max": 2.0}, "layers": ["0", "2"]}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("changes, fragment", [
    ({"metrics": []}, "'metrics' must be a mapping"),
    ({"metrics": {"global_norm_max": "big"}}, "metrics.'global_norm_max' is 'big'"),
    ({"metrics": {"global_norm_max": True}}, "not a finite number"),
    ({"findings": [{"rule_id": "x", "layer": None, "severity": ["error"]}]}, "findings[0] has severity ['error']"),
    ({"findings": [{"rule_id": 3, "layer": None, "severity": "error"}]}, "findings[0] needs a string rule_id"),
    ({"findings": {}}, "'findings' must be a list"),
    ({"layers": [1, 2]}, "'layers' must be a list of layer names"),
    ({"model": None}, "'model' must be the model's name"),
])
def test_malformed_baselines_are_refused_before_training(tmp_path, capsys, changes, fragment):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline_doc(**changes)))
    code, _, err = run(["diagnose", target(tmp_path, LOUD), "--steps", "5", "--baseline", str(path)], capsys)
    assert code == 2
    assert_clean_error(err, "malformed baseline", fragment)
    assert "LOSS CALLED" not in err


def test_a_baseline_of_another_model_is_refused_and_the_report_kept(tmp_path, capsys):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline_doc(model="resnet", layers=[f"layer{i}.conv" for i in range(20)])))
    code, out, err = run(["diagnose", target(tmp_path, GOOD), "--steps", "5", "--baseline", str(path),
                          "--format", "json"], capsys)
    assert code == 2
    assert_clean_error(err, "was recorded from another model (resnet: 20 layers, 0 of them in", "re-record it")
    doc = json.loads(out)
    assert doc["steps"] == 5 and doc["gate"]["exit_code"] == 2 and doc["gate"]["passed"] is False


def test_a_baseline_of_the_same_model_still_gates(tmp_path, capsys):
    path = tmp_path / "baseline.json"
    assert run(["diagnose", target(tmp_path, GOOD), "--steps", "5", "--write-baseline", str(path)], capsys)[0] == 0
    code, _, err = run(["diagnose", target(tmp_path, GOOD), "--steps", "5", "--baseline", str(path)], capsys)
    assert code == 0, err


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                     max_size=3), max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["findings", "metrics", "layers", "model", "schema_version",
                                                "kind"]), JSON_VALUES, max_size=4))
def test_fuzzed_baselines_load_or_give_a_gradscope_error(tmp_path, changes):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(baseline_doc(**changes), allow_nan=True))
    try:
        baseline = load_baseline(path)
    except GradscopeError:
        return
    assert all(math.isfinite(v) for v in baseline.metrics.values())
    assert all(isinstance(layer, str) for layer in baseline.layers)


TOML_VALUES = st.recursive(st.booleans() | st.integers(-10, 10 ** 6) | st.text(max_size=8) |
                           st.floats(allow_nan=False),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                               st.text("abcdefgh-", min_size=1, max_size=6), kids, max_size=3), max_leaves=8)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.dictionaries(st.sampled_from(["steps", "rules", "fail-on", "baseline", "colour"]), TOML_VALUES,
                             max_size=4),
       tool=st.sampled_from(["table", "inline", "not a table"]))
def test_fuzzed_tool_gradscope_tables_load_or_give_a_gradscope_error(tmp_path, table, tool):
    body = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items())
    text = {"table": f"[tool.gradscope]\n{body}\n", "inline": f"tool = {{gradscope = {toml_value(table)}}}\n",
            "not a table": f"tool = {toml_value(list(table.values()))}\n"}[tool]
    (tmp_path / "pyproject.toml").write_text(text)
    try:
        config = load_config(tmp_path)
    except GradscopeError:
        return
    assert set(config) <= {"steps", "rules", "fail-on", "baseline"}


def test_ctrl_c_while_the_cli_imports_is_one_line_and_130(tmp_path):
    """SIGINT while torch is still importing: one line, exit 130, no traceback (the process starts with
    SIGINT at its default, as from a terminal, whatever launched the tests)."""
    proc = subprocess.Popen([sys.executable, "-m", "gradscope", "diagnose", "whatever.py"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.4)  # the interpreter is up; importing torch takes seconds
    if proc.poll() is not None:
        pytest.skip("the CLI finished importing before the signal could be sent")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, err
    assert err.strip() == "gradscope: interrupted" and "Traceback" not in err


def test_a_cli_started_with_sigint_ignored_keeps_ignoring_it_while_it_imports(tmp_path):
    """Under nohup (or in a script's background) SIGINT is not for gradscope: the import goes on, and the
    command ends as it would have (here: the target file does not exist, exit 2)."""
    proc = subprocess.Popen([sys.executable, "-m", "gradscope", "diagnose", "whatever.py"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(0.4)
    if proc.poll() is not None:
        pytest.skip("the CLI finished importing before the signal could be sent")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 2 and "whatever.py" in err and "interrupted" not in err, err


def test_a_second_ctrl_c_while_the_partial_report_is_saved_loses_nothing(tmp_path, capsys, monkeypatch):
    """The first Ctrl-C stops training; a second, pressed while the partial report is built, is ignored."""
    import os

    import gradscope.run.diagnose  # noqa: F401
    diagnose_module = sys.modules["gradscope.run.diagnose"]  # the module (gradscope.run.diagnose is the function)
    real = diagnose_module._partial

    def pressed_again(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, to this (the main) thread
        return real(*args, **kwargs)

    monkeypatch.setattr(diagnose_module, "_partial", pressed_again)
    body = GOOD.replace("data(),", "(lambda make, n: lambda: (_ for _ in ()).throw(KeyboardInterrupt) "
                                   "if next(n) == 4 else make())(data(), itertools.count()),")
    launched = signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, however pytest began
    try:
        code, out, err = run(["diagnose", target(tmp_path, body), "--steps", "10", "--format", "json"], capsys)
        handed_back = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, launched)
    assert code == 130
    doc = json.loads(out)
    assert doc["partial"] is True and doc["steps"] == 4
    assert handed_back is signal.default_int_handler  # handed back afterwards


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recommendation=st.dictionaries(st.sampled_from(["method", "threshold", "evidence", "guard"]),
                                      JSON_VALUES | st.sampled_from(["norm", "none", "value", "agc", "adaptive"]),
                                      max_size=4),
       guard=st.dictionaries(st.sampled_from(["kind", "z", "window", "min_history", "armed"]),
                             JSON_VALUES | st.sampled_from(["skip", 6, 128, 16, 0, -1]), max_size=5))
# what Hypothesis found, kept: both raised TypeError before Clipper checked its numbers
@example(recommendation={"method": "norm", "threshold": "1.0"}, guard={})
@example(recommendation={"method": "norm", "threshold": 1.0, "guard": {}}, guard={"kind": "skip", "z": "6"})
def test_fuzzed_json_reports_make_a_clipper_or_give_a_gradscope_error(tmp_path, recommendation, guard):
    from gradscope import Clipper
    if "guard" in recommendation and isinstance(recommendation["guard"], dict):
        recommendation["guard"] = guard
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"recommendation": recommendation}, allow_nan=True))
    try:
        clipper = Clipper.from_json(path)
    except GradscopeError:
        return
    assert clipper.method in ("norm", "value", "agc", "adaptive", "none")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_fuzzed_target_strings_give_a_gradscope_error(text):
    """No file or module by these names exists in the test's folder, so every one is refused in one line."""
    from gradscope.run.target import load_experiment
    try:
        load_experiment("gradscope_no_such_" + text)
    except GradscopeError as exc:
        assert exc.problem  # any other exception, or a target that loads, fails the test
        return
    pytest.fail("a target that names nothing loaded")
