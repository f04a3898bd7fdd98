"""Overhead of gradscope.Monitor observing every step, against the same plain training loop.

For each model size, three identical copies train side by side in one process: plain steps,
observed steps and floor steps (the physical floor of observing, one _foreach_norm over every
gradient plus one host copy, as the step's only extra work) take turns in rotating order, so all see
the same machine state. Prints the median step time of each and the ratios to plain (the floor
step's is the least an exact per-step norm can cost), and observe() alone against the floor, timed
on the same gradients in the same run.
Models: an MLP (8 tensors), a small transformer, a deep narrow model with 801 tensors, and a 12-layer
Hugging Face GPT-2 built from its config. A 2-process DDP case (gloo, CPU; ``--ddp-only`` runs it
alone) trains the MLP under DistributedDataParallel in rotating arms: plain, observed, the same Monitor
waiting for its step's collective at once (as it did before the collective was left in flight until
the flush), Lightning's ``grad_norm`` logged, and a plain step plus gradscope's per-step collective alone.
With ``--device cuda`` the same runs on a GPU (each timed step, observe() and the floor end in a device
sync, so device time is counted), with GPT-2 small at its real size (124M parameters) added and no DDP,
and it counts the CUDA kernels one observe() launches (torch.profiler, over 16 calls); on the CPU it
counts the top-level aten ops instead (each would be a kernel launch on a GPU), beside the floor's.
With ``--guards`` it times Clipper's guards instead, against plain ``clip_grad_norm_``: identical copies
train under AdamW, each step ending in ``clip_grad_norm_(params, 1.0)`` (the reference),
``Clipper("norm", 1.0, skip=Skip())`` (clip plus the skip-step guard, watching the loss and the norm),
unattached (a skip zeroes the gradient) and attached to the optimizer (a skip is exact: the step's
tensors copied and put back where skipped), or ``Clipper("adaptive", 2.5)`` (ZClip's threshold), and the
same attached guard on fused AdamW (a skip through ``found_inf``) against fused AdamW's own
``clip_grad_norm_``, in rotating order; it prints each arm's median step time, its ratio to its
reference, and the clipping call alone on the same gradients. ``--guards --compile`` does the same with
every arm's model ``torch.compile``d (inductor), the clipping eager between backward and the step.
With ``--clip`` (``1.0``, ``value:0.01`` or ``agc:0.01``) a fourth arm's Monitor is told of the loop's
clipping (``Monitor(clip=...)``), to price watching it: its step ratio and observe() alone are printed
beside the plain observed arm's.
With ``--sink`` an arm's Monitor streams to a live log (``Monitor(log=sink)``, a function that keeps the
numbers it is handed, as a logger's queue does), to price the live log beside the same Monitor without one.
With ``--every N ...`` an arm per N observes every N-th step (``Monitor(every=N)``), for the price of each.
With ``--peers`` two more arms take what a user would pick instead: Lightning's ``grad_norm`` logged each
step, and a histogram of every gradient each step (as ``wandb.watch`` makes one).
Every run ends with observe()'s parts timed alone on the same gradients (the norms, the maxima, the
sample's copy, its runs, the dot, and the rest), beside observe() on a light step and on the sampled ones.
Run: python benchmarks/overhead.py [--quick] [--device cuda] [--guards [--compile]] [--clip SPEC] [--every N ...] [--peers]
     [--sink] [--no-ddp | --ddp-only]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from gradscope import Clipper, Monitor, Skip


def mlp() -> Tuple[nn.Module, Callable[[], Tuple[torch.Tensor, ...]], Callable]:
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    x, y = torch.randn(512, 512), torch.randint(0, 10, (512,))
    return model, lambda: (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])


def transformer() -> Tuple[nn.Module, Callable[[], Tuple[torch.Tensor, ...]], Callable]:
    vocab, d, seq, batch = 2000, 256, 128, 16

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = nn.Linear(d, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(self.embed(tokens), is_causal=True,
                                         mask=nn.Transformer.generate_square_subsequent_mask(seq)))

    tokens = torch.randint(0, vocab, (batch, seq + 1))
    return LM(), lambda: (tokens[:, :-1], tokens[:, 1:]), \
        lambda m, b: nn.functional.cross_entropy(m(b[0]).reshape(-1, vocab), b[1].reshape(-1))


def many_tensors() -> Tuple[nn.Module, Callable[[], Tuple[torch.Tensor, ...]], Callable]:
    """Deep and narrow: 200 Linear+LayerNorm blocks, 801 parameter tensors (an LLM's count, not its size)."""
    width = 64
    blocks = [m for _ in range(200) for m in (nn.Linear(width, width), nn.LayerNorm(width))]
    model = nn.Sequential(*blocks, nn.Linear(width, 1))
    x, y = torch.randn(64, width), torch.randn(64, 1)
    return model, lambda: (x, y), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])


