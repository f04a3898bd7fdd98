"""Keep "our model's gradients are healthy" as a unit test: an assertion helper for pytest and unittest."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .run.diagnose import DEFAULT_STEPS, diagnose, seed_everything
from .run.experiment import Experiment
from .gate import decide
from .present.formats import findings_table
from .present.render import render_text
from .report import Report
from .analyse.ruleset import RuleSet
from .run.target import load_experiment


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


def report_text(report: Report) -> str:
    return render_text(report, width=100)
