"""Two ranks under torchrun, for the Monitor's collective in flight (tests/test_distributed.py).

Each step's figures go out in one all_gather that nothing waits for until the flush. Rank 1 reaches each
observe() late (it sleeps first): rank 0's observe() must return at once all the same, and its figures,
once read, must be those the ranks agree on. Then rank 1 observes one step fewer and leaves without a
word: rank 0's report alone keeps the steps whose collectives ended and drops the one that never will.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/dist_inflight.py OUTPUT
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradscope  # noqa: E402
from models import ddp_regression, mse  # noqa: E402

LATE_S = 0.5  # how late rank 1 comes to each observe()
STEPS = 4


def main(output: str) -> None:
    rank, model, opt, batches = ddp_regression()
    monitor = gradscope.Monitor(model, flush_every=16)
    waits, local = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = mse(model, batches())
        loss.backward()  # DDP's all-reduce: both ranks leave it together
        local.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        if rank == 1:
            time.sleep(LATE_S)
        start = time.perf_counter()
        monitor.observe(loss)
        waits.append(time.perf_counter() - start)
        opt.step()
    norms = monitor.profile().series["global_norm"]  # read now: the flush waits for the collectives
    # One more step, its collective started on rank 0 alone: rank 1 leaves without observing it.
    opt.zero_grad()
    with model.no_sync():  # no DDP all-reduce: rank 1 is not there
        mse(model, batches()).backward()
    if rank == 0:
        monitor.observe()
        start = time.perf_counter()
        alone = monitor.profile(alone=True)
        settle_s = time.perf_counter() - start
        Path(output).write_text(json.dumps({"observe_s": waits, "norms": [float(n) for n in norms], "local": local,
                                            "steps_alone": len(alone.series["global_norm"]),
                                            "settle_s": settle_s}))
        os._exit(0)  # the group cannot be torn down with an exchange that never ends
    time.sleep(5)  # leave rank 0 to give up on its last exchange, not to see this rank's socket close
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