def gpt2() -> Tuple[nn.Module, Callable[[], Tuple[torch.Tensor, ...]], Callable]:
    """Hugging Face GPT-2 built from its config: 12 layers, narrowed to run on 2 cores (148 tensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    config = GPT2Config(vocab_size=2000, n_positions=128, n_embd=128, n_layer=12, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    tokens = torch.randint(0, 2000, (8, 128))
    return GPT2LMHeadModel(config), lambda: (tokens,), lambda m, b: m(input_ids=b[0], labels=b[0]).loss


def gpt2_small() -> Tuple[nn.Module, Callable[[], Tuple[torch.Tensor, ...]], Callable]:
    """GPT-2 small at its real size (124M parameters, 148 tensors), batch 8 x 512: for a GPU."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tokens = torch.randint(0, config.vocab_size, (8, 512))
    return GPT2LMHeadModel(config), lambda: (tokens,), lambda m, b: m(input_ids=b[0], labels=b[0]).loss


MODELS = {"mlp": mlp, "transformer": transformer, "many_tensors": many_tensors, "gpt2": gpt2,
          "gpt2_small": gpt2_small}
CPU_MODELS = ["mlp", "transformer", "many_tensors", "gpt2"]  # GPT-2 small takes seconds a step on 2 cores


def sync(device: torch.device) -> None:
    """Wait for the device, so that a timing counts its work and not only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on(device: torch.device, name: str):
    """The model, its batch and its loss, on ``device``."""
    model, batch, loss_fn = MODELS[name]()
    held = tuple(t.to(device) for t in batch())
    return model.to(device), lambda: held, loss_fn


def floor_ms(model: nn.Module, repeats: int = 50) -> float:
    """The physical floor of observing a step: one ``_foreach_norm`` over every gradient plus one host copy."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    times = []
    for _ in range(repeats):
        sync(grads[0].device)
        start = time.perf_counter()
        torch.stack(torch._foreach_norm(grads)).cpu()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def observe_ms(model: nn.Module, monitor: Monitor, repeats: int = 48) -> Tuple[float, float]:
    """observe() alone on the same gradients (the weights do not move, so the update is measured as zero):
    the median and the mean, in ms. The mean also carries the work done every 4th step (the histogram,
    the weights) and the flush every 16th; ``repeats`` is a multiple of 16 so that it carries its share."""
    times, device = [], next(model.parameters()).device
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        monitor.observe()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, statistics.mean(times) * 1e3


