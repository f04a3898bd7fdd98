"""How the held-out loss of fixed global-norm thresholds evolves over the steps: the short-horizon question.

For one scenario, every seed and every threshold given, trains from the scenario's start (the same
weights and batches for every threshold), as ``run.train`` trains the evaluation's grid, and prints the
held-out loss (``run.eval_loss``) at checkpoints. docs/advice.md cites it for the LSTM language model, where the 300-step optimum is still
behind a tighter threshold after 90 steps.
Run: python benchmarks/eval/horizon.py SCENARIO THRESHOLD[,THRESHOLD...] [--steps 120] [--seeds 3]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import eval_loss, fixed, train  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402

CHECKPOINTS = (15, 30, 45, 60, 90, 120, 200, 300)


def curve(name: str, seed: int, threshold: float, steps: int) -> dict:
    """The held-out loss at the start and at every checkpoint up to ``steps``, trained as ``run.train``
    trains the evaluation's grid (a run that diverged stops there: its later checkpoints stay inf)."""
    setup = SCENARIOS[name].build(seed)
    setup.steps = steps
    losses = {0: eval_loss(setup), **{n: math.inf for n in CHECKPOINTS if n <= steps}}
    train(setup, fixed(threshold), checkpoints=losses)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=list(SCENARIOS))
    parser.add_argument("thresholds", help="comma-separated global-norm thresholds")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    print(f"{args.scenario}: held-out loss after N steps, clipping the global norm at each threshold")
    for seed in range(args.seeds):
        for threshold in thresholds:
            losses = curve(args.scenario, seed, threshold, args.steps)
            print(f"seed {seed}  clip {threshold:<8g}" + "  ".join(f"{n}: {v:.3f}" for n, v in losses.items()))


if __name__ == "__main__":
    main()
