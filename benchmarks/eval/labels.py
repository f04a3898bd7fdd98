"""Check a set's labels on the grid alone, before gradscope's advice runs on it.

For every scenario and seed: the held-out loss at the start (l0), unclipped training, and the half-decade
grid 0.01 .. 100, each trained the scenario's full length. An explode label holds where the grid confirms
it as ``run.py`` scores it (``confirmed``: the best threshold ends at least 5% of l0 below l0 and unclipped
training gives back at least half of that); a healthy label where unclipped training ends within R 0.05 of
the grid's best. It runs no profile and no trial, so a set's learning rates can be chosen with it without
the advice ever being seen.

Run: python benchmarks/eval/labels.py [--set kinds] [--seeds 3] [--jobs 2]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import GAIN, GRID, LOSS, SETS, eval_loss, fixed, train  # noqa: E402

HEALTHY_R = 0.05  # a healthy label: unclipped training ends within this regret of the grid's best


def check(job):
    registry, name, seed = job
    import torch
    torch.set_num_threads(1)
    scenario = SETS[registry][name]
    l0 = eval_loss(scenario.build(seed))
    none = train(scenario.build(seed))
    grid = {t: train(scenario.build(seed), fixed(t)) for t in GRID}
    best = min(grid, key=grid.get)
    star = grid[best]
    r_none = (min(none, l0) - star) / (l0 - star) if l0 > star else 0.0
    if scenario.label == "explode":
        holds = l0 - star >= GAIN * abs(l0) and r_none >= LOSS
    elif scenario.label == "healthy":
        holds = r_none <= HEALTHY_R
    else:
        holds = True
    return name, seed, scenario.label, l0, none, best, star, r_none, holds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=[s for s in SETS if s != "long"], default="kinds")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    jobs = [(args.set, name, seed) for name in SETS[args.set] for seed in range(args.seeds)]
    os.environ["OMP_NUM_THREADS"] = "1"
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(check, jobs)
    print("| scenario | seed | label | l0 | unclipped | best threshold | its loss | R unclipped | label holds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, seed, label, l0, none, best, star, r_none, holds in rows:
        print(f"| {name} | {seed} | {label} | {l0:.4g} | {none:.4g} | {best:g} | {star:.4g} | {r_none:.3f} | "
              f"{'yes' if holds else 'NO'} |")
    print(f"{sum(r[-1] for r in rows)} of {len(rows)} labels hold")


if __name__ == "__main__":
    main()