def pieces(model: nn.Module, monitor: Monitor, repeats: int = 48) -> Dict[str, float]:
    """observe()'s parts, each timed alone on the same gradients (medians, ms), for its first bucket: the
    norms (one ``_foreach_norm``, the floor's pass), the maxima (on a CPU one ``aminmax`` per large
    gradient), the sample's copy, the norms and maxima of its runs, and the dot with the last step;
    beside observe() on a step with no sampled work ("light": no histogram, no snapshot, no update), on
    a step that counts the histogram and reads the update, and on one that copies the weights."""
    device = next(model.parameters()).device
    bucket = monitor._figures.buckets[0]  # noqa: SLF001 (a benchmark times the parts)
    zero = torch.zeros((), device=device)

    def ms(call: Callable[[], object]) -> float:
        return call_ms(model, lambda _: call(), None, repeats)
    cpu = device.type == "cpu"
    with torch.no_grad():
        index, grads = bucket.gradients()
        full = bucket._full(index, grads, zero)  # noqa: SLF001
        large = [full[i] for i in bucket.off_grad]
        whole = bucket.sample.rest_views(False)
        out = {"norms": ms(lambda: bucket.norms(whole + large)),
               "maxima": ms(lambda: bucket.maxima(whole, bucket.sample.rest_views(True) if cpu else [], large)),
               "copy": ms(lambda: bucket.sample.copy(index, grads, len(bucket.params), None)),
               "runs": ms(lambda: bucket.sample.run_figures(cpu)),
               "dots": ms(lambda: bucket.sample.dots(zero))}
    cadence, kinds = monitor._cadence, {"light": [], "histogram": [], "snapshot": []}  # noqa: SLF001
    for _ in range(4 * repeats):
        step = monitor.steps
        kind = ("histogram" if cadence.counted(step) else "snapshot" if cadence.snapshots(step)
                else "light" if not cadence.measures_update(step, cadence.optimizer_steps) else None)
        sync(device)
        start = time.perf_counter()
        monitor.observe()
        sync(device)
        if kind is not None:
            kinds[kind].append(time.perf_counter() - start)
    out.update({k: statistics.median(v) * 1e3 for k, v in kinds.items() if v})
    out["rest"] = out["light"] - sum(out[k] for k in ("norms", "maxima", "copy", "runs", "dots"))
    return out


def launches(call: Callable[[], object], device: torch.device) -> int:
    """What one call launches: on CUDA its kernels, on the CPU its top-level aten ops (those not called
    by another aten op: each would be a launch on an accelerator), counted by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        sync(device)
    if device.type == "cuda":
        cuda = torch.autograd.DeviceType.CUDA
        return sum(e.count for e in prof.key_averages() if e.device_type == cuda)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def launches_per_observe(model: nn.Module, monitor: Monitor, calls: int = 16) -> Dict[str, float]:
    """Launches of observe() over ``calls`` consecutive calls (16: its share of the histogram and weight
    steps, every 4th, and of the flush, every 16th): the most on a step that counts no histogram, the
    most on one that does, the mean; and the floor's (one ``_foreach_norm``, a stack and a host copy)."""
    device = next(model.parameters()).device
    plain, counted = [], []
    for _ in range(calls):
        histogram = monitor.steps % monitor.histogram_every == 0
        (counted if histogram else plain).append(launches(monitor.observe, device))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    floor = launches(lambda: torch.stack(torch._foreach_norm(grads)).cpu(), device)
    return {"plain": max(plain), "histogram": max(counted), "mean": (sum(plain) + sum(counted)) / calls,
            "floor": floor}


def floor_hook(model: nn.Module) -> Callable[[torch.Tensor], None]:
    """The floor as a step's hook: what any exact per-step, per-tensor norm must at least do."""
    params = list(model.parameters())
    return lambda loss: torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])).cpu()


def lightning_hook(model: nn.Module) -> Callable[[torch.Tensor], None]:
    """Lightning's ``grad_norm`` (each parameter's norm and the total), logged each step: its values handed
    to a logger as numbers, as ``self.log_dict(grad_norm(self, 2))`` in ``on_before_optimizer_step`` does."""
    from lightning.pytorch.utilities import grad_norm
    logged: Dict[str, float] = {}
    return lambda loss: logged.update({k: float(v) for k, v in grad_norm(model, 2).items()})


