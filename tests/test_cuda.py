"""The Monitor, the Clipper and diagnose on a CUDA GPU: no host sync between flushes, the same figures as
a naive reference, bit-identical whatever the flush interval. Skipped where torch sees no GPU (CI has none)."""
from __future__ import annotations

import traceback
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import ProfileOptions
from gradscope import Clipper, Monitor

from models import MLP, exploding_rnn, mse, regression_batches
from test_amp import amp_overflow, assert_measured_unscaled, assert_skips_counted, scaled_loop
from test_monitor import _twin_run, assert_bit_identical, assert_matches_reference, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class ManyTensors(nn.Module):
    """Whole small parameters in runs, a ragged tail, and a large (sampled) weight; with ``unused``, a large
    and a small layer that never get a gradient, as experts a router did not pick."""

    def __init__(self, unused: bool) -> None:
        super().__init__()
        blocks = [m for _ in range(40) for m in (nn.Linear(64, 64), nn.LayerNorm(64))]
        self.body = nn.Sequential(nn.Linear(300, 64), *blocks, nn.Linear(64, 300), nn.Linear(300, 300),
                                  nn.Linear(300, 1))
        self.idle = nn.ModuleList([nn.Linear(300, 300), nn.Linear(8, 8)]) if unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Syncs:
    """Where the device was made to wait: CUDA's sync debug mode, each warning kept with its stack."""

    def __init__(self) -> None:
        self.stacks = []

    def __enter__(self) -> "_Syncs":
        torch.cuda.set_sync_debug_mode("warn")  # (before the catch: turning it on warns that it is a prototype)
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._keep
        return self

    def _keep(self, message, *_args, **_kwargs) -> None:
        if "synchroniz" in str(message):
            self.stacks.append("".join(traceback.format_stack(limit=8)[:-2]))

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)


@pytest.mark.parametrize("unused, dtype, every, log", [(False, torch.float32, 1, False),
                                                       (True, torch.float32, 1, False),
                                                       (False, torch.bfloat16, 1, False),
                                                       (False, torch.float32, 3, False),
                                                       (False, torch.float32, 1, True)])
