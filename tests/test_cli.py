"""The CLI contract: exit codes, one-line errors without tracebacks, outputs, and the bundled samples."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradscope.cli import main
from gradscope.report import Report
from conftest import HANG_S

ROOT = Path(__file__).resolve().parent.parent
HEADER = """
import itertools
import torch
from torch import nn
import gradscope

def data():
    g = torch.Generator().manual_seed(0)
    return lambda: (torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
"""


def target(tmp_path: Path, body: str, name: str = "target.py") -> str:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body))
    return str(path)


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    assert err.count("gradscope: error:") == 1
    for fragment in fragments:
        assert fragment in err, err


GOOD = """
def experiment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), 1e-3), data(),
                                loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
"""


def test_user_file_target_runs_and_exits_0(tmp_path, capsys):
    code, out, err = run(["diagnose", target(tmp_path, GOOD), "--steps", "5"], capsys)
    assert code == 0, err
    assert "HEALTHY" in out and "measured:" in out


def test_explicit_callable_and_json_output_file(tmp_path, capsys):
    path = target(tmp_path, GOOD.replace("def experiment", "def build"))
    out_file = tmp_path / "report.json"
    code, out, _ = run(["diagnose", f"{path}:build", "--steps", "4", "--format", "json", "--output", str(out_file)],
                       capsys)
    assert code == 0 and out == ""
    assert Report.from_json(out_file)["steps"] == 4


def test_module_target(tmp_path, capsys, monkeypatch):
    target(tmp_path, GOOD, name="my_experiment.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run(["diagnose", "my_experiment:experiment", "--steps", "3", "--no-extend", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["steps"] == 3


def test_fail_on_levels(tmp_path, capsys):
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n  - id: always\n    severity: warning\n    scope: model\n"
                     "    when: {metric: steps, op: '>', value: 0}\n    message: always warns\n")
    path = target(tmp_path, GOOD)
    base = ["diagnose", path, "--steps", "3", "--rules", str(rules)]
    assert run(base, capsys)[0] == 0
    assert run(base + ["--fail-on", "warning"], capsys)[0] == 1
    assert run(base + ["--fail-on", "never"], capsys)[0] == 0


@pytest.mark.parametrize("body, fragments", [
    (None, ["no such file"]),
    ("import not_a_module_anywhere\n", ["importing", "ModuleNotFoundError", "not_a_module_anywhere"]),
    ("raise RuntimeError('broken at import')\n", ["importing", "RuntimeError: broken at import"]),
    ("def other():\n    pass\n", ["has no callable named 'experiment'", "other"]),
    ("def experiment():\n    raise ValueError('bad config')\n", ["experiment() raised ValueError: bad config"]),
    ("def experiment():\n    return 42\n", ["returned int, not a gradscope.Experiment"]),
    ("def experiment():\n    m, other = nn.Linear(4, 1), nn.Linear(4, 1)\n"
     "    return gradscope.Experiment(m, torch.optim.SGD(other.parameters(), 0.1), data(),\n"
     "        loss_fn=lambda m, b: m(b[0]).sum())\n", ["optimizer holds none of the model's 2 trainable parameters"]),
    ("def experiment():\n    m = nn.Linear(4, 1).requires_grad_(False)\n"
     "    return gradscope.Experiment(m, torch.optim.SGD([nn.Parameter(torch.ones(1))], 0.1), data(),\n"
     "        loss_fn=lambda m, b: m(b[0]).sum())\n", ["no trainable parameters"]),
    ("def experiment():\n    m = nn.Linear(4, 1)\n"
     "    return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), data(),\n"
     "        loss_fn=lambda m, b: m(b[0]).sum().detach())\n", ["does not depend on any trainable parameter"]),
    ("def experiment():\n    m = nn.Linear(4, 1)\n"
     "    return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), data(),\n"
     "        loss_fn=lambda m, b: m(b[0]))\n", ["shape (8, 1), not a scalar loss"]),
    ("def experiment():\n    m = nn.Linear(4, 1)\n"
     "    return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), [],\n"
     "        loss_fn=lambda m, b: m(b[0]).sum())\n", ["batches is empty"]),
    ("def experiment():\n    m = nn.Linear(4, 1)\n"
     "    return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), data(),\n"
     "        loss_fn=lambda m, b: m(b[0][:, :3]).sum())\n", ["forward pass or loss raised at step 0", "RuntimeError"]),
])
def test_bad_targets_exit_2_with_one_clear_line(tmp_path, capsys, body, fragments):
    path = str(tmp_path / "missing.py") if body is None else target(tmp_path, body)
    code, _, err = run(["diagnose", path, "--steps", "3"], capsys)
    assert code == 2
    assert_clean_error(err, *fragments)
    assert "hint:" in err

def test_an_error_inside_torch_is_not_blamed_on_gradscopes_own_file(tmp_path, capsys):
    """No loss_fn and a plain torch module: gradscope calls model(*batch) (run/experiment.py) and torch
    raises inside it. No frame of gradscope's, in any of its folders, is named as where it came from."""
    path = target(tmp_path, """
        def experiment():
            m = nn.Linear(3, 1)  # the batches have 4 features
            return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), lambda: (torch.randn(8, 4),))
        """)
    code, _, err = run(["diagnose", path, "--steps", "3"], capsys)
    assert code == 2 and "RuntimeError" in err and "experiment.py" not in err
    assert_clean_error(err, "forward pass or loss raised at step 0")



