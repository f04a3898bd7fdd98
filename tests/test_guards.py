"""The skip-step guard and adaptive clipping: their decisions against a host-side reference, no host read
on any step, and a state that survives a save and a load."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradscope
from gradscope import Clipper, Skip
from gradscope.errors import GradscopeError

from test_distributed import free_port
from test_monitor import _HostReads
from conftest import HANG_S


def _run(clipper, steps=120, spikes=(40, 41, 90), seed=0, model=None, make_loss=False):
    """Train a small regression MLP whose batches at ``spikes`` have targets x50; returns the norms seen
    before the guard acted and the gradient norm the optimizer got after it."""
    torch.manual_seed(seed)
    model = model or nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=g)
    before, after = [], []
    for step in range(steps):
        x = torch.randn(32, 8, generator=g)
        y = x @ w * (50.0 if step in spikes else 1.0)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        before.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
        clipper(model, loss=loss if make_loss else None)
        after.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
        opt.step()
    return before, after


def _reference_skips(norms, z=6.0, window=128, min_history=16, max_consecutive=8, max_skips=8):
    """The rule written plainly on the host: skipped values stay out of the window, and an outlier past
    ``max_consecutive`` skips in a row, or ``max_skips`` in the last ``window`` steps, re-bases the guard:
    the values it skipped within the window enter it, and so does that outlier."""
    kept, skipped, flags, held = [], [], [], []
    for step, n in enumerate(norms):
        recent = kept[-window:]
        if len(recent) >= min_history:
            mean, std = np.mean(recent), np.std(recent, ddof=1)
            if (n - mean) / max(std, 1e-12) > z:
                run = next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))
                if run >= max_consecutive or sum(flags[-window:]) >= max_skips:
                    kept += [v for s, v in held if step - s < window]
                    held, flags = [], [False] * len(flags)
                else:
                    skipped.append(step)
                    flags.append(True)
                    held.append((step, n))
                    continue
        kept.append(n)
        flags.append(False)
    return skipped


def test_skip_zeroes_exactly_the_steps_a_plain_z_score_rule_skips():
    clipper = Clipper("none", None, skip=Skip())
    before, after = _run(clipper)
    skipped = [s for s, n in enumerate(after) if n == 0.0]
    assert skipped == _reference_skips(before) and 40 in skipped and 90 in skipped
    assert all(a == pytest.approx(b, rel=1e-6) for s, (b, a) in enumerate(zip(before, after)) if s not in skipped)
    counts = clipper.counts()
    assert counts["steps"] == 120 and counts["skipped"] == len(skipped) and counts["clipped"] == 0
    assert [e["step"] for e in counts["events"]] == skipped
    assert all(e["scale"] == 0.0 and e["z"] > 6 for e in counts["events"])


def test_skip_watches_the_loss_when_given_it():
    with_loss = Clipper("none", None, skip=Skip())
    _run(with_loss, make_loss=True)
    assert with_loss.counts()["skipped"] >= 2
    events = with_loss.counts()["events"]
    assert {40, 90} <= {e["step"] for e in events}


def test_clip_plus_skip_clips_ordinary_steps_and_zeroes_the_outliers():
    clipper = Clipper("norm", 0.5, skip=Skip())
    before, after = _run(clipper)
    skipped = _reference_skips(before)
    for step, (b, a) in enumerate(zip(before, after)):
        expected = 0.0 if step in skipped else min(b, 0.5 * b / (b + 1e-6))
        assert a == pytest.approx(expected, rel=1e-5, abs=1e-7), step
    counts = clipper.counts()
    assert counts["clipped"] == sum(b > 0.5 for s, b in enumerate(before) if s not in skipped)
    assert 0 < counts["mean_clip_scale"] < 1


def _reference_zclip(norms, z=2.5, alpha=0.97, warmup=25):
    out, mean, var = [], None, None
    for step, n in enumerate(norms):
        if step < warmup:
            out.append(n)
            continue
        if mean is None:
            mean, var = float(np.mean(norms[:warmup])), float(np.var(norms[:warmup]))
        limit = mean + z * math.sqrt(var)
        used = min(n, limit)
        out.append(used)
        delta = used - mean
        mean += (1 - alpha) * delta
        var = alpha * (var + (1 - alpha) * delta * delta)
    return out


def test_adaptive_clips_as_zclip_does():
    clipper = Clipper("adaptive", 2.5)
    before, after = _run(clipper)
    expected = _reference_zclip(before)
    assert after == pytest.approx(expected, rel=1e-4)
    assert clipper.counts()["clipped"] == sum(e < b * (1 - 1e-5) for b, e in zip(before, expected)) > 0
    assert clipper.counts()["adaptive_threshold"] > 0


def _guarded_step(model, x):
    model.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("make", [lambda: Clipper("norm", 1.0, skip=Skip()), lambda: Clipper("adaptive", 2.5),
                                  lambda: Clipper("value", 0.1, skip=Skip(min_history=2))])
def test_no_host_read_on_any_guarded_step(make):
    """On the meta device any read of a value would raise; and none is counted."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to("meta")
    clipper = make()
    with _HostReads() as counter:
        for _ in range(30):
            loss = _guarded_step(model, torch.randn(16, 64, device="meta"))
            clipper(model, loss=loss)
    assert counter.count == 0
    with pytest.raises(NotImplementedError, match="meta"):
        clipper.counts()  # reading the counts is the one copy to the host


