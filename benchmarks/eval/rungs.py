"""Compare trial schedules (fixed horizons and the adaptive one) on the rows of an exhaustive evaluation run.

`python benchmarks/eval/run.py --exhaustive --json rows.json` tries every candidate threshold and
carries every stable one on, the horizon doubling, to 240 steps, with the held-out loss recorded at
30, 60, 120 and 240; it also trains every candidate for the full 300 steps (the grid). This script
runs gradscope's own schedule (gradscope.run.schedule, with gradscope.advise.judge) over those records instead
of over real training: each trial is revealed as far as the schedule asks, and what the schedule
would have paid is counted in steps (a contender whose state the schedule let go is replayed from
the start, and that is counted, as gradscope.run.trials counts it). Each schedule is scored by the
normalised regret R of its pick against the grid and by its cost, over every confirmed explode pair.
It trains nothing.

Run: python benchmarks/eval/rungs.py rows.json [rows2.json ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PROFILE_STEPS, confirmed  # noqa: E402

from gradscope.advise import judge  # noqa: E402
from gradscope.run import schedule  # noqa: E402
from gradscope.advise.judge import Checkpoint, Trial  # noqa: E402
from gradscope.run.options import TrialOptions  # noqa: E402
from gradscope.advise.reasons import because  # noqa: E402
from gradscope.present.wording import say  # noqa: E402


def _inf(value) -> float:
    return math.inf if value is None else float(value)


@dataclasses.dataclass
class Record:
    """One threshold as the exhaustive run trained it: every step and every checkpoint it reached."""

    threshold: float
    losses: List[float]
    norms: List[float]
    checkpoints: List[Checkpoint]


class Replay:
    """gradscope.run.schedule's Runner over recorded trials: training is revealing the record up to a step."""

    def __init__(self, row: dict, options: TrialOptions) -> None:
        runs = row["trials"]["runs"]
        self.options = options
        self.start_held_out = row["trials"]["start_held_out"]
        ref = runs[0]
        self.reference = Trial(math.inf, tuple(ref["losses"]), tuple(ref["norms"]), _inf(ref["held_out"]),
                               held_out_batches=tuple(ref["held_out_batches"] or ()))
        self.reference = dataclasses.replace(self.reference, unstable=judge.assess(
            self.reference.losses, self.reference.norms, self.reference.held_out, self.start_held_out))
        self.records: Dict[float, Record] = {}
        for run in runs[1:]:
            points = [Checkpoint(s, _inf(h), tuple(b or ())) for s, h, b in run.get("checkpoints", [])]
            self.records[run["threshold"]] = Record(run["threshold"], run["losses"], run["norms"], points)
        self.shown: Dict[float, int] = {}  # steps revealed per threshold
        self.kept: set = set()
        self.spent = 0
        self.most_steps = schedule.MOST_STEPS

    def judged(self) -> List[Trial]:
        return [self._trial(c, n) for c, n in self.shown.items()]

    def _trial(self, threshold: float, steps: int) -> Trial:
        rec = self.records[threshold]
        points = tuple(c for c in rec.checkpoints if c.steps <= steps)
        losses = rec.losses[:steps]
        diverged = len(rec.losses) < steps or not (points and points[-1].steps == steps)
        held = math.inf if diverged else points[-1].held_out
        batches = () if diverged else points[-1].held_out_batches
        verdict = judge.assess(losses, rec.norms[:steps], held, self.start_held_out)
        return Trial(threshold, tuple(losses), tuple(rec.norms[:steps]), held, verdict, held_out_batches=batches,
                     checkpoints=points)

    def advance(self, threshold: float, steps: int) -> None:
        # a record with no checkpoint at ``steps`` diverged before, or went unstable at an earlier checkpoint
        # and was carried no further (so it counts as unstable here too, and its cost as what it trained)
        before = self.shown.get(threshold, 0)
        start = before if threshold in self.kept else 0
        trained = min(steps, len(self.records[threshold].losses))
        self.spent += max(trained - start, 0)
        self.shown[threshold] = steps
        if not self._trial(threshold, steps).unstable:
            self.kept.add(threshold)

    def cost(self, threshold: float, steps: int) -> int:
        return steps - self.shown.get(threshold, 0) if threshold in self.kept else steps

    def keep(self, thresholds: Sequence[float]) -> None:
        self.kept &= set(list(thresholds)[:self.options.keep])

    def out_of_time(self) -> bool:
        return False


def replay(row: dict, options: TrialOptions) -> Tuple[Optional[float], int, str]:
    """The threshold the schedule picks on this row, the steps it spent, and why it stopped."""
    runner = Replay(row, options)
    thresholds = sorted(runner.records, reverse=True)
    stopped = schedule.run(runner, thresholds)
    winner, _ = judge.ruling(runner.judged(), runner.start_held_out, runner.reference)
    return winner, runner.spent, say(stopped)


def regret(row: dict, threshold: Optional[float]) -> float:
    l0, star = row["l0"], row["loss"]["oracle"]
    if threshold is None:
        loss = row["loss"]["none"]
    else:
        loss = row["grid"].get(str(float(threshold)), row["grid"].get(str(threshold)))
        loss = math.inf if loss is None else loss
    return 0.0 if not l0 > star else (min(loss, l0) - star) / (l0 - star)


