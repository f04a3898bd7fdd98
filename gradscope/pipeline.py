"""Profile → Statistics → findings → recommendation → Report: the one pure pipeline, no torch.

diagnose() and Monitor.report() both end here, so a Profile gives the same Report whichever way it was
collected.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple, Union

from .analyse import stats
from .analyse.stats import Statistics
from .analyse.evaluate import Finding, evaluate
from .analyse.profile import Profile
from .advise.cause import likely_cause
from .advise.recommend import recommend
from .report import Report
from .analyse.ruleset import RuleSet, load_rules


def build_report(profile: Profile, *, rules: Union[None, str, Path, RuleSet] = None, model_name: str = "model",
                 stopped_reason: Optional[str] = None, seed: Optional[int] = None,
                 steps_requested: Optional[int] = None, adaptive_optimizer: Optional[bool] = None) -> Report:
    """Statistics → findings → recommendation for one Profile. ``adaptive_optimizer`` says what the caller
    knows of the optimizer that the Profile does not (see Profile.adaptive_optimizer)."""
    rule_set = rules if isinstance(rules, RuleSet) else load_rules(rules)
    if adaptive_optimizer is not None:
        profile = dataclasses.replace(profile, adaptive_optimizer=adaptive_optimizer)
    statistics, findings = assess(profile, rule_set)
    return Report(model=model_name, statistics=statistics, findings=findings,
                  recommendation=recommend(statistics, findings), rules=rule_set,
                  stopped_reason=stopped_reason, seed=seed, steps_requested=steps_requested,
                  cause=likely_cause(statistics, findings))


def assess(profile: Profile, rules: RuleSet) -> Tuple[Statistics, Tuple[Finding, ...]]:
    """Statistics → findings, without the recommendation: what deciding whether a profile has seen
    anything yet needs."""
    statistics = stats.compute(profile)
    return statistics, evaluate(statistics, rules)
