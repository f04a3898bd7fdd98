"""Watching the run's own clipping: pre- and post-clip norms against a naive reference, the clip rate over
the run and over windows, the share capped and the cosine for value clipping and AGC, the Clipper's own
counts, and no host read on the hot path."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import Clipper, Monitor
from gradscope.run.clipper.apply import _clip_unitwise
from gradscope.analyse.clipping import LoopClipping, levels, longest_rate
from gradscope.collect.clipping import FIRST_BLOCK, WINDOW_BLOCKS, ClippingCounter, parse
from gradscope.errors import GradscopeError

from models import MLP, regression_batches
from test_monitor import _HostReads


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def watched(clip, apply, steps: int = 40, scale=lambda step: 1.0, lr: float = 1e-2, width: int = 32):
    """A plain loop that clips with ``apply`` after observing; returns the report and, step by step, the
    naive reference: the global norm before and after ``apply``, and the clipped-unclipped cosine."""
    torch.manual_seed(0)
    model = MLP(width=width)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches = regression_batches(scale=3.0)
    monitor = Monitor(model, clip=clip)
    reference = []
    for step in range(steps):
        opt.zero_grad()
        (scale(step) * mse(model, batches())).backward()
        monitor.observe()
        before = [p.grad.detach().double().clone() for p in model.parameters()]
        apply(model)
        after = [p.grad.detach().double() for p in model.parameters()]
        pre = math.sqrt(sum(float(g.square().sum()) for g in before))
        post = math.sqrt(sum(float(g.square().sum()) for g in after))
        dot = sum(float((a * b).sum()) for a, b in zip(before, after))
        capped = sum(int((a != b).sum()) for a, b in zip(before, after))
        reference.append({"pre": pre, "post": post, "cosine": dot / (pre * post), "capped": capped})
        opt.step()
    return monitor.report(), reference


def clipping_json(report) -> dict:
    return json.loads(report.to_json())["clipping"]


def test_norm_clipping_pre_and_post_norms_match_clip_grad_norm():
    report, ref = watched(0.5, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
    m = report.statistics.model  # the figures themselves; the JSON rounds to 6 significant digits
    assert m.global_norm.tolist() == pytest.approx([r["pre"] for r in ref], rel=1e-6)
    assert m.post_clip_norm.tolist() == pytest.approx([r["post"] for r in ref], rel=1e-6)
    clip = clipping_json(report)
    assert clip["post_clip_norm"] == pytest.approx([r["post"] for r in ref], rel=1e-5)
    clipped = sum(r["post"] < r["pre"] * (1 - 1e-9) for r in ref)
    assert clip["clipped"] == clipped and clip["rate"] == pytest.approx(clipped / len(ref))
    assert clip["method"] == "norm" and clip["threshold"] == 0.5 and clip["source"] == "Monitor"
    assert sum(clip["windows"]["steps"]) == 40 and clip["windows"]["steps"][0] == FIRST_BLOCK


def test_value_clipping_share_capped_and_cosine_match_clip_grad_value():
    report, ref = watched(("value", 0.02), lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 0.02))
    clip, m = clipping_json(report), report.statistics.model
    assert m.post_clip_norm.tolist() == pytest.approx([r["post"] for r in ref], rel=1e-6)
    assert m.clip_cosine.tolist() == pytest.approx([r["cosine"] for r in ref], rel=1e-6)
    elements = sum(p.numel() for p in MLP().parameters())
    capped = sum(r["capped"] for r in ref) / (elements * len(ref))
    assert 0 < capped < 1 and clip["capped_fraction"] == pytest.approx(capped, rel=1e-6)
    assert clip["cosine_min"] == pytest.approx(min(r["cosine"] for r in ref), rel=1e-5)


def test_agc_post_norm_and_cosine_match_a_unitwise_reference():
    def agc(model):
        for p in model.parameters():
            _clip_unitwise(p, 0.01, 1e-3)
    report, ref = watched(("agc", 0.01), agc)
    clip = clipping_json(report)
    assert clip["post_clip_norm"] == pytest.approx([r["post"] for r in ref], rel=1e-5)
    assert clip["cosine"] == pytest.approx([r["cosine"] for r in ref], rel=1e-5)
    assert 0 < clip["capped_fraction"] <= 1 and clip["rate"] > 0


def clipped_by(clipper, steps: int, spike=None) -> Monitor:
    """A plain loop that clips with ``clipper`` and tells its Monitor so; step ``spike``'s loss 1e4x."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches = regression_batches()
    monitor = Monitor(model, clip=clipper)
    for step in range(steps):
        opt.zero_grad()
        loss = mse(model, batches()) * (1e4 if step == spike else 1.0)
        loss.backward()
        monitor.observe(loss)
        clipper(model)
        opt.step()
    return monitor


def test_a_clipper_that_clips_is_watched_with_its_guard_counts():
    clipper = Clipper("norm", 0.5, skip=gradscope.Skip(z=3, min_history=8))
    spike = 30
    monitor = clipped_by(clipper, 40, spike)
    clip = clipping_json(monitor.report())
    assert clip["source"] == "Clipper" and clip["guard"]["skipped"] == 1
    assert spike in clip["spike_steps"]
    assert clip["guard"]["skip_kind"] == "gradient zeroed" and clip["guard"]["rebased"] == 0
    text = " ".join(monitor.report().render(width=100).split())
    assert "the guard skipped 1 step (gradient zeroed only: attach the Clipper" in text


