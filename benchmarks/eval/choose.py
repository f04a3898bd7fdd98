"""Compare rules for choosing a threshold from trials, on the rows of an exhaustive evaluation run.

`python benchmarks/eval/run.py --exhaustive --json rows.json` tries every candidate threshold for 30
steps and also trains every candidate for the full 300 steps (the grid). This script replays the
trials through gradscope's own judge (gradscope.advise.judge) under variants of the choice rule (margin or
not, tie tolerance, budget and early stop) and scores each variant by the normalised regret R of the
threshold it would have picked, over every explode scenario and seed. It trains nothing.

Run: python benchmarks/eval/choose.py rows.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import confirmed  # noqa: E402

from gradscope.advise import judge
from gradscope.advise.judge import Trial
from gradscope.run.options import SEARCH_BUDGET as BUDGET

Rule = Callable[[List[Trial], Trial, float], Optional[float]]


def trials_of(row: dict) -> Tuple[List[Trial], Trial, float]:
    start = row["trials"]["start_held_out"]
    runs = []
    steps = row["trials"].get("steps", 30)
    for run in row["trials"]["runs"]:
        threshold = math.inf if run["threshold"] is None or run["threshold"] == math.inf else run["threshold"]
        held, batches = run["held_out"], run.get("held_out_batches") or ()
        losses, norms = run["losses"], run["norms"]
        first = [c for c in run.get("checkpoints", []) if c[0] == steps]
        if first:  # carried past the first rung: each trial as it stood there, the 30-step trial this compares
            (_, held, batches), losses, norms = first[0], losses[:steps], norms[:steps]
        elif run.get("checkpoints") or len(losses) > steps:
            held, batches, losses, norms = math.inf, (), losses[:steps], norms[:steps]  # diverged before it
        held = math.inf if held is None else held
        verdict = judge.assess(losses, norms, held, start)
        runs.append(Trial(threshold, tuple(losses), tuple(norms), held, verdict, held_out_batches=tuple(batches)))
    return runs[1:], runs[0], start


def budgeted(trials: List[Trial], budget: float, steps: int = 30) -> List[Trial]:
    """Every candidate in turn, loosest first, until the budget would run out."""
    done: List[Trial] = []
    for t in trials:
        if sum(len(x.losses) for x in done) + steps > budget * steps:
            break
        done.append(t)
    return done


def coarse_to_fine(trials: List[Trial], start: float, budget: float, steps: int = 30,
                   reference: Optional[Trial] = None) -> List[Trial]:
    """Decades first (every other lattice step, loosest first), then the half-decade step beside the best
    decade, on the side of its better neighbour: what gradscope.run.trials does by default."""
    by_threshold = {t.threshold: t for t in trials}
    order = [t.threshold for t in trials]
    done: List[Trial] = []
    while sum(len(x.losses) for x in done) + steps <= budget * steps:
        threshold = judge.next_candidate(order, done, start, reference)
        if threshold is None:
            break
        done.append(by_threshold[threshold])
    return sorted(done, key=lambda t: -t.threshold)


def rule(margin: bool = False, tie: float = 0.0, budget: float = 1e9, prefer: str = "loosest",
         search: str = "descending", floor: bool = False) -> Rule:
    """A variant of the choice: the least (or most) clipping within ``tie`` of the best held-out improvement
    (with ``floor``, or within judge.SIGNAL of the start loss, whichever is wider), optionally kept one
    lattice step below a looser threshold that went unstable (a range-test margin)."""
    def choose(trials: List[Trial], reference: Trial, start: float) -> Optional[float]:
        if search == "coarse-to-fine":
            trials = coarse_to_fine(trials, start, budget, reference=reference)
        else:
            trials = budgeted(trials, budget)
        stable = [t for t in trials if t.stable]
        if not stable:
            return None
        best = min(t.held_out for t in stable)
        band = max(tie * max(start - best, 0.0), judge.evidence_floor(start) if floor else 0.0)
        near = [t for t in stable if t.held_out <= best + band]
        pick = (max if prefer == "loosest" else min)(near, key=lambda t: t.threshold)
        if not margin:
            return pick.threshold
        ladder = [reference, *trials]
        if ladder[ladder.index(pick) - 1].stable:
            return pick.threshold
        below = [t for t in trials[trials.index(pick) + 1:] if t.stable]
        return below[0].threshold if below else pick.threshold
    return choose


def regret(row: dict, threshold: Optional[float]) -> float:
    grid = {float(k): (math.inf if v is None else v) for k, v in row["grid"].items()}
    star, l0 = min(grid.values()), row["l0"]
    if threshold is None or not l0 > star:
        return 1.0 if threshold is None and l0 > star else 0.0
    loss = grid.get(threshold)
    if loss is None:
        loss = grid[min(grid, key=lambda k: abs(math.log(k / threshold)))]
    return (min(loss, l0) - star) / (l0 - star)


def default(trials: List[Trial], reference: Trial, start: float) -> Optional[float]:
    """gradscope's own choice: its search within its budget, then judge.ruling."""
    return judge.ruling(coarse_to_fine(trials, start, BUDGET, reference=reference), start, reference)[0]


