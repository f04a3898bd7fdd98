"""What a 30-step profile shows of each scenario, unclipped: the signals a detection rule could read.

For every scenario and seed: the median and lower quartile of the step-to-step gradient cosine, the
loss at the end over the loss at the start, and the warning- and error-level findings of the default
rules. docs/advice.md cites it where it asks whether oscillating gradients could flag a stall.
Run: python benchmarks/eval/signals.py [--seeds 3] [--scenarios NAME ...]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenarios import SCENARIOS  # noqa: E402

import gradscope  # noqa: E402

PROFILE_STEPS = 30


def signals(name: str, seed: int) -> str:
    scenario = SCENARIOS[name]
    setup = scenario.build(seed)
    monitor = gradscope.Monitor(setup.model, update_every=1, histogram_sample=1, histogram_every=1, flush_every=1)
    for step in range(PROFILE_STEPS):
        setup.optimizer.zero_grad()
        loss = setup.loss_fn(setup.model, setup.train_batch(step))
        if not math.isfinite(loss.item()):
            break
        loss.backward()
        monitor.observe(loss)
        setup.optimizer.step()
    report = monitor.report()
    metrics, cosine = report.statistics.model.metrics, report.statistics.model.cosine
    findings = sorted({f.rule_id for f in report.findings if f.severity != "info"})
    return (f"| {name} | {scenario.label} | {seed} | {metrics['grad_cosine_median']:+.2f} | "
            f"{np.nanpercentile(cosine, 25):+.2f} | {metrics.get('loss_last_over_start', math.nan):.3g} | "
            f"{', '.join(findings) or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| scenario | label | seed | cosine median | cosine lower quartile | loss last / start | findings |")
    print("|---|---|---|---|---|---|---|")
    for name in args.scenarios:
        for seed in range(args.seeds):
            print(signals(name, seed), flush=True)


if __name__ == "__main__":
    main()
