"""The trials' schedule: which threshold trains next, and how far (pure: gradscope.run.trials runs it).

The first rung is a range test: every candidate the search names trains ``options.first_steps``. The
later rungs are successive halving: the contenders judge.promote names go on, the horizon doubling,
until the ranking is settled, the budget has no room for another rung, or the longest horizon is
reached. Written against the small :class:`Runner` interface, so the same schedule runs real trials
(gradscope.run.trials) and replays recorded ones (benchmarks/eval).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Protocol, Sequence

from ..advise import judge
from ..advise.judge import Trial
from ..advise.reasons import Reason, Reasons, because
from .options import TrialOptions

MOST_STEPS = 960  # the longest horizon a contender is carried to: 30 doubled five times
Progress = Callable[[int, int, str], None]


class Runner(Protocol):
    """What the schedule needs of whoever trains: the trials so far, judged, and the means to train more."""

    options: TrialOptions
    start_held_out: float
    reference: Trial
    spent: int  # steps trained so far, replays included
    most_steps: int  # the longest horizon a trial may reach (MOST_STEPS, or where the learning-rate schedule ends)

    def judged(self) -> List[Trial]: ...
    def advance(self, threshold: float, steps: int) -> None: ...
    def cost(self, threshold: float, steps: int) -> int: ...
    def keep(self, thresholds: Sequence[float]) -> None: ...
    def out_of_time(self) -> bool: ...


def run(runner: Runner, thresholds: Sequence[float], progress: Optional[Progress] = None) -> Reasons:
    """Run the whole schedule; why it stopped where it did (the first rung's limit, if it met one, and why
    the climb ended)."""
    limit = search(runner, thresholds, progress)
    stopped: Reasons = () if limit is None else (limit,)
    if runner.options.adaptive:  # the first rung's share spent or its thresholds tried, the contenders go on
        climbed = climb(runner, progress)
        stopped = (limit, because("then", reason=climbed)) if limit is not None else (climbed,)
    runner.keep(())
    return stopped


def search(runner: Runner, thresholds: Sequence[float], progress: Optional[Progress] = None) -> Optional[Reason]:
    """The first rung: decades down to the basin, then the half-decades beside the pick; why it ended early
    (a limit), or None when the search settled."""
    options, steps = runner.options, runner.options.first_steps
    while True:
        trials = runner.judged()
        threshold = judge.next_candidate(thresholds, trials, runner.start_held_out, runner.reference)
        if threshold is None:
            return None
        if len(trials) >= options.most:
            return because("first_rung_most", most=options.most)
        if runner.spent + steps > options.search_steps:
            return because("first_rung_budget", steps=options.search_steps)
        if runner.out_of_time():
            return because("trial_time_limit", seconds=options.seconds)
        runner.advance(threshold, steps)
        field = judge.final_field(runner.judged())
        runner.keep([t.threshold for t in judge.contenders(field, runner.start_held_out, runner.reference)])
        if progress is not None:
            progress(len(trials) + 1, min(options.most, len(thresholds)), f"clip {threshold:g}")


def climb(runner: Runner, progress: Optional[Progress] = None) -> Reason:
    """The later rungs: the contenders go on, the horizon doubling; why the climb stopped."""
    options = runner.options
    while True:
        trials = runner.judged()
        ahead, why = judge.promote(trials, runner.start_held_out, runner.reference, most_steps=runner.most_steps)
        if not ahead:
            return why
        nxt = judge.final_field(trials).steps * judge.RUNG_GROWTH
        while ahead and runner.spent + sum(runner.cost(c, nxt) for c in ahead) > options.budget_steps:
            ahead = ahead[:-1]  # the least needed contender first
        if len(ahead) < 2:
            return because("no_room_for_rung", why=why, budget=options.budget_steps, next=nxt)
        if runner.out_of_time():
            return because("rung_time_limit", why=why, seconds=options.seconds)
        runner.keep(ahead)
        for done, threshold in enumerate(ahead, 1):
            runner.advance(threshold, nxt)
            if progress is not None:
                progress(done, len(ahead), f"clip {threshold:g} to {nxt} steps")