def histogram_hook(model: nn.Module, bins: int = 64) -> Callable[[torch.Tensor], None]:
    """A histogram of every gradient each step, as ``wandb.watch(model, log="gradients")`` makes one: each
    tensor's min and max read to the host, ``histc`` over that range in 64 bins, copied to the host."""
    params = list(model.parameters())

    def hook(loss: torch.Tensor) -> None:
        for p in params:
            if p.grad is not None:
                flat = p.grad.reshape(-1)
                lo, hi = flat.min().item(), flat.max().item()
                flat.histc(bins=bins, min=lo, max=hi).cpu()
    return hook


def timed_step(model: nn.Module, opt: torch.optim.Optimizer, batch, loss_fn,
               hook: Optional[Callable[[torch.Tensor], object]] = None) -> float:
    device = next(model.parameters()).device
    sync(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch())
    loss.backward()
    if hook is not None:
        hook(loss)
    opt.step()
    sync(device)
    return time.perf_counter() - start


def kept_sink() -> Callable[[Dict[str, float], int], None]:
    """A live log's destination that keeps the last 1024 steps it was handed, as a logger's queue would."""
    kept: list = []

    def sink(metrics: Dict[str, float], step: int) -> None:
        kept.append((step, metrics))
        del kept[:-1024]
    return sink


def rules_ms(model: nn.Module, batch, loss_fn, steps: int = 300, repeats: int = 5) -> float:
    """What the live log's findings cost when they run (at most every 30 s): the report's rules on the
    steps a Monitor has recorded, after ``steps`` observations of one gradient; the median, in ms."""
    from gradscope.analyse.ruleset import load_rules
    from gradscope.pipeline import assess
    monitor = Monitor(model)
    loss = loss_fn(model, batch())
    loss.backward()
    for _ in range(steps):
        monitor.observe(loss)
    monitor.flush()
    rules, times = load_rules(None), []
    for _ in range(repeats):
        start = time.perf_counter()
        assess(monitor.recorded(), rules)
        times.append(time.perf_counter() - start)
    monitor.close()
    return statistics.median(times) * 1e3


def measure(name: str, pairs: int, device: torch.device, clip=None, every=(), peers: bool = False,
            sink: bool = False) -> Dict[str, float]:
    """Alternate a plain step, an observed step and a floor step (the floor as the step's hook), and with
    ``clip`` a step observed by a Monitor told of that clipping, with ``peers`` a step logging Lightning's
    ``grad_norm`` and one taking a histogram of every gradient, ``pairs`` times in rotating order, after
    a warm-up of each."""
    torch.manual_seed(0)
    plain_model, batch, loss_fn = on(device, name)
    observed_model, floor_model = copy.deepcopy(plain_model), copy.deepcopy(plain_model)
    monitor = Monitor(observed_model)
    arms = {"plain": (plain_model, None), "observed": (observed_model, monitor.observe),
            "floor": (floor_model, floor_hook(floor_model))}
    if clip is not None:
        watched_model = copy.deepcopy(plain_model)
        watcher = Monitor(watched_model, clip=clip)
        arms["watched"] = (watched_model, watcher.observe)
    for n in every:  # a Monitor observing every n-th step
        sparse_model = copy.deepcopy(plain_model)
        arms[f"every {n}"] = (sparse_model, Monitor(sparse_model, every=n).observe)
    if sink:  # the same Monitor, streaming each step to a live log
        logged_model = copy.deepcopy(plain_model)
        arms["logged"] = (logged_model, Monitor(logged_model, log=kept_sink()).observe)
    if peers:
        for arm, make in (("lightning", lightning_hook), ("histogram", histogram_hook)):
            peer_model = copy.deepcopy(plain_model)
            arms[arm] = (peer_model, make(peer_model))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in arms.items()}
    times: Dict[str, list] = {k: [] for k in arms}
    n = len(arms)
    for i in range(-3, pairs):  # three warm-up rounds, untimed
        order = list(arms)[i % n:] + list(arms)[:i % n]  # none always goes first
        for k in order:
            model, hook = arms[k]
            took = timed_step(model, opts[k], batch, loss_fn, hook)
            if i >= 0:
                times[k].append(took)
    plain, observed = times["plain"], times["observed"]
    params = sum(p.numel() for p in plain_model.parameters())
    p, o = statistics.median(plain), statistics.median(observed)
    floor, (alone, alone_mean) = floor_ms(observed_model), observe_ms(observed_model, monitor)
    return {"params": params, "tensors": len(list(plain_model.parameters())), "plain_ms": p * 1e3,
            "observed_ms": o * 1e3, "ratio": o / p, "pair_ratio": statistics.median(b / a for a, b in zip(plain, observed)),
            "floor_step_ratio": statistics.median(times["floor"]) / p,
            "mean_ratio": statistics.mean(observed) / statistics.mean(plain),
            "floor_ms": floor, "observe_ms": alone, "over_floor": alone / floor,
            "observe_mean_ms": alone_mean,
            "mean_over_floor": alone_mean / floor,
            "launches": launches_per_observe(observed_model, monitor),
            "pieces": pieces(observed_model, monitor),
            "peers": {k: statistics.median(times[k]) / p for k in ("lightning", "histogram") if k in times},
            "every": {n: statistics.median(times[f"every {n}"]) / p for n in every},
            **({} if not sink else {"logged_ratio": statistics.median(times["logged"]) / p,
                                    "logged_pair": statistics.median(b / a for a, b in zip(observed, times["logged"])),
                                    "rules_ms": rules_ms(arms["logged"][0], batch, loss_fn)}),
            **({} if clip is None else {
                "watched_ratio": statistics.median(times["watched"]) / p,
                "watched_observe_ms": observe_ms(watched_model, watcher)[0]})}


