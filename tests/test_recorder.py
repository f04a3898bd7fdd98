"""The Monitor's flight recorder: the report is written however the run ends, marked partial when it
ended early, atomically, and a SIGTERM ends the process with 143 after writing it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradscope
from gradscope.errors import GradscopeError

from models import MLP, mse, regression_batches
from conftest import HANG_S


def loop(monitor, steps: int, fail_at=None, error=RuntimeError("the data loader died")):
    torch.manual_seed(0)
    model = monitor.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = regression_batches()
    for step in range(steps):
        if step == fail_at:
            raise error
        opt.zero_grad()
        loss = mse(model, batches())
        loss.backward()
        monitor.observe(loss)
        opt.step()


def test_a_normal_end_writes_the_whole_report(tmp_path):
    out = tmp_path / "report.json"
    before = signal.getsignal(signal.SIGTERM)
    with gradscope.Monitor(MLP(), output=out) as monitor:
        assert signal.getsignal(signal.SIGTERM) is not before  # armed inside the block
        loop(monitor, 12)
    assert signal.getsignal(signal.SIGTERM) is before  # and given back
    doc = json.loads(out.read_text())
    assert doc["steps"] == 12 and doc["partial"] is False and doc["stopped_reason"] is None


@pytest.mark.parametrize("error, words", [(RuntimeError("the data loader died"),
                                           "the training loop raised RuntimeError: the data loader died"),
                                          (KeyboardInterrupt(), "interrupted by Ctrl-C")])
def test_a_run_that_dies_leaves_a_partial_report_and_its_error(tmp_path, error, words):
    out = tmp_path / "report.md"
    with pytest.raises(type(error)):
        with gradscope.Monitor(MLP(), output=out) as monitor:
            loop(monitor, 20, fail_at=7, error=error)
    text = out.read_text()
    assert f"{words}, after 7 observed steps" in text
    json_out = tmp_path / "report.json"
    with pytest.raises(type(error)):
        with gradscope.Monitor(MLP(), output=json_out) as monitor:
            loop(monitor, 20, fail_at=7, error=error)
    doc = json.loads(json_out.read_text())
    assert doc["partial"] is True and doc["steps"] == 7 and doc["stopped_reason"].startswith(words)


def test_nothing_observed_writes_nothing_and_a_bad_destination_fails_at_once(tmp_path):
    out = tmp_path / "report.json"
    with pytest.raises(RuntimeError):
        with gradscope.Monitor(MLP(), output=out) as monitor:
            loop(monitor, 5, fail_at=0)
    assert not out.exists()
    with pytest.raises(GradscopeError, match="cannot be written|does not exist|folder"):
        gradscope.Monitor(MLP(), output=tmp_path / "missing" / "report.json")


def test_sigterm_writes_the_report_and_exits_143(tmp_path):
    out = tmp_path / "report.json"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import gradscope
        from test_recorder import loop
        from models import MLP

        class Preempted:
            def __init__(self, monitor):
                self.monitor, self.calls = monitor, 0
            def observe(self, loss=None):
                self.calls += 1
                out = self.monitor.observe(loss)
                if self.calls == 9:
                    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler preempts the job
                return out
            def __getattr__(self, name):
                return getattr(self.monitor, name)

        with gradscope.Monitor(MLP(), output={str(out)!r}) as monitor:
            loop(Preempted(monitor), 100)
        print("not reached")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout and "Traceback" not in done.stderr
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["stopped_reason"] == "terminated by SIGTERM, after 9 observed steps"
    assert doc["gate"]["exit_code"] == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process's handler was never touched


def test_a_real_ctrl_c_leaves_a_partial_report(tmp_path):
    out = tmp_path / "report.json"

    class Interrupted:  # the user presses Ctrl-C during step 7's forward pass
        def __init__(self, monitor):
            self.monitor = monitor
        def observe(self, loss=None):
            result = self.monitor.observe(loss)
            if self.monitor.steps == 7:
                os.kill(os.getpid(), signal.SIGINT)
            return result
        def __getattr__(self, name):
            return getattr(self.monitor, name)
    with pytest.raises(KeyboardInterrupt):
        with gradscope.Monitor(MLP(), output=out) as monitor:
            loop(Interrupted(monitor), 20)
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["stopped_reason"] == "interrupted by Ctrl-C, after 7 observed steps"
    assert doc["gate"]["exit_code"] == 130


def layer_norms(model) -> dict:
    """The naive reference: each module's own parameters' gradient norm, computed in float64."""
    norms = {}
    for name, module in model.named_modules():
        grads = [p.grad.double().flatten() for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            norms[name] = float(torch.linalg.vector_norm(torch.cat(grads)))
    return norms


@pytest.mark.parametrize("window", [8, 1])
def test_a_nonfinite_norm_leaves_the_steps_before_it_per_layer(tmp_path, window):
    # 150 steps through a series store of 64 rows (thinned to every 4th step by then): the black box
    # still holds every one of the last ``window`` steps, and stays frozen at the first failure.
    torch.manual_seed(0)
    model, k = MLP(), 150
    out = tmp_path / "report.json"
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches, reference = regression_batches(), []
    with pytest.raises(FloatingPointError):
        with gradscope.Monitor(model, output=out, history=64, nonfinite_window=window) as monitor:
            for step in range(200):
                x, y = batches()
                if step in (k, k + 1):
                    x[0, 0] = float("nan")  # a corrupt sample: every gradient from the first layer up goes NaN
                opt.zero_grad()
                loss = nn_mse(model, x, y)
                loss.backward()
                reference.append(layer_norms(model))
                monitor.observe(loss)
                if step == k + 1:
                    raise FloatingPointError("the loss is NaN")  # the user's own check, a step late
                opt.step() if step != k else None
    doc = json.loads(out.read_text())["global"]
    assert doc["first_nonfinite"]["step"] == k and doc["first_nonfinite"]["layer"] == "out"  # backward order
    box = doc["before_nonfinite"]
    assert box["steps"] == list(range(k - window + 1, k + 1))
    assert box["global_norm"][-1] is None and set(box["layers"]) == {"hidden.0", "hidden.1", "hidden.2", "out"}
    for name, figures in box["layers"].items():
        assert figures["nonfinite"][-1] > 0 and figures["grad_norm"][-1] is None
        assert all(n == 0 for n in figures["nonfinite"][:-1])
        expected = [reference[s][name] for s in box["steps"][:-1]]
        assert figures["grad_norm"][:-1] == pytest.approx(expected, rel=1e-5)


def nn_mse(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_the_black_box_is_drawn_in_the_html_report(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = MLP()
    out = tmp_path / "report.html"
    batches = regression_batches()
    with pytest.raises(FloatingPointError):
        with gradscope.Monitor(model, output=out) as monitor:
            for step in range(40):
                x, y = batches()
                if step == 30:
                    x[0, 0] = float("inf")
                model.zero_grad()
                loss = nn_mse(model, x, y)
                loss.backward()
                if monitor.observe(loss)["nonfinite"]:  # reading a figure waits for the device: a check
                    raise FloatingPointError("a gradient is not finite")
    text = out.read_text()
    assert "Before the first non-finite gradient" in text and 'id="before-nonfinite-0"' in text
    assert "up to step 30" in text


def test_a_window_that_is_not_a_count_is_refused():
    with pytest.raises(GradscopeError, match="nonfinite_window"):
        gradscope.Monitor(MLP(), nonfinite_window=-1)
