"""Time of Monitor.report() (statistics, rules, advice) against the number of layers and of observed steps.

For each size, a model of L tiny Linear layers is observed for S steps with synthetic gradients (set
directly, no backward: only the analysis is timed), then report() is timed, best of three. Peak memory
of the stored history is printed too: the series store thins itself past its capacity, so it stays
bounded whatever S is.
A second table takes real gradients: a model of 500 Linear+LayerNorm blocks (1,001 layers) trained with
backward() and observed for S steps, where the first layers' norms underflow to 0 at some steps. It
times report(): the first call in a fresh process (what a training script pays at its end: it loads
the analysis, scipy, yaml and the default rules, which importing the Monitor does not), then the
best of three repeated calls; and, side by side on the same norms, the vectorised trends against
trend() column by column (what report() did for every column with such holes).
Run: OMP_NUM_THREADS=1 python benchmarks/analysis.py [--quick]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
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


def observed_for_real(blocks: int, steps: int) -> Monitor:
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16)]
    model = nn.Sequential(*layers, nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = Monitor(model)
    for _ in range(steps):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        monitor.observe(loss)
        optimizer.step()
    return monitor


def best_of(runs: int, call) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def first_report(blocks: int, steps: int) -> float:
    """The first report() of a fresh process that has observed ``steps`` real steps (run by --first)."""
    out = subprocess.run([sys.executable, __file__, "--first", str(blocks), str(steps)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def real_gradients(sizes) -> None:
    from gradscope.analyse.stats import trend, trends
    print()
    print("real gradients (500 Linear+LayerNorm blocks, backward() every step); first report() in a fresh "
          "process, then best of 3")
    print(f"{'layers':>7}{'steps':>7}{'first s':>9}{'report s':>10}{'holed':>7}{'trends s':>10}{'by column s':>13}"
          f"{'ratio':>7}")
    for blocks, steps in sizes:
        first = first_report(blocks, steps)
        monitor = observed_for_real(blocks, steps)
        report_s = best_of(3, monitor.report)
        profile = monitor.profile()
        norms = profile.series["grad_norm"].reshape(-1, len(profile.active))
        holed = int((~(np.isfinite(norms) & (norms > 0))).any(axis=0).sum())
        fast = best_of(3, lambda: trends(profile.series_steps, norms))
        slow = best_of(1, lambda: [trend(profile.series_steps, norms[:, k]) for k in range(norms.shape[1])])
        print(f"{len(profile.active):>7}{steps:>7}{first:>9.3f}{report_s:>10.3f}{holed:>7}{fast:>10.3f}{slow:>13.3f}"
              f"{slow / fast:>7.1f}", flush=True)


def history_bytes(monitor: Monitor) -> int:
    store = monitor._ledger.series
    return sum(rows[:store.count].nbytes for rows in store.fields.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--first", nargs=2, type=int, metavar=("BLOCKS", "STEPS"),
                        help="(internal) observe a fresh real model, time its first report(), print the seconds")
    args = parser.parse_args()
    if args.first:
        monitor = observed_for_real(*args.first)
        start = time.perf_counter()
        monitor.report()
        print(time.perf_counter() - start)
        return
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
    real_gradients([(500, 300)] if args.quick else [(500, 300), (500, 1000)])


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