def test_a_watched_guard_that_re_based_says_so():
    """A sustained x30 rise of the loss from step 30: the guard skips 8 in a row, then takes the new level.
    (Clipping at 1e6 never binds: the Monitor watches a Clipper that clips.)"""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clipper = Clipper("norm", 1e6, skip=gradscope.Skip()).attach(opt)
    batches = regression_batches()
    monitor = Monitor(model, clip=clipper)
    for step in range(80):
        opt.zero_grad()
        loss = mse(model, batches()) * (30.0 if step >= 30 else 1.0)
        loss.backward()
        monitor.observe(loss)
        clipper(model, loss=loss)
        opt.step()
    guard = clipping_json(monitor.report())["guard"]
    assert guard["skip_kind"] == "restore" and guard["rebased"] == 1 and guard["skipped"] == 8
    text = " ".join(monitor.report().render(width=100).split())
    assert "the guard skipped 8 steps, re-based 1 time on a new level" in text and "gradient zeroed" not in text


def test_the_clip_rate_over_the_run_lives_in_bounded_windows():
    tally = ClippingCounter(LoopClipping("norm", 1.0))
    rng = np.random.default_rng(0)
    for step in range(5000):  # the first 1,000 steps above the threshold, the rest below
        norm = 5.0 if step < 1000 else 0.2
        tally.record(step, norm * math.exp(rng.normal(0, 0.1)), np.zeros(3), math.nan)
    record = tally.record_of()
    assert len(record.blocks) <= WINDOW_BLOCKS and record.blocks[:, 1].sum() == 5000
    assert record.clipped == 1000 and record.rate() == pytest.approx(0.2)
    rate, span = longest_rate(record)
    assert rate == 1.0 and span >= 100
    start, recent = levels(record)
    assert start == pytest.approx(5.0, rel=0.05) and recent == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), "1.0", ("adaptive", 2.5), ("nope", 1.0), True])
def test_a_bad_clip_is_one_gradscope_error(clip):
    with pytest.raises(GradscopeError, match="clip="):
        parse(clip)


def test_watching_value_clipping_reads_nothing_on_the_host_between_flushes():
    """The meta device, as in test_monitor: the clip sums stay on the device until the row is flushed."""
    torch.manual_seed(0)
    model = MLP(width=300, d_in=300).to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for clip in (1.0, ("value", 0.1), ("agc", 0.01)):
        monitor = Monitor(model, flush_every=8, clip=clip)
        reads = []
        for _ in range(7):
            opt.zero_grad()
            model(torch.randn(16, 300, device="meta")).pow(2).mean().backward()
            with _HostReads() as counter:
                monitor.observe()
            reads.append(counter.count)
        assert reads == [0] * 7, clip


def test_the_terminal_and_html_reports_show_the_clipping(tmp_path):
    report, _ = watched(0.5, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
    text = gradscope.render_text(report, width=100) if hasattr(gradscope, "render_text") else None
    if text is None:
        from gradscope.present.render import render_text
        text = render_text(report, width=100)
    assert "post-clip" in text and "clip rate" in text and "norm clipping at 0.5, set in the Monitor" in text
    pytest.importorskip("matplotlib")
    from gradscope.present.html import to_html
    page = to_html(report)
    assert "Your clipping" in page and 'id="clip-rate"' in page and 'id="post-clip-norm"' in page


def test_no_clip_no_clipping_section():
    torch.manual_seed(0)
    model = MLP()
    monitor = Monitor(model)
    mse(model, regression_batches()()).backward()
    monitor.observe()
    report = monitor.report()
    assert json.loads(report.to_json())["clipping"] is None
    assert not any(f.rule_id.startswith("clipping-") for f in report.findings)
    assert math.isnan(report.statistics.model.metrics["clip_rate"])


def test_an_adaptive_clipper_is_reported_from_its_own_counts():
    from gradscope.present.render import render_text
    clipper = Clipper("adaptive", 2.0, warmup=5)
    report = clipped_by(clipper, 30).report()
    counts = clipper.counts()
    assert report.statistics.model.metrics["clip_steps"] == counts["steps"] == 30
    assert report.statistics.model.metrics["clip_rate"] == pytest.approx(counts["clipped"] / 30)
    text = render_text(report, width=100)
    assert "adaptive clipping at z 2, set in the Clipper: acted on" in text and "✕" not in text


@pytest.mark.parametrize("method, threshold", [("value", 0.02), ("agc", 0.01)])
def test_a_clipper_clipping_by_value_or_agc_is_watched_as_it_clips(method, threshold):
    """Clipper's AGC leaves the head alone, as timm's examples do: the Monitor counts it as timm would."""
    clipper = Clipper(method, threshold)
    report, ref = watched(clipper, clipper)
    m = report.statistics.model
    assert m.post_clip_norm.tolist() == pytest.approx([r["post"] for r in ref], rel=1e-5)
    assert m.clip_cosine.tolist() == pytest.approx([r["cosine"] for r in ref], rel=1e-5)
    assert m.clip.spec.source == "Clipper" and m.metrics["clip_rate"] > 0
