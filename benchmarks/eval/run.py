"""Evaluate gradscope's clipping advice against a grid-search oracle and the common baselines.

For every scenario and seed, each method trains the same model from the same initial weights on the
same batches, differing only in clipping. Each run is scored on held-out batches by normalised regret
R = (l~ - l*) / (l0 - l*), where l0 is the held-out loss at initialisation, l~ = min(l, l0) (a diverged
run scores 1) and l* is the best of the threshold grid. Methods:
  none         no clipping
  grid (oracle) global-norm thresholds at half-decades 0.01..100 and 0.1x..10x the median profiled norm
  fixed-1.0    norm clipping at 1.0 (the Hugging Face default)
  autoclip     AutoClip: the 10th percentile of the norm history so far (Seetharaman et al. 2020)
  zclip        ZClip: EMA mean/std of the norm (alpha 0.97), clip at mean + 2.5 std after 25 warm-up steps
  gradscope    diagnose (30 steps, from the same start), then train from step 0 with gradscope.Clipper
Run: python benchmarks/eval/run.py [--quick] [--scenarios NAME ...]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenarios import SCENARIOS, Scenario, Setup  # noqa: E402

import gradscope  # noqa: E402

PROFILE_STEPS = 30
GRID = [10 ** (k / 2) for k in range(-4, 5)]  # 0.01 .. 100 in half-decades
MEDIAN_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
Policy = Callable[[int, float, List[float]], Optional[float]]  # step, norm, history -> threshold


def fixed(threshold: float) -> Policy:
    return lambda step, norm, history: threshold


def autoclip(percentile: float = 10.0) -> Policy:
    return lambda step, norm, history: float(np.percentile(history + [norm], percentile))


def zclip(alpha: float = 0.97, z: float = 2.5, warmup: int = 25) -> Policy:
    state: Dict[str, float] = {}

    def policy(step: int, norm: float, history: List[float]) -> Optional[float]:
        if step < warmup:
            return None
        if not state:
            state["mean"], state["var"] = float(np.mean(history)), float(np.var(history))
        limit = state["mean"] + z * math.sqrt(state["var"])
        used = min(norm, limit)
        delta = used - state["mean"]
        state["mean"] += (1 - alpha) * delta
        state["var"] = alpha * (state["var"] + (1 - alpha) * delta * delta)
        return limit
    return policy


def eval_loss(setup: Setup) -> float:
    setup.model.eval()
    with torch.no_grad():
        losses = [float(setup.loss_fn(setup.model, b)) for b in setup.eval_batches]
    setup.model.train()
    return float(np.mean(losses)) if all(map(math.isfinite, losses)) else math.inf


def train(setup: Setup, policy: Optional[Policy] = None, clipper: Optional[gradscope.Clipper] = None) -> float:
    """Train to the end with one clipping method; returns the held-out loss (inf if it diverged)."""
    params = [p for p in setup.model.parameters() if p.requires_grad]
    history: List[float] = []
    for step in range(setup.steps):
        setup.optimizer.zero_grad(set_to_none=True)
        loss = setup.loss_fn(setup.model, setup.train_batch(step))
        if not math.isfinite(float(loss.detach())):
            return math.inf
        loss.backward()
        if clipper is not None:
            clipper(setup.model)
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf))
            threshold = policy(step, norm, history) if policy is not None else None
            if threshold is not None and math.isfinite(norm):
                torch.nn.utils.clip_grad_norm_(params, threshold)
            history.append(norm)
        setup.optimizer.step()
    return eval_loss(setup)


def profile(scenario: Scenario, seed: int) -> gradscope.Report:
    setup = scenario.build(seed)
    steps = iter(range(10 ** 9))
    experiment = gradscope.Experiment(setup.model, setup.optimizer, lambda: setup.train_batch(next(steps)),
                                      loss_fn=setup.loss_fn, name=scenario.name)
    return gradscope.diagnose(experiment, steps=PROFILE_STEPS, seed=seed, restore=False)


def run_one(scenario: Scenario, seed: int) -> Dict[str, object]:
    l0 = eval_loss(scenario.build(seed))
    report = profile(scenario, seed)
    median = float(np.nanmedian(report.statistics.model.global_norm))
    thresholds = sorted(set(GRID + [f * median for f in MEDIAN_FACTORS if math.isfinite(median) and median > 0]))
    grid = {t: train(scenario.build(seed), fixed(t)) for t in thresholds}
    results = {
        "none": train(scenario.build(seed)),
        "fixed-1.0": grid[1.0] if 1.0 in grid else train(scenario.build(seed), fixed(1.0)),
        "autoclip": train(scenario.build(seed), autoclip()),
        "zclip": train(scenario.build(seed), zclip()),
        "gradscope": train(scenario.build(seed), clipper=gradscope.Clipper.from_report(report)),
    }
    star = results["oracle"] = min(grid.values())  # l*: the best of the grid

    def regret(loss: float) -> float:
        """Normalised regret; below 0 when a method beats every grid threshold."""
        if not l0 > star:
            return 0.0
        return (min(loss, l0) - star) / (l0 - star)
    return {"scenario": scenario.name, "label": scenario.label, "seed": seed, "l0": l0,
            "flagged": not report.healthy, "method": report.recommendation.method,
            "threshold": report.recommendation.threshold, "median_norm": median,
            "regret": {k: regret(v) for k, v in results.items()}, "loss": results}


def summarise(rows: List[Dict[str, object]]) -> str:
    methods = ["gradscope", "none", "fixed-1.0", "autoclip", "zclip", "oracle"]
    lines = ["| scenario | label | flagged | advice | " + " | ".join(f"R {m}" for m in methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    for name in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == name]
        advice = ", ".join(sorted({r["method"] + ("" if r["threshold"] is None else f" {r['threshold']:.3g}")
                                   for r in mine}))
        flagged = f"{sum(r['flagged'] for r in mine)}/{len(mine)}"
        cells = [f"{statistics.median(r['regret'][m] for r in mine):.3f}" for m in methods]
        lines.append(f"| {name} | {mine[0]['label']} | {flagged} | {advice} | " + " | ".join(cells) + " |")
    explode = [r for r in rows if r["label"] == "explode"]
    healthy = [r for r in rows if r["label"] == "healthy"]
    detection = (sum(r["flagged"] for r in explode) + sum(not r["flagged"] for r in healthy)) / max(
        len(explode) + len(healthy), 1)
    false_alarms = sum(r["flagged"] for r in healthy)
    lines.append("")
    lines.append(f"detection {detection:.0%} ({false_alarms} false alarm(s) on {len(healthy)} healthy runs); "
                 f"profiling cost {PROFILE_STEPS} steps per scenario and seed")
    if explode:
        regrets = [r["regret"]["gradscope"] for r in explode]
        lines.append(f"explode: gradscope median R {statistics.median(regrets):.3f}, max R {max(regrets):.3f}")
    if healthy:
        ratios = [r["loss"]["gradscope"] / r["loss"]["none"] for r in healthy if r["loss"]["none"] > 0]
        lines.append(f"healthy: gradscope's held-out loss over unclipped: worst {max(ratios):.3f}")
    pairs = [r for r in rows if r["label"] != "other"]
    wins = sum(all(r["regret"]["gradscope"] <= r["regret"][m] + 1e-9 for m in ("none", "fixed-1.0", "autoclip",
                                                                                 "zclip")) for r in pairs)
    lines.append(f"gradscope R <= every baseline's R in {wins}/{len(pairs)} scenario-seed pairs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    seeds = range(1 if args.quick else args.seeds)
    rows = []
    start = time.perf_counter()
    for name in args.scenarios:
        for seed in seeds:
            rows.append(run_one(SCENARIOS[name], seed))
            print(f"  {name} seed {seed}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    print(summarise(rows))


if __name__ == "__main__":
    main()
