"""What the framework callbacks share: options, writing the reports, and failing on findings."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

from rich.console import Console

from ..errors import GradscopeError
from ..present.formats import findings_table
from .. import outputs, recorder
from ..gate import Verdict, decide, unfinished
from ..present.render import render
from ..report import Report
from ..analyse.ruleset import RuleSet, load_rules


class GradientHealthError(GradscopeError):
    """Raised at the end of training when ``fail_on`` is set and findings reach it."""


class ReportSink:
    """Rules, the output destination and the fail_on policy of a callback; it emits and gates reports.

    ``output``: None prints the rich report; a path ending in ``.json`` writes JSON, ``.xml`` JUnit,
    ``.sarif`` SARIF, ``.md`` Markdown, anything else the plain-text report. ``fail_on`` ("error" or
    "warning") raises :class:`GradientHealthError` when findings reach it.
    """

    def __init__(self, rules: Union[None, str, Path, RuleSet], output: Union[None, str, Path],
                 fail_on: Optional[str]) -> None:
        if fail_on not in (None, "error", "warning"):
            raise GradscopeError(f"fail_on={fail_on!r}", "use None, 'error' or 'warning'")
        self.rules = rules if isinstance(rules, RuleSet) else load_rules(rules)  # a bad file fails at once
        self.output = output
        self.fail_on = fail_on

    def finish(self, reports: List[Report], *, write: bool = True, failure: Optional[BaseException] = None) -> None:
        """The end of a run: one verdict per report, then the reports written (or printed) with them, where
        ``write`` (rank 0), and after a normal end :class:`GradientHealthError` raised on every rank where a
        report fails ``fail_on``. After ``failure`` (the fit raised) they are partial reports, whose verdict
        carries the failure, and nothing is raised: the run's own exception goes on."""
        verdicts = [self._verdict(r, failure) for r in reports]
        if write:
            self._write(reports, verdicts)
        failing = [(r, v) for r, v in zip(reports, verdicts) if not v.passed]
        if failure is None and failing:
            raise GradientHealthError("gradient health check failed at the end of training:\n"
                                      + "\n".join(findings_table(r, v) for r, v in failing),
                                      "see the gradscope report above, or pass fail_on=None")

    def _verdict(self, report: Report, failure: Optional[BaseException]) -> Verdict:
        policy = self.fail_on or "never"
        if failure is None:
            return decide(report, policy)
        return unfinished(report, policy, report.stopped_reason or "", recorder.exit_code(type(failure)))

    def _write(self, reports: List[Report], verdicts: List[Verdict]) -> None:
        """Print the rich reports, or write them in the format the output's suffix names: one file, replaced
        atomically (``outputs.write``) and shielded from a second Ctrl-C."""
        if self.output is None:
            console = Console(highlight=False)
            for report in reports:
                console.print(render(report))
            return
        outputs.write_reports(self.output, reports, verdicts)
