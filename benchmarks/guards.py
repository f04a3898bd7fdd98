"""Overhead of Clipper's guards against plain ``torch.nn.utils.clip_grad_norm_``, in whole training steps.

For each model, identical copies train side by side in one process under AdamW, each step ending in one
way of clipping: ``clip_grad_norm_(params, 1.0)`` (the reference), ``Clipper("norm", 1.0,
skip=Skip())`` (clip plus the skip-step guard, watching the loss and the norm) and
``Clipper("adaptive", 2.5)`` (ZClip's threshold). The arms take turns in rotating order, so all see the
same machine state; it prints the median step time of each and its ratio to the reference, and the
clipping call alone on the same gradients (median of repeated calls).
Run: OMP_NUM_THREADS=1 python benchmarks/guards.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import CPU_MODELS, on, sync, timed_step  # noqa: E402

from gradscope import Clipper, Skip  # noqa: E402


def arms(model: torch.nn.Module) -> Dict[str, Callable[[torch.Tensor], object]]:
    """One clipping hook per arm, each over its own copy of the model."""
    skip, adaptive = Clipper("norm", 1.0, skip=Skip()), Clipper("adaptive", 2.5)
    models = {k: copy.deepcopy(model) for k in ("clip_grad_norm_", "clip+skip", "adaptive")}
    hooks = {
        "clip_grad_norm_": lambda m: (lambda loss: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)),
        "clip+skip": lambda m: (lambda loss: skip(m, loss=loss)),
        "adaptive": lambda m: (lambda loss: adaptive(m, loss=loss)),
    }
    return {k: (models[k], hooks[k](models[k])) for k in models}


def call_ms(model: torch.nn.Module, hook, loss: torch.Tensor, repeats: int = 50) -> float:
    """The clipping call alone, on the gradients the last step left (a guard's window keeps filling)."""
    device = next(model.parameters()).device
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        hook(loss)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name: str, pairs: int, device: torch.device) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    model, batch, loss_fn = on(device, name)
    runs = arms(model)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in runs.items()}
    times: Dict[str, list] = {k: [] for k in runs}
    names = list(runs)
    for i in range(-3, pairs):  # three warm-up rounds, untimed
        for k in names[i % len(names):] + names[:i % len(names)]:
            m, hook = runs[k]
            took = timed_step(m, opts[k], batch, loss_fn, hook)
            if i >= 0:
                times[k].append(took)
    reference = statistics.median(times["clip_grad_norm_"])
    out = {}
    for k, (m, hook) in runs.items():
        loss = loss_fn(m, batch()).detach()
        out[k] = {"step_ms": statistics.median(times[k]) * 1e3, "ratio": statistics.median(times[k]) / reference,
                  "call_ms": call_ms(m, hook, loss)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    pairs = 8 if args.quick else 30
    print(f"{'model':<14}{'arm':<17}{'step ms':>9}{'/ clip_grad_norm_':>19}{'call ms':>10}")
    for name in CPU_MODELS:
        for arm, row in measure(name, pairs, device).items():
            print(f"{name:<14}{arm:<17}{row['step_ms']:>9.2f}{row['ratio']:>19.3f}{row['call_ms']:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
