"""The CI gate: which findings fail the run, and the exit code, with or without a baseline."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from .baseline import Comparison
from .errors import EXIT_FINDINGS, EXIT_OK
from .analyse.evaluate import Finding
from .report import Report
from .analyse.ruleset import SEVERITIES

FAIL_ON = ("error", "warning", "never")


@dataclasses.dataclass(frozen=True)
class Verdict:
    fail_on: str
    failing: Tuple[Finding, ...]  # findings at or above fail_on (only new or worse ones, with a baseline)
    comparison: Optional[Comparison]
    exit_code: int
    unfinished: Optional[str] = None  # why the run did not finish (a user error, Ctrl-C): it never passes


    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_OK


def decide(report: Report, fail_on: str = "error", comparison: Optional[Comparison] = None) -> Verdict:
    """Exit 1 when a finding at or above ``fail_on`` (new or worse, given a baseline) or a regression exists."""
    candidates = report.findings if comparison is None else comparison.new
    failing = () if fail_on == "never" else tuple(
        f for f in candidates if SEVERITIES.index(f.severity) >= SEVERITIES.index(fail_on))
    regressed = comparison is not None and fail_on != "never" and bool(comparison.regressions)
    return Verdict(fail_on, failing, comparison, EXIT_FINDINGS if failing or regressed else EXIT_OK)


def unfinished(report: Report, fail_on: str, problem: str, exit_code: int) -> Verdict:
    """The verdict on a partial report of a run that stopped on an error: the error's exit code, whatever
    the findings so far, so that every format agrees with the process."""
    return dataclasses.replace(decide(report, fail_on), exit_code=exit_code, unfinished=problem)