def test_no_host_read_on_an_attached_optimizer_step():
    """The exact skip (copy before the step, put back after it where skipped) reads no value either."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    clipper = Clipper("norm", 1.0, skip=Skip(min_history=2)).attach(opt)
    with _HostReads() as counter:
        for _ in range(12):
            loss = _guarded_step(model, torch.randn(16, 64, device="meta"))
            clipper(model, loss=loss)
            opt.step()
    assert counter.count == 0


def test_state_survives_a_save_and_a_load_through_the_optimizer():
    """A run stopped at step 60 and resumed from the optimizer's state dict skips as the unbroken one."""
    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, Clipper("norm", 1.0, skip=Skip()).attach(opt)

    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    batches = [(x, x @ w * (60.0 if s in (70, 95) else 1.0)) for s in range(120)
               for x in [torch.randn(32, 8, generator=g)]]

    def train(model, opt, clipper, steps):
        for x, y in steps:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            clipper(model, loss=loss)
            opt.step()

    model, opt, clipper = fresh()
    train(model, opt, clipper, batches)
    unbroken = clipper.counts()
    assert unbroken["skipped"] >= 2

    model, opt, clipper = fresh()
    train(model, opt, clipper, batches[:60])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    assert "gradscope_clipper" in saved[1]
    model, opt, clipper = fresh()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])  # the Clipper's state goes back with the optimizer's
    train(model, opt, clipper, batches[60:])
    assert clipper.counts() == unbroken

    model, opt, clipper = fresh()
    model.load_state_dict(saved[0])
    opt.load_state_dict({k: v for k, v in saved[1].items() if k != "gradscope_clipper"})
    train(model, opt, clipper, batches[60:])
    assert clipper.counts() != unbroken  # without the state, the window starts empty: the check can fail


