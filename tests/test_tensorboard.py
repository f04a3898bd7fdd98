"""TensorBoard event files, read back with TensorBoard's own EventAccumulator."""
from __future__ import annotations

import builtins

import pytest

import gradscope
from gradscope.cli import main
from gradscope.errors import GradscopeError

from models import healthy_mlp
from test_cli import GOOD, target

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_histograms_and_norms_round_trip(tmp_path):
    from gradscope.integrations.tensorboard import write_tensorboard
    report = gradscope.diagnose(healthy_mlp(), steps=6, seed=0)
    write_tensorboard(report, tmp_path)
    acc = read(tmp_path)
    norms = [e.value for e in acc.Scalars("gradscope/global_norm")]
    assert norms == pytest.approx(report.statistics.model.global_norm, rel=1e-6)
    layer = report.statistics.active_layers[0]
    histogram = acc.Histograms(f"gradscope/grad_abs/{layer.name}")[0].histogram_value
    assert histogram.num == pytest.approx(layer.histogram.sum())
    assert sum(histogram.bucket) == pytest.approx(layer.histogram.sum())
    assert histogram.max >= layer.metrics["grad_abs_p999"]
    assert acc.Scalars(f"gradscope/grad_norm/{layer.name}")[0].value == pytest.approx(layer.norm_series[0], rel=1e-6)


def test_cli_flag(tmp_path, capsys):
    assert main(["diagnose", target(tmp_path, GOOD), "--steps", "3", "--no-extend", "--tensorboard", str(tmp_path / "tb")]) == 0
    assert len(read(tmp_path / "tb").Scalars("gradscope/global_norm")) == 3


def test_missing_extra_is_a_clear_error(tmp_path, monkeypatch):
    from gradscope.integrations.tensorboard import write_tensorboard
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(GradscopeError, match="needs the tensorboard package") as info:
        write_tensorboard(gradscope.diagnose(healthy_mlp(), steps=2), tmp_path)
    assert "gradscope[tensorboard]" in info.value.hint