def _settled_when(first_rung: str, later: str):
    """A variant of judge.promote: the same contenders and the same 'nothing learned yet' rule, with the
    ranking settled at the first rung by ``first_rung`` ("clear" or "never") and later by ``later``
    ("held": the pick held over the doubling, or "clear": clearly ahead of the other contenders)."""
    def promote(trials, start_held_out, reference=None, most_steps=0):
        field = judge.final_field(trials)
        steps = field.steps
        ahead = judge.contenders(field, start_held_out, reference)[
            :judge.FIRST_CONTENDERS if len(judge.rungs(trials)) <= 1 else None]
        if not ahead:
            return [], because("none_stable")
        if most_steps and steps * judge.RUNG_GROWTH > most_steps:
            return [], because("rung_past_longest", next=steps * judge.RUNG_GROWTH, longest=most_steps)
        if len(ahead) == 1:
            return [], because("one_left", steps=steps)
        if not judge.learned(field.trials, start_held_out):
            return [t.threshold for t in ahead], because("nothing_learned_within", steps=steps)
        earlier = [h for h in judge.rungs(trials) if h < steps]
        rule = later if earlier else first_rung
        if rule == "held":
            before_field = judge.field_at(trials, earlier[-1])
            before = judge.winning_trial(before_field.trials, start_held_out, reference, before_field.beside)
            if before is not None and before.threshold == ahead[0].threshold:
                return [], because("pick_held", since=earlier[-1], steps=steps)
        if rule == "clear" and all(judge.clearly_better(ahead[0], t, judge.evidence_floor(start_held_out)) for t in ahead[1:]):
            return [], because("pick_clear", steps=steps)
        return [t.threshold for t in ahead], because("neighbours_tied", steps=steps)
    return promote


def _basin(trials, start_held_out, beside=()):
    """The stable trials, loosest first, and the basin: the run of them, unbroken on the ladder of every stable
    trial, that holds the best and lies within the tie of it (judge's near-best)."""
    stable = [t for t in sorted(trials, key=lambda t: -t.threshold) if t.stable]
    if not stable:
        return [], []
    best = min(stable, key=lambda t: t.held_out)
    gain = start_held_out - best.held_out if math.isfinite(start_held_out) else 0.0
    tie = best.held_out + max(judge.TIE * max(gain, 0.0), judge.evidence_floor(start_held_out))
    i = stable.index(best)
    lo, hi = i, i
    while hi > 0 and stable[hi - 1].held_out <= tie:
        hi -= 1
    while lo + 1 < len(stable) and stable[lo + 1].held_out <= tie:
        lo += 1
    return stable, stable[hi:lo + 1]


