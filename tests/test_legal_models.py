"""Legal models that used to be measured wrongly or to crash: complex and sparse gradients, zero-element
parameters, float64 losses beyond float32's range, and state that diagnose must put back."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope
from gradscope import ProfileOptions
from gradscope import Monitor


def test_complex_parameters_are_measured_by_their_magnitude():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4, bias=False)
    layer.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))
    grad = torch.randn(4, 4, dtype=torch.cfloat)
    layer.weight.grad = grad.clone()
    monitor = Monitor(layer)
    monitor.observe()
    profile = monitor.profile()
    true_norm = float(torch.linalg.vector_norm(grad))  # sqrt(sum |g|^2), real and imaginary parts both
    assert profile.series["grad_norm"][0][0] == pytest.approx(true_norm, rel=1e-5)
    assert profile.series["grad_norm"][0][0] > float(torch.linalg.vector_norm(grad.real)) * 1.05
    assert profile.series["grad_abs_max"][0][0] == pytest.approx(float(grad.abs().max()), rel=1e-6)


def test_sparse_gradients_with_inf_and_nan_are_counted():
    embed = nn.Embedding(10, 3, sparse=True)
    embed(torch.tensor([1, 2, 2])).sum().backward()
    values = embed.weight.grad.coalesce()
    bad = values.values().clone()
    bad[0, 0], bad[1, 1] = float("nan"), float("inf")
    embed.weight.grad = torch.sparse_coo_tensor(values.indices(), bad, values.shape)
    monitor = Monitor(embed)
    monitor.observe()
    profile = monitor.profile()
    assert profile.nonfinite_total.tolist() == [2.0]
    assert profile.first_nonfinite == (0, "(root)")


def test_a_zero_element_parameter_is_left_out_not_a_crash():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 0), nn.Linear(3, 1))
    model[2].weight.grad = torch.ones(1, 3)
    model[0].weight.grad, model[0].bias.grad = torch.ones(3, 4), torch.ones(3)
    monitor = Monitor(model)
    monitor.observe()
    names = [monitor.layers[i].name for i in monitor.profile().active]
    assert names == ["0", "2"]


def test_a_float64_loss_beyond_float32_range_is_finite():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    batch = (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    experiment = gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda: batch,
                                      loss_fn=lambda m, b: 1e40 * (1 + nn.functional.mse_loss(m(b[0]), b[1])))
    report = gradscope.diagnose(experiment, steps=3, trials=0, profile=ProfileOptions(extend=False))
    assert report.statistics.model.steps == 3 and not report.partial
    assert all(math.isfinite(v) and v > 1e40 for v in report.statistics.model.loss)
    assert "nonfinite-loss" not in {f.rule_id for f in report.findings}


class WithState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.calls += 1
        return self.layer(x)


def test_diagnose_restores_non_persistent_buffers_and_optimizer_only_parameters():
    torch.manual_seed(0)
    model = WithState()
    temperature = nn.Parameter(torch.ones(()))  # stepped by the optimizer, not held by the model
    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    experiment = gradscope.Experiment(
        model, optimizer, lambda: batch, loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]) * temperature, b[1]))
    before = (model.calls.clone(), temperature.detach().clone(), model.layer.weight.detach().clone())
    gradscope.diagnose(experiment, steps=5, trials=0)
    assert model.calls == before[0]
    assert torch.equal(temperature.detach(), before[1]) and temperature.grad is None
    assert torch.equal(model.layer.weight.detach(), before[2])
