"""diagnose()'s options: frozen, validated objects that the CLI and diagnose() share (pure: no torch).

``ProfileOptions`` says how the profile runs, ``TrialOptions`` how the threshold trials do."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..errors import ExperimentError

FIRST_STEPS = 30  # the first rung: every candidate trains this long before any is continued
MIN_TRIAL_STEPS = 10  # fewer cannot judge a trial: a blow-up is read past the start level, a climb by quarters
MAX_TRIAL_STEPS = 1000  # longer keeps too many batches in memory (the trials keep every batch they train on)
MOST_TRIALS = 8  # thresholds tried at most: decades first, then the half-decade steps beside the pick
SEARCH_BUDGET = 4.0  # the first rung's search trains at most this many trials' worth of steps
BUDGET = 13.0  # all rungs together, in first-rung trials' worth: the first rung's 4, two contenders carried to
# 60 steps (2) and three on to 120 (6), with room to spare; with the 30-step profile and an unclipped reference
# trained for the trials, diagnose costs at most (1 + 13 + 1) = 15x its profile in steps
KEEP = 3  # contenders whose training state is kept at once, to continue without replaying their first steps
MOST_TRIALS_ALLOWED = 100
DEVICES = ("cpu", "cuda", "auto")


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """How diagnose runs the profile, beyond its length and seed.

    ``extend``: a profile that has seen nothing yet (no warning or error, and a loss that has not fallen)
    goes on, ``steps`` at a time, to at most 4x ``steps``; False profiles exactly ``steps``. ``device``:
    "cpu", "cuda" or "auto" moves the model and batches there; None leaves them where they are.
    ``restore``: put back the model's weights and modes, the optimizer's state and the RNG states
    afterwards, so that profiling leaves no trace.
    """

    extend: bool = True
    device: Optional[str] = None
    restore: bool = True

    def __post_init__(self) -> None:
        for name in ("extend", "restore"):
            if not isinstance(getattr(self, name), bool):
                raise ExperimentError(f"{name} must be True or False, got {getattr(self, name)!r}", "")
        if self.device is not None and not (isinstance(self.device, str) and
                                            (self.device in DEVICES or self.device.startswith("cuda:"))):
            raise ExperimentError(f"device must be one of {', '.join(DEVICES)}, cuda:N or None, got {self.device!r}",
                                  "None leaves the model and batches where they are")


@dataclasses.dataclass(frozen=True)
class TrialOptions:
    """How diagnose runs its threshold trials.

    ``most``: thresholds tried at most (0: no trials). ``steps``: None for the adaptive horizon (every
    candidate trains FIRST_STEPS, the contenders go on, doubling, while the ranking is open); a number
    trains every trial exactly that long and continues none. ``budget``: the most steps all trials may
    train, in first-rung trials' worth (so the same run gives the same advice anywhere). ``seconds``:
    optionally, start no trial that would end past that many seconds (the advice then depends on the
    machine). ``keep``: contenders' states kept at once (each is a copy of the model and optimizer
    state); ``keep_on_cpu``: keep them in host memory, for models whose device has no room for copies.
    """

    most: int = MOST_TRIALS
    steps: Optional[int] = None
    budget: float = BUDGET
    seconds: Optional[float] = None
    keep: int = KEEP
    keep_on_cpu: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.most) or not 0 <= self.most <= MOST_TRIALS_ALLOWED:
            raise ExperimentError(f"trials must be 0 to {MOST_TRIALS_ALLOWED} thresholds, got {self.most!r}",
                                  f"the default, {MOST_TRIALS}, is what the evaluation measures; 0 runs none")
        if self.steps is not None and (not _is_int(self.steps)
                                       or not MIN_TRIAL_STEPS <= self.steps <= MAX_TRIAL_STEPS):
            raise ExperimentError(f"trial steps must be between {MIN_TRIAL_STEPS} and {MAX_TRIAL_STEPS}, "
                                  f"got {self.steps!r}",
                                  "leave it unset for the adaptive horizon the evaluation measures")
        if not _is_number(self.budget) or not self.budget > 0:
            raise ExperimentError(f"the trial budget must be a positive number of trials' worth, got {self.budget!r}",
                                  f"the default is {BUDGET:g}")
        if self.seconds is not None and (not _is_number(self.seconds) or not self.seconds > 0):
            raise ExperimentError(f"the trial time limit must be a positive number of seconds, got {self.seconds!r}",
                                  "leave it unset to limit the trials by steps alone")
        if not _is_int(self.keep) or self.keep < 1:
            raise ExperimentError(f"keep must be at least 1 kept state, got {self.keep!r}",
                                  f"the default is {KEEP}")
        if not isinstance(self.keep_on_cpu, bool):
            raise ExperimentError(f"keep_on_cpu must be True or False, got {self.keep_on_cpu!r}", "")

    @property
    def enabled(self) -> bool:
        return self.most > 0

    @property
    def adaptive(self) -> bool:
        """Whether contenders go on past the first rung."""
        return self.steps is None

    @property
    def first_steps(self) -> int:
        """Every candidate's length in the first rung (the only rung when ``steps`` is set)."""
        return FIRST_STEPS if self.steps is None else self.steps

    @property
    def search_steps(self) -> int:
        """The most steps the first rung's search may train."""
        return int(min(SEARCH_BUDGET, self.budget) * self.first_steps)

    @property
    def budget_steps(self) -> int:
        """The most steps all trials together may train (the rerun unclipped reference aside)."""
        return int(self.budget * self.first_steps) if self.adaptive else self.search_steps


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