def _choose(mode: str):
    """A variant of judge.winning_trial. ``centre``: the middle of the basin (the tighter of two middles), kept
    off a looser neighbour that went unstable while the basin has room; ``inside``: the shipped rule, with the
    margin's step taken only inside the basin."""
    def winning_trial(trials, start_held_out=math.nan, reference=None, beside=()):
        stable, basin = _basin(trials, start_held_out, beside)
        if not basin:
            return None
        ladder = sorted([*trials, *beside], key=lambda t: -t.threshold)
        if reference is not None:
            ladder = [reference, *ladder]

        def edge(t):  # the next looser threshold tried went unstable
            looser = [x for x in ladder if x.threshold > t.threshold]
            return bool(looser) and not looser[-1].stable
        if mode == "adjacent":  # the shipped choice, its margin one lattice step and only to a tried threshold
            step = 10 ** judge.LATTICE_STEP * 1.05  # the lattice is rounded to two figures: 0.32 over 0.1
            chosen = max(basin, key=lambda t: t.threshold)
            looser = [x for x in ladder if x.threshold > chosen.threshold]
            if not looser or looser[-1].stable:
                return chosen
            if math.isfinite(looser[-1].threshold) and looser[-1].threshold > chosen.threshold * step:
                return chosen  # already a step or more below the threshold that went unstable
            below = [t for t in stable if t.threshold < chosen.threshold]
            return below[0] if below and below[0].threshold * step >= chosen.threshold else chosen
        if mode == "unclear":  # the shipped choice, its margin's step only to a threshold not clearly worse than the best
            chosen = max(basin, key=lambda t: t.threshold)
            looser = [x for x in ladder if x.threshold > chosen.threshold]
            if not looser or looser[-1].stable:
                return chosen
            best = min(stable, key=lambda t: t.held_out)
            below = [t for t in stable if t.threshold < chosen.threshold]
            floor = judge.evidence_floor(start_held_out)
            return below[0] if below and not judge.clearly_better(best, below[0], floor) else chosen
        if mode == "inside":
            chosen = basin[0]
            if edge(chosen) and len(basin) > 1:
                return basin[1]
            return chosen
        room = [t for t in basin if not edge(t)] or basin
        return room[len(room) // 2]
    return winning_trial


def _extrapolated(inner, horizon: int = 300):
    """A variant of a winning_trial: each trial that stood at two rungs is judged by where the line through its
    held-out losses at them, in log steps, reaches at ``horizon``; a trial seen at one rung, as it stands."""
    def winning_trial(trials, start_held_out=math.nan, reference=None, beside=()):
        ahead = []
        for t in trials:
            points = {c.steps: c.held_out for c in t.checkpoints}
            here = len(t.losses)
            if t.stable and here in points and here // 2 in points and horizon > here:
                slope = (points[here] - points[here // 2]) / math.log(2)
                t = dataclasses.replace(t, held_out=points[here] + slope * math.log(horizon / here),
                                        held_out_batches=())
            ahead.append(t)
        chosen = inner(ahead, start_held_out, reference, beside)
        return None if chosen is None else next(t for t in trials if t.threshold == chosen.threshold)
    return winning_trial


# (options, judge attributes replaced for the row): none replaced is gradscope's own schedule
SCHEDULES = {
    "adaptive, extrapolated to 300 steps": (TrialOptions(), {"winning_trial": _extrapolated(judge.winning_trial)}),
    "adaptive, extrapolated to 300 steps, never settled at the first rung": (
        TrialOptions(), {"winning_trial": _extrapolated(judge.winning_trial), "promote": _settled_when("never", "held")}),
    "adaptive, the margin's step only inside the basin": (TrialOptions(), {"winning_trial": _choose("inside")}),
    "adaptive, the margin's step only inside the basin, never settled at the first rung": (
        TrialOptions(), {"winning_trial": _choose("inside"), "promote": _settled_when("never", "held")}),
    "adaptive, the margin's step only to a threshold not clearly worse than the best": (
        TrialOptions(), {"winning_trial": _choose("unclear")}),
    "adaptive, the margin one lattice step, to a tried threshold": (TrialOptions(), {"winning_trial": _choose("adjacent")}),
    "adaptive, the margin one lattice step, never settled at the first rung": (
        TrialOptions(), {"winning_trial": _choose("adjacent"), "promote": _settled_when("never", "held")}),
    "adaptive, the centre of the basin": (TrialOptions(), {"winning_trial": _choose("centre")}),
    "adaptive, never settled at the first rung, then held": (
        TrialOptions(), {"promote": _settled_when("never", "held")}),
    "fixed 30 steps": (TrialOptions(steps=30), {}),
    "fixed 60 steps": (TrialOptions(steps=60), {}),
    "fixed 120 steps": (TrialOptions(steps=120), {}),
    "adaptive (the default: budget 13, two contenders past the first rung)": (TrialOptions(), {}),
    "adaptive, budget 8": (TrialOptions(budget=8.0), {}),
    "adaptive, budget 16": (TrialOptions(budget=16.0), {}),
    "adaptive, three contenders past the first rung": (TrialOptions(), {"FIRST_CONTENDERS": 3}),
    "adaptive, settled only when clear, at every rung": (TrialOptions(), {"promote": _settled_when("clear", "clear")}),
    "adaptive, three contenders, settled only when clear, at every rung": (
        TrialOptions(), {"FIRST_CONTENDERS": 3, "promote": _settled_when("clear", "clear")}),
    "adaptive, three contenders, never settled at the first rung, then held": (
        TrialOptions(), {"FIRST_CONTENDERS": 3, "promote": _settled_when("never", "held")}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", help="the --json files of exhaustive runs")
    parser.add_argument("--pairs", action="store_true", help="also print every pair's pick under each schedule")
    args = parser.parse_args()
    rows = [r for path in args.rows for r in json.loads(Path(path).read_text())]
    scored = [r for r in rows if r["label"] == "explode" and confirmed(r) and r.get("trials")]
    print(f"{len(scored)} confirmed explode pairs with trials, from {', '.join(args.rows)}")
    print("| schedule | mean R | median R | max R | pairs with R > 0.1 | diagnose over its profile, in steps |")
    print("|---|---|---|---|---|---|")
    for name, (options, replaced) in SCHEDULES.items():
        shipped = {k: getattr(judge, k) for k in replaced}
        for k, v in replaced.items():  # gradscope.run.schedule and judge look these up on the module when they run
            setattr(judge, k, v)
        results = []
        for row in scored:
            winner, spent, stopped = replay(row, options)
            results.append((row, winner, spent, stopped, regret(row, winner)))
        for k, v in shipped.items():
            setattr(judge, k, v)
        rs = [x[4] for x in results]
        cost = [(max(PROFILE_STEPS, r["profile_steps"]) + s) / max(PROFILE_STEPS, r["profile_steps"])
                for r, _, s, _, _ in results]
        print(f"| {name} | {statistics.mean(rs):.3f} | {statistics.median(rs):.3f} | {max(rs):.3f} | "
              f"{sum(x > 0.1 for x in rs)} | median {statistics.median(cost):.1f}x, max {max(cost):.1f}x |")
        if args.pairs:
            for row, winner, spent, stopped, r in results:
                print(f"    {row['scenario']} seed {row['seed']}: {winner} (best {row['best_threshold']}) R {r:.3f}, "
                      f"{spent} steps; {stopped}")


if __name__ == "__main__":
    main()
