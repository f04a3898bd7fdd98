"""The samples behind a spike (gradscope.collect.culprits) and what diagnose does with them."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope
from gradscope.collect import culprits
from gradscope.cli import main
from gradscope.report import Report

from models import MLP, mse, regression_batches
from test_default_rules import corrupted_sample


def _batch(corrupt: int = 5):
    x, y = regression_batches(n=16)()
    y = y.clone()
    y[corrupt] *= 1000
    return x, y


def test_each_sample_is_measured_alone_and_the_shares_sum_to_one():
    """The per-sample gradients equal a backward pass of each sample by hand, and the corrupted sample
    carries nearly all of the batch gradient's squared norm."""
    torch.manual_seed(0)
    model = MLP()
    batch = _batch()
    record = culprits.per_sample(model, batch, lambda b: mse(model, b), step=7)
    assert record.method == "vmap" and record.error is None and record.batch_size == 16
    top = record.samples[0]
    assert top.index == 5 and top.share > 0.99
    model.zero_grad()
    loss = mse(model, (batch[0][5:6], batch[1][5:6]))
    loss.backward()
    by_hand = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert top.grad_norm == pytest.approx(by_hand, rel=1e-4) and top.loss == pytest.approx(float(loss), rel=1e-5)
    everyone = culprits.per_sample(model, batch, lambda b: mse(model, b), step=7)
    assert len(everyone.samples) == culprits.MOST_SAMPLES


def test_the_loop_gives_what_vmap_gives_and_is_used_where_vmap_cannot_run():
    torch.manual_seed(0)
    model = MLP()
    batch = _batch()
    params = {n: p for n, p in model.named_parameters()}
    by_vmap = culprits._by_vmap(model, batch, 16, params, lambda b: mse(model, b))
    by_loop = culprits._by_loop(batch, 16, params, lambda b: mse(model, b))
    for a, b in zip(by_vmap[0][0], by_loop[0][0]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)

    def item_in_forward(m, b):  # .item() cannot run under vmap
        out = m(b[0])
        return nn.functional.mse_loss(out, b[1]) * (1.0 if out.sum().item() < 1e30 else 0.0)
    record = culprits.per_sample(model, batch, lambda b: item_in_forward(model, b), step=0)
    assert record.method == "loop" and record.samples[0].index == 5


def test_taking_a_batch_apart_leaves_the_run_exactly_as_it_was():
    """No .grad, no running statistic, no random number generator and no train/eval mode is touched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 1))
    batch = _batch()
    model.train()
    mse(model, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    record = culprits.per_sample(model, batch, lambda b: mse(model, b), step=0)
    assert record.samples[0].index == 5
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state()) and model.training and model[2].training


def test_a_sample_with_an_inf_in_a_batchnorm_model_is_named_though_the_running_statistics_took_it_in():
    """The step's training forward put the inf into BatchNorm's running mean, so eval mode would make
    every sample non-finite: each sample runs alone in train mode, and the buffers are put back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,))
    x[2, 0, 3, 3] = float("inf")
    loss_of = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    loss_of((x, y)).backward()  # the training step: the running mean is now non-finite
    buffers = [b.clone() for b in model.buffers()]
    record = culprits.per_sample(model, (x, y), loss_of, step=3)
    assert record.method == "loop, train mode" and record.nonfinite_inputs == (2,)
    assert record.samples[0].index == 2 and not math.isfinite(record.samples[0].grad_norm)
    assert all(math.isfinite(s.grad_norm) for s in record.samples[1:])
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(buffers, model.buffers()))


def test_a_batch_with_no_batch_dimension_is_said_not_raised():
    model = nn.Linear(3, 1)
    record = culprits.per_sample(model, torch.tensor(2.0), lambda b: model(b.expand(3)).sum(), step=0)
    assert record.samples == () and "no tensor with a batch dimension" in record.error


def test_diagnose_names_the_corrupted_sample_and_saves_its_batch_beside_the_report(tmp_path, monkeypatch):
    """The issue's run, through the CLI: one sample of step 20's batch has a target 1000x; the JSON's
    spikes name step 20 and sample 5 first, the cause is the data, and the batch is saved to replay."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_default_rules import corrupted_sample\n"
        % str(__import__("pathlib").Path(__file__).parent), encoding="utf-8")
    code = main(["diagnose", "target.py:corrupted_sample", "--trials", "0", "--format", "json", "--output", "r.json"])
    doc = Report.from_json(tmp_path / "r.json")
    assert code == 0  # the spike is a warning; the default gate fails on errors
    spike = doc["spikes"][0]
    assert spike["step"] == 20 and spike["samples"][0]["index"] == 5 and spike["samples"][0]["share"] > 0.9
    assert doc["cause"]["kind"] == "data"
    x, y = torch.load(tmp_path / "r.spike-20.pt")
    assert float(y[5].abs()) > 100 * float(y[:5].abs().max())


def test_a_run_with_no_spike_takes_nothing_apart():
    report = gradscope.diagnose(gradscope.Experiment(*_healthy()), steps=30, seed=0, trials=0)
    assert report.statistics.model.spikes == () and report.to_dict()["spikes"] == []
    assert report.cause is None


def _healthy():
    torch.manual_seed(0)
    model = MLP()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), regression_batches(), mse


def test_the_corrupted_sample_fixture_is_taken_apart_by_diagnose():
    report = gradscope.diagnose(corrupted_sample(), steps=30, seed=0, trials=0)
    spike = report.statistics.model.spikes[0]
    assert spike.step == 20 and spike.samples[0].index == 5 and spike.previous_loss < spike.batch_loss / 4


def test_an_optimizer_over_another_model_is_named_and_no_threshold_is_advised():
    """The issue's slip: the optimizer holds none of the model's parameters, so its gradients pile up and
    the norm rises. The report names the optimizer as the cause, and advises fixing it, not clipping."""
    from test_default_rules import optimizer_over
    report = optimizer_over(lambda model: MLP().parameters())
    assert report.findings[0].rule_id == "optimizer-misses-parameters" and report.cause.kind == "optimizer"
    assert report.recommendation.method == "none"
    assert report.recommendation.evidence.basis[0].code == "fix_first"


def test_a_batch_whose_samples_hold_nans_is_named_as_the_data_not_a_crash():
    """Four samples of step 20's batch hold a NaN: the step's loss is not finite, so no loss ratio can be
    read; spike-from-one-batch fires on the samples themselves, and the cause names them."""
    from test_default_rules import corrupted_at_20

    def four_nans(x, y):
        x = x.clone()
        x[:4, 0] = float("nan")
        return x, y
    report = gradscope.diagnose(corrupted_at_20(four_nans), steps=30, seed=0, trials=0)
    assert report.statistics.model.spikes[0].nonfinite_inputs == (0, 1, 2, 3)
    assert "spike-from-one-batch" in {f.rule_id for f in report.findings}
    assert report.cause.kind == "data" and "0, 1, 2 of 16 hold an inf or a NaN" in report.to_dict()["cause"]["words"]
