"""Time of Monitor.report() (statistics, rules, advice) against the number of layers and of observed steps.

For each size, a model of L tiny Linear layers is observed for S steps with synthetic gradients (set
directly, no backward: only the analysis is timed), then report() is timed, best of three. Peak memory
of the stored history is printed too: the series store thins itself past its capacity, so it stays
bounded whatever S is.
Run: OMP_NUM_THREADS=1 python benchmarks/analysis.py [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from gradscope import Monitor


def observed(layers: int, steps: int) -> Monitor:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
    monitor = Monitor(model)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    for step in range(steps):
        scale = 1.0 + 0.01 * step
        for g in grads:
            g.normal_().mul_(scale)
        monitor.observe(torch.tensor(1.0 / scale))
    return monitor


def history_bytes(monitor: Monitor) -> int:
    store = monitor._ledger.series
    return sum(v.nbytes for rows in store.fields.values() for v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args()
    sizes = [(10, 100), (100, 100), (100, 1000)] if args.quick else \
        [(10, 100), (100, 100), (100, 1000), (1000, 100), (1000, 1000), (1000, 4000)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; report() best of 3")
    print(f"{'layers':>7}{'steps':>7}{'report s':>10}{'history MiB':>13}")
    for layers, steps in sizes:
        monitor = observed(layers, steps)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            monitor.report()
            times.append(time.perf_counter() - start)
        print(f"{layers:>7}{steps:>7}{min(times):>10.3f}{history_bytes(monitor) / 2**20:>13.1f}", flush=True)
    print("history: the per-step series kept for the statistics (thinned past 1024 rows, so it stops growing)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
