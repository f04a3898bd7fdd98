"""Train with a skip guard alone or as one of the ranks torchrun's environment describes; write the steps
the guard skipped. Run by test_guards.py: python dist_guard.py OUTPUT.json [ddp|fsdp]"""
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from gradscope import Clipper, Skip

GLOBAL_BATCH, STEPS, SPIKES = 32, 100, (30, 31, 75)


def main(output: str, strategy: str = "ddp") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    if world > 1 and strategy == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif world > 1:
        from torch.distributed.fsdp import fully_shard
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    clipper = Clipper("norm", 1.0, skip=Skip(min_history=8))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    per = GLOBAL_BATCH // world
    skipped = []
    for step in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 8, generator=g)
        y = x @ w * (40.0 if step in SPIKES else 1.0)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        clipper(model)
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
        if all(float(g.abs().max()) == 0.0 for g in grads):
            skipped.append(step)
        opt.step()
    counts = clipper.counts()
    if rank == 0:
        with open(output, "w") as f:
            json.dump({"skipped": skipped, "counts": {k: counts[k] for k in ("steps", "skipped", "clipped")}}, f)
    if world > 1:
        # Let go of the DDP model (its reducer holds tensors that gloo's threads may still reference) while
        # the interpreter is whole: torch 2.13 with gloo can abort at exit (SIGABRT, "terminate called
        # without an active exception") when that happens at interpreter finalization instead.
        del model, opt, clipper
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
