"""A plain DDP loop under torchrun with a recording Monitor, in which one rank dies (tests/test_distributed.py).

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/dist_recorder.py OUTPUT DYING_RANK STEP
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradscope  # noqa: E402
from models import MLP, mse, regression_batches  # noqa: E402


def main(output: str, dying: int, at: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(MLP())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches = regression_batches(seed=rank)
    with gradscope.Monitor(model, output=output) as monitor:
        for step in range(40):
            if rank == dying and step == at:
                raise RuntimeError(f"a corrupt shard on rank {rank}")
            opt.zero_grad()
            loss = mse(model, batches())
            loss.backward()
            monitor.observe(loss)
            opt.step()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