def guard_arms(model: torch.nn.Module) -> Dict[str, tuple]:
    """One arm per way of clipping, each over its own copy of the model with its own AdamW: (model,
    optimizer, hook). The attached arms skip exactly (gradscope.run.clipper.skipping): by copying back on the
    default AdamW, through found_inf on the fused one, which has its own clip_grad_norm_ reference."""
    arms = {}
    for name, fused, make in [
            ("clip_grad_norm_", False, None),
            ("clip+skip", False, lambda: Clipper("norm", 1.0, skip=Skip())),
            ("clip+skip attached", False, lambda: Clipper("norm", 1.0, skip=Skip())),
            ("adaptive", False, lambda: Clipper("adaptive", 2.5)),
            ("fused clip_grad_norm_", True, None),
            ("fused clip+skip attached", True, lambda: Clipper("norm", 1.0, skip=Skip()))]:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused or None)
        if make is None:
            hook = (lambda m: lambda loss: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0))(m)
        else:
            clipper = make()
            if "attached" in name:
                clipper.attach(opt)
            hook = (lambda c, m: lambda loss: c(m, loss=loss))(clipper, m)
        arms[name] = (m, opt, hook)
    return arms


def call_ms(model: torch.nn.Module, hook, loss: torch.Tensor, repeats: int = 50) -> float:
    """A call alone (a step's hook, given ``loss``), on the gradients the last step left: the median, in ms."""
    device = next(model.parameters()).device
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        hook(loss)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_guards(name: str, pairs: int, device: torch.device, compiled: bool = False) -> Dict[str, Dict[str, float]]:
    """The guard arms side by side; ``compiled``: each arm's model is ``torch.compile``d (inductor), the
    clipping running eagerly between its backward and the optimizer's step, as in a user's compiled loop."""
    torch.manual_seed(0)
    model, batch, loss_fn = on(device, name)
    runs = guard_arms(model)
    if compiled:  # the fused arms' reference is the same with or without compile: left out, to save compiling
        runs = {k: (torch.compile(m), opt, hook) for k, (m, opt, hook) in runs.items() if not k.startswith("fused")}
    times: Dict[str, list] = {k: [] for k in runs}
    names = list(runs)
    for i in range(-3, pairs):  # three warm-up rounds, untimed
        for k in names[i % len(names):] + names[:i % len(names)]:
            m, opt, hook = runs[k]
            took = timed_step(m, opt, batch, loss_fn, hook)
            if i >= 0:
                times[k].append(took)
    out = {}
    for k, (m, opt, hook) in runs.items():
        reference = statistics.median(times["fused clip_grad_norm_" if k.startswith("fused") else "clip_grad_norm_"])
        loss = loss_fn(m, batch()).detach()
        out[k] = {"step_ms": statistics.median(times[k]) * 1e3, "ratio": statistics.median(times[k]) / reference,
                  "call_ms": call_ms(m, hook, loss)}
    return out