def test_bad_guard_settings_are_clear_errors():
    with pytest.raises(GradscopeError, match="z must be a positive"):
        Skip(z=0)
    with pytest.raises(GradscopeError, match="min_history"):
        Skip(window=8, min_history=16)
    with pytest.raises(GradscopeError, match="skip must be a gradscope.Skip"):
        Clipper("norm", 1.0, skip=6)
    with pytest.raises(GradscopeError, match="no guard"):
        Clipper("norm", 1.0).load_state_dict({"step": torch.zeros(())})
    assert gradscope.Skip is Skip


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_skip_decision_is_the_same_on_two_ranks_as_in_one_process(tmp_path, strategy):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    script = Path(__file__).resolve().parent / "dist_guard.py"
    alone = tmp_path / "alone.json"
    subprocess.run([sys.executable, str(script), str(alone)], check=True, timeout=HANG_S,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"})
    port, ranked = free_port(), tmp_path / "ranked.json"
    procs = [subprocess.Popen([sys.executable, str(script), str(ranked), strategy],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    assert [p.wait(timeout=HANG_S) for p in procs] == [0, 0]
    one, two = json.loads(alone.read_text()), json.loads(ranked.read_text())
    assert one["skipped"] and {30, 75} <= set(one["skipped"])
    assert two == one


def test_the_advice_counts_with_the_rule_the_clipper_applies():
    """replay_skips (what a report counts, on the host) names the steps the Clipper skips on the device."""
    from gradscope.advise.guards import replay_skips
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    clipper = Clipper("none", None, skip=Skip(min_history=8))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 1, generator=g)
    norms, losses = [], []
    for step in range(80):
        x = torch.randn(32, 8, generator=g)
        y = x @ w * (20.0 if step in (25, 60) else 1.0)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
        losses.append(float(loss.detach()))
        clipper(model, loss=loss)
        opt.step()
    skipped = [e["step"] for e in clipper.counts()["events"]]
    assert {25, 60} <= set(skipped)
    assert replay_skips(norms, losses, Skip(min_history=8)) == skipped


# -- a skip is a skip, and a new level is not a spike (the snippet's path: attach, then clipper(model, loss)) --

OPTIMIZERS = {
    "adamw-weight-decay": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, weight_decay=0.01),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=0.01),
}


def _snippet_run(make_opt, steps, scale, seed=0, observe=None):
    """Train a LayerNorm MLP through the documented snippet; ``scale(step)`` multiplies that step's loss.
    ``observe(step, model, opt, before)`` is called after each step with the state dicts from before it."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 1))
    opt = make_opt(model.parameters())
    clipper = Clipper("none", None, skip=Skip()).attach(opt)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(8, 1, generator=g)
    for step in range(steps):
        x = torch.randn(32, 8, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x @ w) * scale(step)
        loss.backward()
        before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())) if observe else None
        clipper(model, loss=loss)
        opt.step()
        if observe:
            observe(step, model, opt, before)
    return clipper


def _same_state(a, b):
    if set(a) != set(b):
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_skipped_step_leaves_the_weights_and_the_optimizer_state_bit_identical(name):
    seen = {}

    def observe(step, model, opt, before):
        weights, state = before
        seen[step] = (all(torch.equal(weights[k], v) for k, v in model.state_dict().items()),
                      all(_same_state(a, b) for a, b in zip(state["state"].values(), opt.state_dict()["state"].values())))
    clipper = _snippet_run(OPTIMIZERS[name], 80, lambda s: 1e4 if s == 60 else 1.0, observe=observe)
    counts = clipper.counts()
    skipped = [e["step"] for e in counts["events"]]
    assert skipped == [60]  # a single x1e4 spike after 60 steps is skipped, and nothing else
    assert seen[60] == (True, True)
    assert seen[59] == (False, False) and seen[61] == (False, False)  # the steps around it did train
    assert counts["skip_kind"] == ("found_inf" if name == "adam-fused" else "restore")


@pytest.mark.parametrize("name", ["adamw-weight-decay", "sgd-momentum", "adam-fused"])
def test_a_skipped_first_step_leaves_no_trace(name):
    """A non-finite first step, skipped, then training: the same weights as a run that never saw it."""
    def train(skip_first):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = OPTIMIZERS[name](model.parameters())
        clipper = Clipper("none", None, skip=Skip()).attach(opt)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            x = torch.randn(8, 4, generator=g)
            if step == 0 and not skip_first:
                continue
            opt.zero_grad()
            loss = model(x).pow(2).mean() * (math.inf if step == 0 else 1.0)
            loss.backward()
            clipper(model, loss=loss)
            opt.step()
        return [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(train(True), train(False)))


def test_a_sustained_rise_of_the_loss_is_a_new_level_not_300_skips():
    clipper = _snippet_run(OPTIMIZERS["adamw-weight-decay"], 360, lambda s: 30.0 if s >= 60 else 1.0)
    counts = clipper.counts()
    after = [e["step"] for e in counts["events"] if e["step"] >= 60]
    assert 1 <= len(after) <= 16
    assert counts["rebased"] >= 1 and counts["rebase_steps"][0] >= 60


def test_a_second_spike_soon_after_a_first_is_still_caught():
    clipper = _snippet_run(OPTIMIZERS["adamw-weight-decay"], 100, lambda s: {60: 1e4, 64: 50.0}.get(s, 1.0))
    assert [e["step"] for e in clipper.counts()["events"]] == [60, 64]
    assert clipper.counts()["rebased"] == 0


def test_the_device_rule_re_bases_where_the_plain_reference_does():
    """A level that moves by x5 for good and then spikes: the Clipper skips exactly the reference's steps."""
    rng = np.random.default_rng(0)
    norms = list(1 + 0.05 * rng.standard_normal(300))
    norms = [n * (5 if s >= 100 else 1) * (40 if s in (50, 200) else 1) for s, n in enumerate(norms)]
    from gradscope.run.clipper.guard_state import GuardState
    state = GuardState(Skip(), None, torch.device("cpu"))
    device = [s for s, n in enumerate(norms) if bool(state.decide(torch.tensor(n, dtype=torch.float32), None, None)[1])]
    assert device == _reference_skips(norms)
    assert 50 in device and 200 in device and 100 in device and len(device) <= 10


