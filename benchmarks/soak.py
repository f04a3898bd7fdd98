"""Soak: a Monitor over 100,000 real training steps of a small model, in one process.

What a Monitor left on for a whole run must show: memory that stops growing (the series store thins
itself, the spike trackers are online, the black box is a fixed ring), a per-step time that stays flat,
and a report() whose time does not grow with the steps observed. Every ``--every`` steps it prints the
peak and current RSS, the mean time per training step (forward, backward, observe, optimizer step) over
that block, and the time of a report() taken there (best of three). The last lines are the ratios the claims rest on,
each measured in this one run: peak RSS at the end over at the first checkpoint, the last block's step
time over the first's, and the last report()'s time over the first's.

Run alone (two torch processes on two cores slow each other): OMP_NUM_THREADS=1 python benchmarks/soak.py
(--steps 20000 --every 2000 for a quick look).
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch
from torch import nn

from gradscope import Monitor


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(model, optimizer=optimizer)
    w = torch.randn(16, 1)
    xs = torch.randn(64, 32, 16)  # a fixed pool of batches: no allocation in the data path
    ys = xs @ w
    rows = []
    block_start = time.perf_counter()
    print(f"{'steps':>8} {'peak RSS MB':>12} {'RSS MB':>8} {'ms/step':>8} {'report() s':>11}")
    for step in range(1, args.steps + 1):
        x, y = xs[step % 64], ys[step % 64]
        optimizer.zero_grad(set_to_none=False)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        monitor.observe(loss)
        optimizer.step()
        if step % args.every == 0:
            per_step = (time.perf_counter() - block_start) / args.every * 1e3
            took = float("inf")
            for _ in range(3):  # best of three: a report() reads the same figures each time
                t = time.perf_counter()
                report = monitor.report()
                took = min(took, time.perf_counter() - t)
            assert report.statistics.model.steps == step
            rows.append((step, peak_rss_mb(), current_rss_mb(), per_step, took))
            print(f"{step:>8} {rows[-1][1]:>12.1f} {rows[-1][2]:>8.1f} {per_step:>8.3f} {took:>11.3f}", flush=True)
            block_start = time.perf_counter()
    first, last = rows[0], rows[-1]
    print(f"peak RSS at {last[0]:,} / at {first[0]:,} steps: {last[1] / first[1]:.3f} ({last[1] - first[1]:+.1f} MB)")
    print(f"step time, last block / first block: {last[3] / first[3]:.3f}")
    print(f"report() at {last[0]:,} / at {first[0]:,} steps: {last[4] / first[4]:.3f}")


if __name__ == "__main__":
    main()