def test_debug_shows_the_traceback(tmp_path, capsys):
    path = target(tmp_path, "def experiment():\n    raise ValueError('bad config')\n")
    code, _, err = run(["diagnose", path, "--debug"], capsys)
    assert code == 2 and "Traceback" in err and "bad config" in err


def test_the_debug_flag_is_named_by_the_cli_alone(tmp_path, capsys):
    """The library's hint says what to fix; the command line adds its own flag where the user's code raised."""
    path = target(tmp_path, "def experiment():\n    raise ValueError('bad config')\n")
    code, _, err = run(["diagnose", path], capsys)
    assert code == 2 and "--debug shows the traceback" in err and "Traceback" not in err
    from gradscope.errors import GradscopeError
    from gradscope.run.target import load_experiment
    with pytest.raises(GradscopeError) as raised:
        load_experiment(path)
    assert "--" not in raised.value.hint and "bad config" in raised.value.problem


def test_nan_at_step_0_is_a_report_with_the_finding_and_exit_1(tmp_path, capsys):
    body = """
    def experiment():
        m = nn.Linear(4, 1)
        return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), data(),
            loss_fn=lambda m, b: m(b[0]).sum() * float('nan'))
    """
    code, out, err = run(["diagnose", target(tmp_path, body), "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 1 and "Traceback" not in err
    assert doc["partial"] is True and doc["steps"] == 1
    assert {"nonfinite-loss", "nonfinite-gradients"} <= {f["rule_id"] for f in doc["findings"]}


def test_model_raising_midway_keeps_a_partial_report(tmp_path, capsys):
    body = """
    def experiment():
        m = nn.Linear(4, 1)
        calls = itertools.count()
        def loss(m, b):
            if next(calls) == 3:
                raise RuntimeError('CUDA out of memory (simulated)')
            return nn.functional.mse_loss(m(b[0]), b[1])
        return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), data(), loss_fn=loss)
    """
    code, out, err = run(["diagnose", target(tmp_path, body)], capsys)
    assert code == 2
    assert "PARTIAL REPORT" in out and "3 steps of 30" in out
    assert_clean_error(err, "raised at step 3", "out of memory (simulated)")


def test_ctrl_c_gives_a_partial_report_and_exit_130(tmp_path, capsys):
    body = """
    def experiment():
        m = nn.Linear(4, 1)
        make = data()
        calls = itertools.count()
        def batches():
            if next(calls) == 4:
                raise KeyboardInterrupt
            return make()
        return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), batches,
            loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    """
    code, out, err = run(["diagnose", target(tmp_path, body), "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 130 and doc["partial"] and doc["steps"] == 4
    assert_clean_error(err, "interrupted")


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run(["diagnose", target(tmp_path, GOOD), "--device", "cuda"], capsys)
    assert code == 2
    assert_clean_error(err, "the device 'cuda' was asked for", "no CUDA GPU")


def test_malformed_rule_file_names_file_and_line(tmp_path, capsys):
    rules = tmp_path / "bad.yaml"
    rules.write_text("rules:\n  - id: x\n    severity: error\n    scope: model\n"
                     "    when: {metric: nope, op: '>', value: 1}\n    message: m\n")
    code, _, err = run(["diagnose", target(tmp_path, GOOD), "--rules", str(rules)], capsys)
    assert code == 2
    assert_clean_error(err, "bad.yaml:2", "rule x", "unknown metric 'nope'")


@pytest.mark.parametrize("args", [["diagnose"], ["diagnose", "x.py", "--steps", "51"], ["diagnose", "x.py", "--format", "xml"]])
def test_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args) if args[-1] != "51" else sys.exit(main(args))
    assert info.value.code == 2


def test_rules_and_metrics_listings(capsys):
    code, out, _ = run(["rules"], capsys)
    assert code == 0 and "global-norm-growing" in out
    code, out, _ = run(["metrics"], capsys)
    assert code == 0 and "global_norm_growth" in out


def test_rules_verbose_explains_every_rule(capsys):
    from gradscope.analyse.ruleset import load_rules
    code, out, _ = run(["rules", "--verbose"], capsys)
    rules = load_rules(None).rules
    assert code == 0 and out.count("fires when:") == len(rules)
    for rule in rules:
        assert f"{rule.id} ({rule.severity}, {rule.scope} rule" in out


SAMPLES = [("exploding_rnn", 1, "exploding"), ("lstm_lm", 1, "diverges"), ("healthy_cnn", 0, "HEALTHY"),
           ("tiny_transformer", 0, "HEALTHY")]


@pytest.mark.slow
@pytest.mark.parametrize("name, expected, phrase", SAMPLES)
def test_bundled_samples_through_python_m(name, expected, phrase, tmp_path):
    # from outside the checkout, so that -m runs the installed gradscope, not the source folder
    result = subprocess.run([sys.executable, "-m", "gradscope", "diagnose", str(ROOT / "samples" / f"{name}.py")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == expected, result.stdout + result.stderr
    assert phrase in result.stdout


LAUGHS = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] +
                   [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)] + ["rules: [*a8]"])
RULE_HEAD = "rules:\n  - id: my-rule\n    scope: model\n    message: m\n"


@pytest.mark.parametrize("text, fragments", [
    (RULE_HEAD + "    severity: error\n    when: {metric: no_such_metric, op: '>', value: 1}\n",
     ["rules.yaml:2", "rule my-rule", "unknown metric 'no_such_metric'"]),
    (RULE_HEAD + "    severity: error\n    when: {metric: steps, op: '~', value: 1}\n",
     ["rule my-rule", "unknown operator '~'"]),
    (RULE_HEAD + "    severity: critical\n    when: {metric: steps, op: '>', value: 1}\n",
     ["rule my-rule", "unknown severity 'critical'"]),
    ("rules:\n  - !!python/object/apply:os.system ['echo pwned']\n", ["rules.yaml:2", "not valid rule YAML"]),
    (LAUGHS, ["too large or too deeply nested"]),
])
def test_bad_rule_files_through_the_cli(tmp_path, capsys, text, fragments):
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    code, _, err = run(["diagnose", target(tmp_path, GOOD), "--rules", str(rules)], capsys)
    assert code == 2
    assert_clean_error(err, *fragments)


def test_import_gradscope_stays_light():
    code = ("import sys, gradscope, gradscope.integrations; "
            "heavy = {'lightning', 'transformers', 'tensorboard'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=HANG_S)


@pytest.mark.parametrize("handler", [signal.SIG_DFL, signal.SIG_IGN], ids=["from a terminal", "under nohup"])
def test_real_sigint_mid_profiling_gives_a_partial_report_and_130(tmp_path, handler):
    """Ctrl-C as a terminal sends it: SIGINT to the running process, after a few steps. The process starts
    with SIGINT at its default (whatever launched the tests), or ignored, as nohup starts it."""
    import time

    marker = tmp_path / "step3"
    body = f"""
    import time
    def experiment():
        m = nn.Linear(4, 1)
        make = data()
        calls = itertools.count()
        def batches():
            n = next(calls)
            if n == 3:
                open({str(marker)!r}, "w").close()
            if n >= 3:
                time.sleep(0.5)
            return make()
        return gradscope.Experiment(m, torch.optim.SGD(m.parameters(), 0.1), batches,
            loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    """
    steps = "30" if handler == signal.SIG_DFL else "6"  # ignored, the run goes on: keep it short
    # no trials: a warning here calls for them, and their contenders would draw ~130 more half-second batches
    proc = subprocess.Popen([sys.executable, "-m", "gradscope", "diagnose", target(tmp_path, body), "--format",
                             "json", "--steps", steps, "--trials", "off"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, handler))
    deadline = time.monotonic() + HANG_S  # the marker comes within seconds; only a hung run waits this long
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG_S)
    doc = json.loads(out)
    if handler == signal.SIG_IGN:  # started under nohup: the signal is not for it, and the run completes
        assert proc.returncode == 0, err
        assert doc["partial"] is False and doc["steps"] == 6
        return
    assert proc.returncode == 130, err
    assert doc["partial"] is True and 3 <= doc["steps"] < 30 and "Ctrl-C" in doc["stopped_reason"]
    assert "Traceback" not in err and "interrupted" in err


USER_EXITS = {
    "a loss function that calls sys.exit(0)": ("""
import sys

def experiment():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    calls = itertools.count()
    def loss_fn(m, b):
        if next(calls) == 3:
            sys.exit(0)
        return nn.functional.mse_loss(m(b[0]), b[1])
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), 0.01), data(), loss_fn=loss_fn)
""", "SystemExit", True),
    "a target module that calls sys.exit(3) on import": ("""
import sys
sys.exit(3)
""", "SystemExit: 3", False),
    "an optimizer.step() that raises (LBFGS without a closure)": ("""
def experiment():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return gradscope.Experiment(model, torch.optim.LBFGS(model.parameters()), data(),
                                loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
""", "optimizer.step() raised at step 0", True),
}


@pytest.mark.parametrize("case", sorted(USER_EXITS))
def test_user_code_that_exits_or_raises_never_passes_the_gate(case, tmp_path, capsys):
    """sys.exit() in user code, or an error from optimizer.step(), is the user's error: exit 2, one line,
    and the partial report (JSON, agreeing that the run did not finish) whenever steps ran."""
    body, fragment, steps_ran = USER_EXITS[case]
    code, out, err = run(["diagnose", target(tmp_path, body), "--steps", "6", "--format", "json"], capsys)
    assert code == 2
    assert_clean_error(err, fragment)
    if steps_ran:
        assert json.loads(out)["partial"] is True
    else:
        assert out == ""


def test_rule_explains_its_condition_thresholds_and_message(capsys):
    code, out, err = run(["rule", "recurrent-norm-high"], capsys)
    assert code == 0, err
    for expected in ("recurrent-norm-high (warning, layer rule, remedy: norm)", "fires when:", "any of:",
                     "grad_norm_peak_over_median > 10", "kind: RNN, LSTM, GRU", "peak_over_median: 10",
                     "grad_norm_peak_over_median: grad_norm_max / grad_norm_median", "message:"):
        assert expected in out, out


def test_rule_follows_a_rule_file_override_and_suggests_close_ids(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  - id: recurrent-norm-high\n    params: {peak_over_median: 40}\n")
    code, out, _ = run(["rule", "recurrent-norm-high", "--rules", str(path)], capsys)
    assert code == 0 and "grad_norm_peak_over_median > 40" in out
    code, _, err = run(["rule", "recurent-norm-high"], capsys)
    assert code == 2
    assert_clean_error(err, "no rule 'recurent-norm-high'", "did you mean recurrent-norm-high")


def test_piped_report_has_no_padding_at_line_ends(tmp_path, capsys):
    code, out, _ = run(["diagnose", target(tmp_path, GOOD), "--steps", "5"], capsys)
    lines = out.splitlines()
    assert code == 0 and "HEALTHY" in out and "layers, worst first" in out
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()][:3]