@pytest.mark.parametrize("seed", range(4))
def test_the_device_rule_and_the_host_replay_agree_on_level_shifts_growth_and_spikes(seed):
    """What a report counts (replay, on the host) is what the Clipper does (on the device), re-bases included."""
    from gradscope.advise.guards import replay
    from gradscope.run.clipper.guard_state import GuardState
    rng = np.random.default_rng(seed)
    steps = np.arange(600)
    level = np.where(steps < 200, 1.0, 4.0) * np.exp(np.maximum(steps - 400, 0) / 80.0)  # a shift, then growth
    norms = level * np.exp(0.1 * rng.standard_normal(600))
    norms[rng.choice(600, 12, replace=False)] *= 30.0  # spikes
    losses = 2.0 + 0.05 * rng.standard_normal(600) + np.where(steps > 450, 3.0, 0.0)
    state = GuardState(Skip(), None, torch.device("cpu"))
    device = [s for s in range(600) if bool(state.decide(torch.tensor(norms[s], dtype=torch.float32),
                                                         torch.tensor(losses[s], dtype=torch.float32), None)[1])]
    host = replay(norms.astype(np.float32), losses.astype(np.float32), Skip())
    assert device == list(host.skipped)
    assert state.counts()["rebased"] == len(host.rebased) >= 1
    assert state.counts()["rebase_steps"] == list(host.rebased)


def test_an_optimizer_that_keeps_its_state_on_the_host_is_refused_in_one_clear_error():
    class Counting(torch.optim.SGD):  # keeps a Python int in its state, as LBFGS does
        def step(self, closure=None):
            for p in self.param_groups[0]["params"]:
                self.state[p]["calls"] = self.state[p].get("calls", 0) + 1
            return super().step(closure)
    model = nn.Linear(4, 1)
    opt = Counting(model.parameters(), lr=0.1)
    clipper = Clipper("none", None, skip=Skip()).attach(opt)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        clipper(model)
        with pytest.raises(GradscopeError, match="outside tensors"):
            opt.step()


def test_a_step_count_kept_apart_from_the_decision_is_refused_in_one_clear_error():
    """Meta stands for an accelerator where capturable=True is not offered: AdamW counts its steps on the host."""
    model = nn.Linear(4, 1).to("meta")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    clipper = Clipper("none", None, skip=Skip()).attach(opt)
    model(torch.randn(8, 4, device="meta")).pow(2).mean().backward()
    clipper(model)
    with pytest.raises(GradscopeError, match="fused=True"):
        opt.step()


def test_an_unattached_skip_says_it_only_zeroes_the_gradient():
    clipper = Clipper("none", None, skip=Skip())
    _run(clipper, steps=20)
    assert clipper.counts()["skip_kind"] == "gradient zeroed"


def test_a_bad_bound_is_a_clear_error():
    for bad in (dict(max_consecutive=0), dict(max_rate=0.0), dict(max_rate=1.5)):
        with pytest.raises(GradscopeError, match="max_consecutive"):
            Skip(**bad)
