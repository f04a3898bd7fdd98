"""A plain DDP loop under torchrun with a recording Monitor, in which one rank dies (tests/test_distributed.py).

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/dist_recorder.py OUTPUT DYING_RANK STEP
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradscope  # noqa: E402
from models import ddp_regression, mse  # noqa: E402


def main(output: str, dying: int, at: int) -> None:
    rank, model, opt, batches = ddp_regression()
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
