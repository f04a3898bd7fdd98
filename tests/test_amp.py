"""Mixed precision: GradScaler gradients are measured unscaled, skipped steps are not explosions, bf16 works."""
from __future__ import annotations

import pytest
import torch

import gradscope

from models import MLP, mse, regression_batches


def scaled_loop(steps: int = 6, init_scale: float = 2.0**16, unscale_first: bool = False, backoff: float = 0.5,
                device: str = "cpu"):
    """A user's AMP loop (on the CPU unless ``device`` says otherwise): scale, backward, observe (before or
    after unscale_), step, update."""
    torch.manual_seed(0)
    model = MLP().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=init_scale, backoff_factor=backoff, growth_interval=1000)
    monitor = gradscope.Monitor(model, update_every=1, histogram_sample=1)
    batches = regression_batches()
    references = []
    for _ in range(steps):
        opt.zero_grad()
        loss = mse(model, [t.to(device) for t in batches()])
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        references.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double() / scale)
        if unscale_first:
            scaler.unscale_(opt)
        monitor.observe(loss, scaler=scaler)
        scaler.step(opt)
        scaler.update()
    return monitor, references


def assert_measured_unscaled(monitor, refs):
    profile = monitor.profile()
    for step, ref in enumerate(refs):
        assert profile.series["global_norm"][step] == pytest.approx(ref.norm().item(), rel=1e-5)
        assert max(profile.series["grad_abs_max"][step]) == pytest.approx(ref.abs().max().item(), rel=1e-5)
    assert "unscaled from the GradScaler" in profile.measurement


@pytest.mark.parametrize("unscale_first", [False, True])
def test_scaled_gradients_are_measured_unscaled(unscale_first):
    assert_measured_unscaled(*scaled_loop(unscale_first=unscale_first))


def test_unscaled_histogram_matches_the_plain_run():
    scaled, _ = scaled_loop(init_scale=2.0**20)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    plain = gradscope.Monitor(model, update_every=1, histogram_sample=1)
    batches = regression_batches()
    for _ in range(6):
        opt.zero_grad()
        loss = mse(model, batches())
        loss.backward()
        plain.observe(loss)
        opt.step()
    assert (scaled.profile().histograms == plain.profile().histograms).all()


def amp_overflow(backoff: float, device: str = "cpu") -> gradscope.Report:
    """An absurd initial scale: the scaled gradients overflow until the scaler has backed off enough."""
    monitor, _ = scaled_loop(steps=20, init_scale=2.0**127, backoff=backoff, device=device)
    return monitor.report()


def assert_skips_counted(report: gradscope.Report) -> None:
    m = report.statistics.model.metrics
    ids = {f.rule_id for f in report.findings}
    assert m["amp_skipped_steps"] >= 1 and m["nonfinite_count"] == 0
    assert "amp-skipped-steps" in ids and "nonfinite-gradients" not in ids
    assert len(report.statistics.model.global_norm) == 20 - m["amp_skipped_steps"]


def test_skipped_steps_are_counted_as_skipped_not_as_explosions():
    assert_skips_counted(amp_overflow(0.5))


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = MLP()
    batches = regression_batches()

    def loss_fn(m, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mse(m, batch)
    exp = gradscope.Experiment(model, torch.optim.Adam(model.parameters(), 1e-3), batches, loss_fn=loss_fn)
    report = gradscope.diagnose(exp, steps=5)
    assert report.healthy and report.statistics.model.steps == 5