def test_no_sync_on_a_step_that_does_not_flush(unused, dtype, every, log):
    """Every step but the 16th observed one (the flush) runs with no sync, the steps between observed
    ones under ``every`` included (the one after a weight copy, the one before an observed step), and
    with a live log (``log=``), which sends at the flush."""
    torch.manual_seed(0)
    model = ManyTensors(unused).to("cuda", dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sent = []
    # defaults: flush every 16, histogram and update every 4
    monitor = Monitor(model, every=every, log=(lambda metrics, step: sent.append(step)) if log else None)
    x, y = torch.randn(32, 300, device="cuda", dtype=dtype), torch.randn(32, 1, device="cuda", dtype=dtype)
    syncs = []
    for step in range(15 * every + 1):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        with _Syncs() as seen:
            result = monitor.observe(loss)
        syncs.append(seen.stacks)
        opt.step()
    assert syncs[:-1] == [[]] * (len(syncs) - 1), "\n".join(s for step in syncs for s in step)
    assert syncs[-1], "the 16th observed step flushes: its one copy to the host must be seen (or this check sees nothing)"
    assert result["step"] == 15 * every and np.isfinite(result["global_norm"])
    assert sent == (list(range(15)) if log else [])  # the 16th step waits for the next flush


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_figures_match_a_naive_reference_on_the_gpu(dtype):
    _, profile, refs, _, _ = train({"update_every": 1, "histogram_every": 1}, device="cuda", dtype=dtype)
    assert_matches_reference(profile, refs)


def test_figures_are_bit_identical_whether_flushed_every_step_or_every_16_on_the_gpu():
    assert_bit_identical(_twin_run(1, device="cuda"), _twin_run(16, device="cuda"))


@pytest.mark.parametrize("unscale_first", [False, True])
def test_gradscaler_gradients_are_measured_unscaled_on_the_gpu(unscale_first):
    assert_measured_unscaled(*scaled_loop(unscale_first=unscale_first, device="cuda"))


def test_gradscaler_skipped_steps_are_counted_as_skipped_on_the_gpu():
    assert_skips_counted(amp_overflow(0.5, device="cuda"))


@pytest.mark.parametrize("method", ["norm", "value", "agc"])
def test_clipper_on_the_gpu_matches_the_cpu(method):
    """The same gradients (made on the CPU, copied to the GPU) clipped on each device."""
    torch.manual_seed(0)
    cpu = MLP(width=64, d_in=8)
    gpu = MLP(width=64, d_in=8).cuda()
    gpu.load_state_dict(cpu.state_dict())
    mse(cpu, regression_batches(scale=100.0)()).backward()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        b.grad = a.grad.cuda()
    before = [p.grad.clone() for p in cpu.parameters()]
    Clipper(method, 0.05)(cpu)
    Clipper(method, 0.05)(gpu)
    assert any(not torch.equal(a, p.grad) for a, p in zip(before, cpu.parameters())), "nothing was clipped"
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.allclose(a.grad, b.grad.cpu(), rtol=1e-5, atol=1e-7)


def test_diagnose_with_trials_on_the_gpu():
    """The whole flow, trials included, on an exploding RNN moved to the GPU by ``device``."""
    report = gradscope.diagnose(exploding_rnn(), steps=30, trials=4, profile=ProfileOptions(device="cuda"))
    assert report.statistics.model.device.startswith("cuda")
    assert report.recommendation.method == "norm" and report.recommendation.threshold > 0
    assert any(f.severity == "error" for f in report.findings)


@pytest.mark.parametrize("make", [lambda: Clipper("norm", 1.0, skip=gradscope.Skip(min_history=4)),
                                  lambda: Clipper("adaptive", 2.5, warmup=4)])
def test_no_sync_on_any_guarded_step(make):
    """The skip guard and adaptive clipping decide on the device: CUDA's sync debug mode sees no wait."""
    torch.manual_seed(0)
    model = ManyTensors(False).to("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clipper = make()
    x, y = torch.randn(32, 300, device="cuda"), torch.randn(32, 1, device="cuda")
    syncs = []
    for step in range(24):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y * (50.0 if step == 20 else 1.0))
        loss.backward()
        with _Syncs() as seen:
            clipper(model, loss=loss)
        syncs.append(seen.stacks)
        opt.step()
    assert syncs == [[]] * 24, "\n".join(s for step in syncs for s in step)
    with _Syncs() as seen:
        counts = clipper.counts()
    assert seen.stacks, "counts() copies to the host: the check must see it (or it sees nothing)"
    assert counts["steps"] == 24 and (counts["skipped"] + counts["clipped"]) >= 1


@pytest.mark.parametrize("fused", [False, True])
def test_an_attached_skip_is_exact_and_makes_no_sync_on_the_gpu(fused):
    """The snippet's path on the GPU: AdamW as users make it (attach turns on capturable, so its step count
    lives on the device) and fused AdamW (found_inf). The spike step leaves weights and state bit-identical,
    and neither the Clipper nor the optimizer's step waits on the host."""
    torch.manual_seed(0)
    model = ManyTensors(False).to("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=fused or None)
    clipper = Clipper("none", None, skip=gradscope.Skip(min_history=4)).attach(opt)
    x, y = torch.randn(32, 300, device="cuda"), torch.randn(32, 1, device="cuda")
    syncs, before = [], None
    for step in range(24):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y * (1e4 if step == 20 else 1.0))
        loss.backward()
        if step == 20:
            before = ([p.detach().clone() for p in model.parameters()],
                      [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()])
        with _Syncs() as seen:
            clipper(model, loss=loss)
            opt.step()
        syncs.append(seen.stacks)
        if step == 20:
            assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
            assert all(torch.equal(v, opt.state[p][k]) for p, s in zip(model.parameters(), before[1])
                       for k, v in s.items())
    assert syncs[5:] == [[]] * 19, "\n".join(s for step in syncs for s in step)  # the first steps make state
    counts = clipper.counts()
    assert [e["step"] for e in counts["events"]] == [20]
    assert counts["skip_kind"] == ("found_inf" if fused else "restore")


def test_guarded_clipper_on_the_gpu_decides_as_on_the_cpu():
    from test_guards import _run
    cpu_before, cpu_after = _run(Clipper("norm", 0.5, skip=gradscope.Skip()))
    gpu_before, gpu_after = _run(Clipper("norm", 0.5, skip=gradscope.Skip()), device="cuda")
    assert [a == 0.0 for a in cpu_after] == [a == 0.0 for a in gpu_after]
    assert gpu_after == pytest.approx(cpu_after, rel=1e-4, abs=1e-6)


class SplitOverDevices(nn.Module):
    """A model split by hand: its first layer on the GPU, its head on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32).cuda()
        self.b = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.cuda())).cpu())


def split_experiment(lr: float = 2.0) -> gradscope.Experiment:
    torch.manual_seed(0)
    model = SplitOverDevices()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g) * 3, torch.randn(16, 1, generator=g) * 3) for _ in range(200)]
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=lr), batches, loss_fn=mse,
                                name="split")


@pytest.mark.parametrize("make", [lambda: Clipper("norm", 0.5), lambda: Clipper("value", 0.05),
                                  lambda: Clipper("agc", 0.01), lambda: Clipper("norm", 0.5, skip=gradscope.Skip()),
                                  lambda: Clipper("adaptive", 2.5, warmup=1)])
def test_a_model_split_over_devices_is_clipped(make):
    experiment = split_experiment()
    model = experiment.model
    mse(model, experiment.batches[0]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    total = float(torch.sqrt(sum(g.double().square().sum().cpu() for g in grads)))
    clipper = make()
    clipper(model)
    if clipper.method == "norm":
        for g, p in zip(grads, model.parameters()):
            assert torch.allclose(p.grad, g * min(1.0, 0.5 / (total + 1e-6)), rtol=1e-5), p.device
    assert model.a.weight.grad.is_cuda and not model.b.weight.grad.is_cuda


def test_trials_put_a_split_model_back_on_its_devices():
    experiment = split_experiment()
    report = gradscope.diagnose(experiment, steps=30, trials=4)
    assert report.recommendation.evidence.trials is not None
    assert experiment.model.a.weight.is_cuda and not experiment.model.b.weight.is_cuda
