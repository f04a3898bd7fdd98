"""Findings as they happen: the report's own rules, run over what the Monitor has recorded so far.

At a flush (every ``flush_every`` steps, when the figures reach the host) the live log may evaluate the
rules on the steps recorded so far: the same rules, metrics and messages as the report at the end. It
does so once 32 steps are recorded (the rules are written for profiles of diagnose's 30 steps), then at
most once every ``every_s`` seconds (30 by default); and at once when the flushed steps hold a
non-finite gradient, global norm or loss, which cannot wait. A rule's finding reaches the sink once
per run, the first time it holds at ``level`` or above (``"warning"`` by default): a run that spikes on
every step sends one event, not thousands. A layer rule that holds on several layers sends one event,
for the first of them, saying how many more. The report at the end lists every finding as usual.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from ..analyse.profile import Profile
from ..errors import GradscopeError

if TYPE_CHECKING:
    from ..analyse.evaluate import Finding
    from ..analyse.ruleset import RuleSet

EVERY_S = 30.0
# The rules are written for a profile of diagnose's length (30 steps): before this many steps are recorded a
# "whole run" is a handful of steps, so only a non-finite figure evaluates them.
MIN_STEPS = 32


@dataclasses.dataclass(frozen=True)
class Event:
    """A finding that reached the live log mid-run: the rule, its severity and message, the optimizer step
    of the flush where it first held, and the layer (None for a rule on the whole model)."""

    rule: str
    severity: str
    message: str
    step: int
    layer: Optional[str] = None

    @property
    def title(self) -> str:
        return f"gradscope: {self.rule}" + (f" in {self.layer}" if self.layer else "")

    def __str__(self) -> str:
        return f"{self.severity} {self.rule} at step {self.step}: {self.message}"


class LiveFindings:
    """Which findings are new, under the rate limit above."""

    def __init__(self, rules: "RuleSet", level: Optional[str] = "warning", every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        check(level, every_s)
        self.rules, self.level, self.every_s, self._clock = rules, level, float(every_s), clock
        self._last: Optional[float] = None
        self.sent: Dict[str, int] = {}  # rule id → the step it was sent at

    def due(self, failing: bool, steps: int) -> bool:
        """Whether this flush evaluates the rules, with ``steps`` recorded: ``failing`` (a non-finite figure
        among its steps), or ``every_s`` since the last evaluation, from ``MIN_STEPS`` steps on."""
        if self.level is None:
            return False
        now = self._clock()
        if failing or steps >= MIN_STEPS and (self._last is None or now - self._last >= self.every_s):
            self._last = now
            return True
        return False

    def new(self, profile: Profile, step: int) -> List[Event]:
        """The findings on ``profile`` at ``level`` or above whose rule has not been sent yet, as events."""
        from ..pipeline import assess  # the analysis loads when the rules are first evaluated, not with the Monitor
        from ..analyse.ruleset import SEVERITIES
        _, findings = assess(profile, self.rules)
        least = SEVERITIES.index(self.level)
        by_rule: Dict[str, List["Finding"]] = {}
        for f in findings:
            if SEVERITIES.index(f.severity) >= least and f.rule_id not in self.sent:
                by_rule.setdefault(f.rule_id, []).append(f)
        events = []
        for rule, found in by_rule.items():
            self.sent[rule] = step
            events.append(_event(found, step))
        return events


def check(level: Optional[str], every_s: float) -> None:
    """The live findings' options, checked (one GradscopeError each)."""
    from ..analyse.ruleset import SEVERITIES  # the rule files load with a live log, not with the Monitor
    if level is not None and level not in SEVERITIES:
        raise GradscopeError(f"findings={level!r} is not a severity", f"use one of {', '.join(SEVERITIES)}, "
                             "or None for no events")
    if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not every_s >= 0:
        raise GradscopeError(f"findings_every={every_s!r}", "give the seconds between two evaluations, such as 30")


def _event(found: Sequence["Finding"], step: int) -> Event:
    first = found[0]
    more = f" (and {len(found) - 1} more layer{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
    return Event(first.rule_id, first.severity, first.message + more, step, first.layer)
