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
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout and "Traceback" not in done.stderr
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["stopped_reason"] == "terminated by SIGTERM, after 9 observed steps"
    assert doc["gate"]["exit_code"] == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process's handler was never touched
