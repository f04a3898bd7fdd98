"""Gradient accumulation in Monitor, and diagnosing a torch.compile'd model without graph breaks."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import gradscope

from models import MLP, mse, regression_batches


def test_accumulated_gradient_is_observed_once_per_optimizer_step():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = gradscope.Monitor(model, accumulation_steps=4, update_every=1, histogram_sample=1)
    batches = regression_batches()
    expected, losses = [], []
    for _ in range(3):
        opt.zero_grad()
        for micro in range(4):
            loss = mse(model, batches()) / 4
            loss.backward()
            losses.append(loss.item())
            out = monitor.observe(loss)
            assert out["measured"] == (1.0 if micro == 3 else 0.0)
        expected.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item())
        opt.step()
    profile = monitor.profile()
    assert profile.steps == 3
    assert profile.series["global_norm"] == pytest.approx(expected, rel=1e-5)
    assert profile.series["loss"][1] == pytest.approx(sum(losses[4:8]) / 4, rel=1e-5)


def test_every_micro_batch_when_asked():
    torch.manual_seed(0)
    model = MLP()
    monitor = gradscope.Monitor(model)  # accumulation_steps=1: every call is measured
    batches = regression_batches()
    for _ in range(4):
        mse(model, batches()).backward()
        monitor.observe()
    assert monitor.steps == 4


PLAIN_KERNELS = os.environ.get("ATEN_CPU_CAPABILITY") == "default"
INDUCTOR = pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
    PLAIN_KERNELS, reason="inductor's generated C++ does not build under ATEN_CPU_CAPABILITY=default (a matter "
                          "of torch's, not gradscope's: aot_eager traces the same graphs)")])


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_model_diagnoses_without_graph_breaks(backend):
    """aot_eager traces forward and backward as inductor does, without a C++ build; inductor is slow."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend=backend)
    experiment = gradscope.Experiment(compiled, torch.optim.Adam(model.parameters(), 1e-3), regression_batches(),
                                      loss_fn=mse)
    report = gradscope.diagnose(experiment, steps=4)
    assert report.statistics.model.steps == 4
    assert [l.name for l in report.statistics.layers] == ["hidden.0", "hidden.1", "hidden.2", "out"]
    assert counters["stats"]["unique_graphs"] >= 1  # the forward really ran compiled
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_a_compiled_models_figures_equal_the_plain_models(backend):
    """The same model, plain and torch.compile'd, trained side by side from the same weights on the same
    batches: the Monitor names the same layers and reads the same figures every step. aot_eager runs the
    eager kernels (the figures agree to the last bits but for backward's summation order); inductor fuses
    them, so the figures agree to float32's rounding."""
    torch._dynamo.reset()
    figures = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        run = torch.compile(model, backend=backend) if compiled else model
        monitor = gradscope.Monitor(run, update_every=1)
        batches = regression_batches()
        for _ in range(8):
            opt.zero_grad()
            loss = mse(run, batches())
            loss.backward()
            monitor.observe(loss)
            opt.step()
        report = monitor.report()
        monitor.close()
        layers = report.statistics.active_layers
        figures.append(({l.name: (l.norm_series, l.metrics["grad_abs_max"]) for l in layers},
                        report.statistics.model.global_norm, report.statistics.model.loss))
    (plain_layers, plain_norm, plain_loss), (layers, norm, loss) = figures
    assert list(layers) == list(plain_layers) == ["hidden.0", "hidden.1", "hidden.2", "out"]
    np.testing.assert_allclose(norm, plain_norm, rtol=1e-5)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
    for name, (series, peak) in layers.items():
        np.testing.assert_allclose(series, plain_layers[name][0], rtol=1e-5, err_msg=name)
        assert peak == pytest.approx(plain_layers[name][1], rel=1e-5), name
