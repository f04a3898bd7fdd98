"""The live log (``Monitor(model, log=...)``): what a sink receives, when, and from which step; findings as
events, rate-limited; a sink that fails never stops training. The real W&B, MLflow and TensorBoard are in
test_live_sinks.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradscope
from gradscope import LiveLog, Monitor
from gradscope.errors import GradscopeError
from gradscope.live.keys import group_of

from models import MLP, mse, regression_batches


class Collect:
    """A sink that keeps what it gets: ``rows`` of (step, metrics), and ``events``."""

    def __init__(self) -> None:
        self.rows, self.events = [], []

    def __call__(self, metrics, step) -> None:
        self.rows.append((step, dict(metrics)))

    def event(self, event) -> None:
        self.events.append(event)

    def steps(self):
        return [step for step, _ in self.rows]

    def series(self, key):
        return np.array([m.get(key, np.nan) for _, m in self.rows])


def run(monitor, model, steps, *, lr=0.05, batches=None, loss_in_observe=True, blow_up_at=None):
    batches = batches or regression_batches()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for k in range(steps):
        opt.zero_grad()
        loss = mse(model, batches())
        loss.backward()
        if blow_up_at is not None and k >= blow_up_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        if loss_in_observe:
            monitor.observe(loss)
        else:
            monitor.observe()
            monitor.note_loss(loss)  # as the Lightning callback does: the loss arrives after the step
        if blow_up_at is None:
            opt.step()
    return monitor


def test_a_sink_gets_every_layers_norm_and_the_global_one_with_the_reports_figures():
    torch.manual_seed(0)
    model, sink = MLP(), Collect()
    monitor = run(Monitor(model, log=sink), model, 40)
    report = monitor.report()
    monitor.close()
    m = report.statistics.model
    assert sink.steps() == list(range(40)) == list(m.series_steps)
    names = [layer.name for layer in report.statistics.active_layers]
    assert names == ["hidden.0", "hidden.1", "hidden.2", "out"]
    for step, metrics in sink.rows:
        assert {f"grad_norm/{n}" for n in names} | {"grad_norm/global", "gradscope/loss"} <= set(metrics)
    np.testing.assert_allclose(sink.series("grad_norm/global"), m.global_norm, rtol=1e-5)
    np.testing.assert_allclose(sink.series("gradscope/loss"), m.loss, rtol=1e-5)
    for layer in report.statistics.active_layers:
        np.testing.assert_allclose(sink.series(f"grad_norm/{layer.name}"), layer.norm_series, rtol=1e-5)
    z = sink.series("gradscope/spike_z")
    assert np.isnan(z[:5]).all() and np.isfinite(z[5:]).all()  # the spike score from the sixth step


def test_nothing_reaches_the_sink_between_flushes_and_a_loss_noted_later_goes_with_its_step():
    """The sink is called at the Monitor's flush (no host sync of its own); a step waits for the next one, so
    that a loss noted after it (``note_loss``, as the Lightning callback does) goes with it."""
    torch.manual_seed(0)
    model, sink = MLP(), Collect()
    monitor = Monitor(model, log=sink, flush_every=8)
    run(monitor, model, 7, loss_in_observe=False)
    assert sink.rows == []  # seven steps wait on the device: no flush, nothing sent
    run(monitor, model, 1, loss_in_observe=False)
    assert sink.steps() == list(range(7))  # the flush at the eighth step; the eighth waits for its loss
    run(monitor, model, 12, loss_in_observe=False)
    report = monitor.report()
    assert sink.steps() == list(range(20))  # report() sends the last step
    np.testing.assert_allclose(sink.series("gradscope/loss"), report.statistics.model.loss, rtol=1e-6)
    assert np.isfinite(sink.series("gradscope/loss")).all()
    monitor.close()


def test_steps_are_the_optimizers_from_the_given_start():
    """``every=3`` observes steps 0, 3, 6...: the sink gets those numbers, offset by ``start`` (a resumed
    run's global step)."""
    torch.manual_seed(0)
    model, sink = MLP(), Collect()
    with Monitor(model, every=3, log=LiveLog(sink, start=100)) as monitor:
        run(monitor, model, 12)
    assert sink.steps() == [100, 103, 106, 109]


def test_a_model_with_many_layers_logs_its_largest_and_the_groups():
    """Past ``layers`` layers (32), each step logs the ``top`` largest layers and one series per group: the
    same layer across blocks, whose norm is the root of its layers' sum of squares."""
    torch.manual_seed(0)
    model, sink = MLP(width=8, depth=40), Collect()
    monitor = run(Monitor(model, log=sink), model, 6, lr=0.01)
    report = monitor.report()
    monitor.close()
    layers = report.statistics.active_layers
    assert len(layers) == 41 and group_of("hidden.17") == "hidden" and group_of("out") == "out"
    for k, (step, metrics) in enumerate(sink.rows):
        per_layer = {n[len("grad_norm/"):]: v for n, v in metrics.items()
                     if n.startswith("grad_norm/") and n not in ("grad_norm/global", "grad_norm/post_clip")}
        norms = {layer.name: layer.norm_series[k] for layer in layers}
        assert len(per_layer) == 8
        assert sorted(per_layer.values(), reverse=True) == pytest.approx(sorted(norms.values(), reverse=True)[:8],
                                                                          rel=1e-6)
        hidden = math.sqrt(sum(v * v for n, v in norms.items() if n.startswith("hidden.")))
        assert metrics["grad_norm_group/hidden"] == pytest.approx(hidden, rel=1e-6)
        assert metrics["grad_norm_group/out"] == pytest.approx(norms["out"], rel=1e-6)
        assert len(metrics) < 16  # not 41 series


def test_the_loops_clipping_is_logged_as_the_report_counts_it():
    torch.manual_seed(0)
    model, sink = MLP(), Collect()
    monitor = Monitor(model, clip=0.5, log=sink)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = regression_batches(scale=3.0)
    for _ in range(24):
        opt.zero_grad()
        loss = mse(model, batches())
        loss.backward()
        monitor.observe(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    report = monitor.report()
    monitor.close()
    clip = report.statistics.model.clip
    clipped = sink.series("clip/clipped")
    assert clipped.sum() == clip.clipped and clip.clipped > 0
    assert sink.series("clip/rate")[-1] == pytest.approx(clip.clipped / clip.steps)
    post = sink.series("grad_norm/post_clip")
    norms = sink.series("grad_norm/global")
    np.testing.assert_allclose(post, np.minimum(norms, 0.5), rtol=1e-5)


def test_the_guards_skips_are_logged():
    torch.manual_seed(0)
    model, sink = MLP(), Collect()
    clipper = gradscope.Clipper("norm", 1.0, skip=gradscope.Skip(z=3.0, window=8, min_history=4))
    monitor = Monitor(model, clip=clipper, log=sink, flush_every=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    clipper.attach(opt)
    batches = regression_batches()
    for k in range(20):
        opt.zero_grad()
        loss = mse(model, batches()) * (1000.0 if k == 12 else 1.0)
        loss.backward()
        monitor.observe(loss)
        clipper(model, loss.detach())
        opt.step()
    monitor.report()
    monitor.close()
    skipped = [m["guard/skipped"] for _, m in sink.rows if "guard/skipped" in m]
    assert skipped and skipped[-1] == clipper.counts()["skipped"] >= 1
    assert skipped == sorted(skipped)  # a running count


def test_a_non_finite_gradient_reaches_the_sink_at_once_as_one_event():
    """Findings are the report's own rules: a non-finite gradient is evaluated at the flush it arrives in,
    and each rule is sent once, however many steps it holds on."""
    torch.manual_seed(0)
    model, sink = MLP(), Collect()
    monitor = Monitor(model, log=sink, flush_every=4)
    run(monitor, model, 12, blow_up_at=6)
    assert [e.rule for e in sink.events] == ["nonfinite-gradients"]
    event = sink.events[0]
    assert event.severity == "error" and event.step == 7 and "non-finite" in event.message
    assert sink.series("gradscope/nonfinite")[6:].min() >= 1 and np.isinf(sink.series("grad_norm/global")[6:]).all()
    report = monitor.report()
    monitor.close()
    assert "nonfinite-gradients" in {f.rule_id for f in report.findings}
    assert [e.rule for e in sink.events] == ["nonfinite-gradients"]


def test_findings_wait_for_enough_steps_and_for_the_interval_and_filter_by_severity():
    torch.manual_seed(0)
    model, sink = MLP(), Collect()
    clock = [0.0]
    live = LiveLog(sink, findings="warning", findings_every=30)
    monitor = Monitor(model, clip=0.01, log=live, flush_every=8)
    live._findings._clock = lambda: clock[0]
    run(monitor, model, 24)  # under 32 steps: not evaluated, though the clipping acts on every step
    assert sink.events == []
    run(monitor, model, 16)
    assert [e.rule for e in sink.events] == ["clipping-every-step"]
    assert all(e.severity in ("warning", "error") for e in sink.events)
    monitor.close()

    quiet = Collect()
    monitor = Monitor(MLP(), clip=0.01, log=LiveLog(quiet, findings=None))
    run(monitor, monitor.model, 40)
    monitor.close()
    assert quiet.events == [] and len(quiet.rows) == 40


def test_a_sink_that_raises_is_one_warning_and_training_goes_on():
    torch.manual_seed(0)
    model = MLP()
    calls = []

    def broken(metrics, step):
        calls.append(step)
        raise ConnectionError("dashboard unreachable")

    monitor = Monitor(model, log=broken, flush_every=4)
    with pytest.warns(RuntimeWarning, match="live log to broken stopped: dashboard unreachable"):
        run(monitor, model, 20)
    report = monitor.report()
    monitor.close()
    assert calls == [0] and report.statistics.model.steps == 20


def test_a_run_that_is_not_there_is_one_warning():
    pytest.importorskip("wandb")
    import wandb
    assert wandb.run is None
    torch.manual_seed(0)
    model = MLP()
    monitor = Monitor(model, log="wandb", flush_every=4)
    with pytest.warns(RuntimeWarning, match="there is no W&B run"):
        run(monitor, model, 8)
    monitor.close()


@pytest.mark.parametrize("log, message", [
    ("wandbx", "log='wandbx' is not a destination gradscope knows"),
    (42, "log=42: not a destination"),
    (LiveLog, None),
])
def test_a_bad_destination_fails_at_once(log, message):
    if log is LiveLog:
        shared = LiveLog(print)
        Monitor(MLP(), log=shared)
        with pytest.raises(GradscopeError, match="this LiveLog already logs a Monitor"):
            Monitor(MLP(), log=shared)
        with pytest.raises(GradscopeError, match="findings='loud' is not a severity"):
            LiveLog(print, findings="loud")
        with pytest.raises(GradscopeError, match="findings_every=-1"):
            LiveLog(print, findings_every=-1)
        with pytest.raises(GradscopeError, match="top=0"):
            LiveLog(print, top=0)
        return
    with pytest.raises(GradscopeError, match=message):
        Monitor(MLP(), log=log)


def test_a_loop_that_raises_still_sends_what_reached_the_host_and_its_error_goes_on():
    torch.manual_seed(0)
    model, sink = MLP(), Collect()
    with pytest.raises(RuntimeError, match="a corrupt batch"):
        with Monitor(model, log=sink, flush_every=4) as monitor:
            run(monitor, model, 10)
            raise RuntimeError("a corrupt batch")
    assert sink.steps() == list(range(8))  # two flushes reached the host; the device's last two are left alone