def _ddp_worker(rank: int, world: int, port: int, pairs: int, queue) -> None:
    """One rank of the DDP case: the arms' steps in rotating order (the same order on every rank, as their
    collectives must match): plain DDP, observed by a Monitor, the same Monitor waiting for its step's
    collective at once, Lightning's ``grad_norm`` logged, and a plain step plus the collective alone."""
    import os

    import torch.distributed as dist
    from gradscope.collect import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, batch, loss_fn = mlp()
    models = {k: nn.parallel.DistributedDataParallel(copy.deepcopy(model)) for k in DDP_ARMS}
    monitor, waited = Monitor(models["observed"]), Monitor(models["observed, collective waited"])
    ctx = distributed.context()
    width, tensors = monitor._figures.layout.reduced_width, len(monitor._figures.layout.groups)  # the per-step collective's parts

    def wait_at_once(loss: torch.Tensor) -> None:  # what the Monitor paid when each step waited for its collective
        waited.observe(loss)
        if waited._queue.waiting:
            waited._queue.waiting[-1].tensors.result()

    hooks = {"plain": None, "observed": monitor.observe, "observed, collective waited": wait_at_once,
             "lightning grad_norm": lightning_hook(models["lightning grad_norm"]),
             "collective alone": lambda loss: distributed.Gathered(torch.zeros(width), torch.zeros(tensors), ctx).result()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: Dict[str, list] = {k: [] for k in DDP_ARMS}
    n = len(DDP_ARMS)
    for i in range(-3, pairs):  # three warm-up rounds, untimed
        for k in DDP_ARMS[i % n:] + DDP_ARMS[:i % n]:
            took = timed_step(models[k], opts[k], batch, loss_fn, hooks[k])
            if i >= 0:
                times[k].append(took)
    if rank == 0:
        queue.put({"params": sum(p.numel() for p in model.parameters()),
                   **{k: statistics.median(v) * 1e3 for k, v in times.items()},
                   "pair": statistics.median(b / a for a, b in zip(times["plain"], times["observed"]))})
    dist.barrier()
    dist.destroy_process_group()


DDP_ARMS = ["plain", "observed", "observed, collective waited", "lightning grad_norm", "collective alone"]


def measure_ddp(pairs: int, world: int = 2) -> Dict[str, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_worker, args=(world, port, pairs, queue), nprocs=world, join=True)
    return queue.get()


def print_ddp(pairs: int) -> None:
    r = measure_ddp(pairs)
    print(f"\n2-process DDP on gloo, mlp ({r['params']:,} params, 1 thread per rank), {pairs} rounds in rotating "
          f"order, rank 0's median step (ms) and its ratio to plain:")
    for k in DDP_ARMS:
        print(f"  {k:<30}{r[k]:>8.1f}{r[k] / r['plain']:>8.3f}")
    print(f"  observed over plain, the median of per-round pairs: {r['pair']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs (a smoke run, noisier)")
    parser.add_argument("--pairs", type=int, default=60, help="rounds of plain, observed and floor steps per model "
                                                              "(default 60)")
    parser.add_argument("--models", nargs="*", choices=list(MODELS),
                        help=f"default: {' '.join(CPU_MODELS)} (on cuda: all of {' '.join(MODELS)})")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process DDP case")
    parser.add_argument("--ddp-only", action="store_true", help="run the 2-process DDP case alone")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; on cuda there is no DDP case")
    parser.add_argument("--clip", default=None,
                        help="also time a Monitor told of the loop's clipping: a norm threshold (1.0), value:0.01 "
                             "or agc:0.01")
    parser.add_argument("--every", type=int, nargs="*", default=[],
                        help="also time a Monitor(every=N) per N given, side by side (4 16, say)")
    parser.add_argument("--peers", action="store_true",
                        help="also time what a user would pick instead, side by side: Lightning's grad_norm logged "
                             "each step, and a histogram of every gradient each step (as wandb.watch makes)")
    parser.add_argument("--sink", action="store_true",
                        help="also time a Monitor streaming to a live log (Monitor(log=sink)), side by side")
    parser.add_argument("--guards", action="store_true", help="time Clipper's skip guard and adaptive clipping "
                                                              "against clip_grad_norm_ instead of the Monitor")
    parser.add_argument("--compile", action="store_true",
                        help="with --guards: each arm's model torch.compile'd (inductor), to price a guard in a "
                             "compiled training step")
    args = parser.parse_args()
    device = torch.device(args.device)
    clip = None
    if args.clip is not None:
        method, _, value = args.clip.rpartition(":")
        clip = (method, float(value)) if method else float(value)
    models = args.models or (list(MODELS) if device.type == "cuda" else CPU_MODELS)
    pairs = 4 if args.quick else args.pairs
    if args.ddp_only:
        print(f"torch {torch.__version__}")
        print_ddp(pairs)
        return
    if args.guards:
        print(f"torch {torch.__version__}; {pairs} rounds of each arm in rotating order, AdamW"
              + ("; every model torch.compile'd (inductor), the clipping eager beside it" if args.compile else ""))
        print(f"{'model':<14}{'arm':<26}{'step ms':>9}{'/ clip_grad_norm_':>19}{'call ms':>10}")
        for name in models:
            for arm, row in measure_guards(name, pairs, device, args.compile).items():
                print(f"{name:<14}{arm:<26}{row['step_ms']:>9.2f}{row['ratio']:>19.3f}{row['call_ms']:>10.3f}",
                      flush=True)
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; {pairs} rounds of a plain, an observed and a floor step in "
          "rotating order; Monitor at its defaults, observing every step")
    print(f"{'model':<14}{'params':>12}{'tensors':>8}{'plain ms':>10}{'observed ms':>13}{'ratio':>7}{'pair':>7}{'mean':>7}"
          f"{'floor step':>11}{'floor ms':>10}{'observe ms':>12}{'/floor':>8}{'mean ms':>9}{'/floor':>8}")
    results = []
    for name in models:
        r = measure(name, pairs, device, clip, args.every, args.peers, args.sink)
        results.append((name, r))
        print(f"{name:<14}{r['params']:>12,}{r['tensors']:>8}{r['plain_ms']:>10.1f}{r['observed_ms']:>13.1f}"
              f"{r['ratio']:>7.3f}{r['pair_ratio']:>7.3f}{r['mean_ratio']:>7.3f}{r['floor_step_ratio']:>11.3f}"
              f"{r['floor_ms']:>10.2f}"
              f"{r['observe_ms']:>12.2f}{r['over_floor']:>8.2f}{r['observe_mean_ms']:>9.2f}"
              f"{r['mean_over_floor']:>8.2f}")
    print("ratio: median observed step / median plain step (AdamW); pair: median of per-pair ratios; mean:\n"
          "mean observed step / mean plain step; floor: one _foreach_norm over every gradient plus one host\n"
          "copy; floor step: median step with only the floor in it / median plain step (the least any exact\n"
          "per-step norm costs); observe: observe() alone on the same gradients, median then mean (the mean\n"
          "carries the work of every 4th and 16th step); /floor: over the floor. All side by side in this run.")
    if clip is not None:
        print(f"with Monitor(clip={clip!r}), side by side in the same run: " + "; ".join(
            f"{name} step ratio {r['watched_ratio']:.3f} (observed {r['ratio']:.3f}), observe() "
            f"{r['watched_observe_ms']:.2f} ms (observed {r['observe_ms']:.2f})" for name, r in results))
    if args.every:
        print("with Monitor(every=N), side by side in the same run (median step / median plain step): " + "; ".join(
            f"{name} " + ", ".join(f"every {n} {ratio:.3f}" for n, ratio in r["every"].items()) + f" (every 1 {r['ratio']:.3f})"
            for name, r in results))
    if args.sink:
        print("with Monitor(log=sink), side by side in the same run (median step / median plain step; pair: median of\n"
              "each round's logged step over its observed step): " + "; ".join(
                  f"{name} {r['logged_ratio']:.3f} (without {r['ratio']:.3f}, pair {r['logged_pair']:.3f})"
                  for name, r in results))
        print("its findings, the report's rules on 300 recorded steps (run at a flush, at most every 30 s): " + "; ".join(
            f"{name} {r['rules_ms']:.1f} ms" for name, r in results))
    if args.peers:
        print("\nbeside what a user would pick instead, side by side in the same run (median step / median plain step):")
        print(f"{'model':<14}{'gradscope Monitor':>19}{'Lightning grad_norm':>21}{'histogram each step':>21}"
              f"{'floor step':>12}")
        for name, r in results:
            print(f"{name:<14}{r['ratio']:>19.3f}{r['peers']['lightning']:>21.3f}{r['peers']['histogram']:>21.3f}"
                  f"{r['floor_step_ratio']:>12.3f}")
        print("Lightning grad_norm: each parameter's norm and the total, handed to a logger as numbers each step;\n"
              "histogram: each gradient's min, max and a 64-bin histc, copied to the host (wandb.watch's way)")
    print("\nobserve()'s parts, each timed alone on the same gradients (first bucket; ms, medians):")
    print(f"{'model':<14}{'floor':>7}{'norms':>7}{'maxima':>8}{'copy':>7}{'runs':>7}{'dots':>7}{'rest':>7}{'light':>7}"
          f"{'/floor':>8}{'hist step':>11}{'snap step':>11}")
    for name, r in results:
        q = r["pieces"]
        print(f"{name:<14}{r['floor_ms']:>7.2f}{q['norms']:>7.2f}{q['maxima']:>8.2f}{q['copy']:>7.2f}{q['runs']:>7.2f}"
              f"{q['dots']:>7.2f}{q['rest']:>7.2f}{q['light']:>7.2f}{q['light'] / r['floor_ms']:>8.2f}"
              f"{q.get('histogram', float('nan')):>11.2f}{q.get('snapshot', float('nan')):>11.2f}")
    print("norms: the one _foreach_norm (the floor's own pass); maxima: max |g| (a CPU: one aminmax per large\n"
          "gradient); copy: the sample's; runs: equal-length whole parameters' norms and maxima off the sample;\n"
          "dots: the cosine's; rest: a light observe() less those (Python, the row); light: observe() on a step\n"
          "with no histogram, snapshot or update; hist step: one that counts the histogram and reads the update\n"
          "(every 4th); snap step: one that copies the weights (every 4th)")
    what = "CUDA kernels" if device.type == "cuda" else "top-level aten ops (each a launch on a GPU)"
    print(f"\n{what} per observe(), torch.profiler over 16 calls:")
    print(f"{'model':<14}{'no histogram (max)':>20}{'histogram (max)':>17}{'mean':>8}{'floor':>7}")
    for name, r in results:
        n = r["launches"]
        print(f"{name:<14}{n['plain']:>20}{n['histogram']:>17}{n['mean']:>8.1f}{n['floor']:>7}")
    print("no histogram: a step that counts no |g| histogram (its weights and the flush included); floor:\n"
          "one _foreach_norm over every gradient, a stack and a host copy")
    if not args.no_ddp and device.type == "cpu":
        print_ddp(pairs)


if __name__ == "__main__":
    main()
