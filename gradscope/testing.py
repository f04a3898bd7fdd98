"""Keep "our model's gradients are healthy" as a unit test: an assertion helper for pytest and unittest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .diagnose import DEFAULT_STEPS, diagnose, seed_everything
from .experiment import Experiment
from .gate import Verdict, decide
from .render import fmt, render_text
from .report import Report
from .ruleset import RuleSet
from .target import load_experiment


def run_diagnosis(experiment_or_target: Union[Experiment, str], steps: int = DEFAULT_STEPS,
                  rules: Union[None, str, Path, RuleSet] = None, seed: int = 0) -> Report:
    """diagnose() an Experiment, or a TARGET string loaded the way the CLI loads it (seeded first)."""
    if isinstance(experiment_or_target, str):
        seed_everything(seed)
        experiment_or_target = load_experiment(experiment_or_target)
    return diagnose(experiment_or_target, steps=steps, rules=rules, seed=seed)


def assert_gradients_healthy(experiment_or_target: Union[Experiment, str], steps: int = DEFAULT_STEPS,
                             rules: Union[None, str, Path, RuleSet] = None, *, fail_on: str = "error",
                             seed: int = 0) -> Report:
    """Raise AssertionError, with the findings as a compact table, if a finding is at or above ``fail_on``."""
    report = run_diagnosis(experiment_or_target, steps, rules, seed)
    verdict = decide(report, fail_on)
    if not verdict.passed:
        raise AssertionError(findings_table(report, verdict))
    return report


def findings_table(report: Report, verdict: Optional[Verdict] = None) -> str:
    """One line per finding, failing ones marked, then the advice: short enough for an assertion message."""
    failing = verdict.failing if verdict else report.findings
    head = f"gradscope: {report.model}: {len(failing)} finding(s) at or above {verdict.fail_on if verdict else 'info'}"
    rows = [(("✖ " if f in failing else "  ") + f.severity, f.rule_id, f.layer or "(model)", f.message)
            for f in report.findings]
    widths = [max([len(r[i]) for r in rows] + [0]) for i in range(3)]
    lines = [head] + [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    rec = report.recommendation
    lines.append(f"  advice: {rec.method}" + (f" at {fmt(rec.threshold)}" if rec.threshold is not None else "")
                 + f" ({rec.evidence.basis})")
    return "\n".join(lines)


def report_text(report: Report) -> str:
    return render_text(report, width=100)