def one_se(budget: float = 1e9, search: str = "descending") -> Rule:
    """The loosest stable trial within one standard error (paired over the held-out batches) of the best."""
    def choose(trials: List[Trial], reference: Trial, start: float) -> Optional[float]:
        tried = coarse_to_fine(trials, start, budget, reference=reference) if search == "coarse-to-fine" \
            else budgeted(trials, budget)
        stable = [t for t in tried if t.stable]
        if not stable:
            return None
        best = min(stable, key=lambda t: t.held_out)
        return max(t.threshold for t in stable if t.threshold >= best.threshold and not judge.clearly_better(best, t))
    return choose


def below_the_pick(trials: List[Trial], reference: Trial, start: float) -> Optional[float]:
    """gradscope's search and choice, then one stable lattice step lower wherever a looser threshold was tried
    and stayed stable (where it went unstable the choice has stepped down already): the margin a
    learning-rate range test keeps below the loss minimum, taken always."""
    done = coarse_to_fine(trials, start, BUDGET, reference=reference)
    chosen = judge.winning_trial(done, start, reference)
    if chosen is None:
        return None
    looser = [t for t in done if t.threshold > chosen.threshold]
    below = sorted((t for t in done if t.threshold < chosen.threshold and t.stable), key=lambda t: -t.threshold)
    if looser and below and min(looser, key=lambda t: t.threshold).stable:
        return below[0].threshold
    return chosen.threshold


VARIANTS: Dict[str, Rule] = {
    f"gradscope: decade descent then half-decades, budget {BUDGET:g}, loosest within 5%, margin": default,
    "same search and choice without the 1% signal floor": rule(search="coarse-to-fine", budget=BUDGET, tie=0.05,
                                                               margin=True),
    "same search and choice with the floor, replayed here": rule(search="coarse-to-fine", budget=BUDGET, tie=0.05,
                                                                 margin=True, floor=True),
    "same search, budget 4, lowest held-out median": rule(search="coarse-to-fine", budget=BUDGET),
    "same search, budget 4, one-standard-error rule": one_se(budget=BUDGET, search="coarse-to-fine"),
    "same search and choice, then always one step below the pick": below_the_pick,
    "same search, budget 4, tie 20%, margin": rule(search="coarse-to-fine", budget=BUDGET, tie=0.2, margin=True),
    "same search, budget 5, loosest within 5%, margin": rule(search="coarse-to-fine", budget=5.0, tie=0.05,
                                                             margin=True),
    "loosest first, budget 4, loosest within 5%, margin": rule(budget=BUDGET, tie=0.05, margin=True),
    "every candidate, lowest held-out median": rule(),
    "every candidate, one-standard-error rule": one_se(),
    "every candidate, loosest within 5%, margin": rule(tie=0.05, margin=True),
    "every candidate, loosest within 5% or the 1% floor, margin": rule(tie=0.05, margin=True, floor=True),
    "every candidate, tightest within 5%": rule(prefer="tightest", tie=0.05),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", help="the JSON rows of `run.py --exhaustive --json FILE`")
    args = parser.parse_args()
    rows = [r for r in json.load(open(args.rows)) if r["label"] == "explode" and r.get("trials") and confirmed(r)]
    print(f"{len(rows)} explode pairs with trials that the grid confirms\n")
    print("| choice rule | mean R | median R | max R | pairs with R > 0.2 |")
    print("|---|---|---|---|---|")
    for name, choose in VARIANTS.items():
        regrets = [regret(r, choose(*trials_of(r))) for r in rows]
        print(f"| {name} | {statistics.mean(regrets):.3f} | {statistics.median(regrets):.3f} | {max(regrets):.3f} | "
              f"{sum(x > 0.2 for x in regrets)} |")
    print("\nper pair (default rule): scenario seed, picked, best of grid, R")
    choose = VARIANTS[next(iter(VARIANTS))]
    for r in rows:
        picked = choose(*trials_of(r))
        print(f"  {r['scenario']} {r['seed']}: {picked} vs {r['best_threshold']}: R {regret(r, picked):.3f}")


if __name__ == "__main__":
    main()
