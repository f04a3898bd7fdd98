"""Recommend a clipping method (norm, value, agc or none) and a threshold, with the evidence for it.

The method is the remedy the rules name: a finding at warning or error severity whose rule names
``remedy: norm`` (or value, agc) calls for that kind of clipping. A norm threshold comes from trials
(:mod:`gradscope.run.trials`) when they ran; without them it is an estimate from the observed norms.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from ..analyse import histogram as hist
from ..analyse.clipping import PER_STEP
from ..analyse.evaluate import Finding
from .guards import Skip, replay_skips
from .judge import TrialSet, two_figures
from .reasons import Reasons, because
from ..analyse.ruleset import SEVERITIES
from .snippets import snippets
from ..analyse.stats import Statistics, start_level

# Estimates, used only when no trial ran (--trials off, a Monitor's report) or none stayed stable:
NORM_HEADROOM = 2.0  # spikes (warnings): clip at twice the typical norm, so ordinary steps pass untouched
RUNAWAY_FRACTION = 0.1  # a run-away (errors): a tenth of the start norm, so clipping binds on nearly every step
SAFETY_NET_HEADROOM = 10.0  # healthy: a net an order of magnitude above anything seen
VALUE_MIN_COSINE = 0.99  # value clipping only where it barely turns the gradient
# The skip guard is for rare events. An outlier that recurs more often than this (in the profile and the
# winning trial together, seen at least twice) is part of the data: at this rate k earlier outliers of the
# same size among n steps leave the next one about sqrt(n / k) = 6 standard deviations out, so a window
# that held them would no longer call it an outlier. Skipping it would throw data away; the clipping the
# trials chose, with those steps in them, handles it.
FREQUENT_OUTLIERS = 1 / 36
METHOD_ORDER = PER_STEP  # ties between remedies go to the one that keeps the direction (analyse/clipping.py)


@dataclasses.dataclass(frozen=True)
class Evidence:
    clip_fraction: float  # fraction of steps the threshold clipped (in the winning trial, or the profile)
    basis: Reasons  # how the threshold was derived (words: gradscope.present.wording.say)
    cosine: Optional[float] = None  # cosine between clipped and unclipped gradient (1 for norm clipping)
    element_fraction: Optional[float] = None  # value clipping: fraction of elements it would cap
    safety_net: Optional[float] = None  # method none: a generous norm threshold that clips nothing seen
    reasons: Tuple[str, ...] = ()  # rule ids of the findings that call for clipping
    trials: Optional[TrialSet] = None  # the trials behind a norm threshold, when they ran


@dataclasses.dataclass(frozen=True)
class GuardAdvice:
    """The skip-step guard, armed beside the clipping: its settings and what it would have done."""
    skip: Skip
    armed: bool  # False where the outliers it would skip recur too often to be anything but data
    reasons: Tuple[str, ...]  # rule ids of the findings that call for it (remedy: skip)
    steps: int  # profiled steps it was replayed on
    judged: int  # profiled (and winning-trial) steps the rule could judge: past min_history
    would_skip: Tuple[int, ...]  # the profiled steps it would have skipped
    trial_skips: Optional[int]  # the winning trial's steps it would have skipped (None: no trial)
    basis: Reasons


@dataclasses.dataclass(frozen=True)
class Recommendation:
    method: str  # "norm", "value", "agc" or "none", as timm and Lightning name them
    threshold: Optional[float]
    evidence: Evidence
    snippets: Mapping[str, str]
    guard: Optional[GuardAdvice] = None  # the skip-step guard, where a finding calls for it


def calling_for_clipping(findings: Sequence[Finding]) -> Tuple[Finding, ...]:
    """The findings that call for clipping: a clipping remedy, at warning or error severity; none at all
    where an error that clipping does not remedy says the run measured is not training (see ``blocking``)."""
    if blocking(findings):
        return ()
    return tuple(f for f in findings if f.remedy not in ("none", "skip") and f.severity != "info")


def blocking(findings: Sequence[Finding]) -> Tuple[str, ...]:
    """The rules whose errors name no remedy (an optimizer that holds none of the model's parameters): the
    run measured is not the run to clip, and no threshold read from it means anything until they are fixed."""
    return tuple(dict.fromkeys(f.rule_id for f in findings if f.severity == "error" and f.remedy == "none"))


def method_for(findings: Sequence[Finding]) -> str:
    """The remedy of the most severe calling findings; "none" when nothing calls for clipping."""
    calling = calling_for_clipping(findings)
    if not calling:
        return "none"
    worst = max(SEVERITIES.index(f.severity) for f in calling)
    named = {f.remedy for f in calling if SEVERITIES.index(f.severity) == worst}
    return next(m for m in METHOD_ORDER if m in named)


def recommend(statistics: Statistics, findings: Tuple[Finding, ...],
              trials: Optional[TrialSet] = None) -> Recommendation:
    rec = _recommend(statistics, findings, trials)
    guard = guard_for(statistics, findings, trials)
    if guard is not None or (statistics.model.sharded and rec.method == "norm"):
        rec = dataclasses.replace(rec, guard=guard, snippets=snippets(
            rec.method, rec.threshold, sharded=statistics.model.sharded,
            safety_net=rec.evidence.safety_net, skip=guard.skip if guard and guard.armed else None))
    return rec


def guard_for(statistics: Statistics, findings: Sequence[Finding], trials: Optional[TrialSet]) -> Optional[GuardAdvice]:
    """The skip-step guard when a finding names it as its remedy (at any severity: it is insurance, and
    leaves every ordinary step alone), with the steps it would have skipped in the profile and in the
    winning trial."""
    reasons = tuple(dict.fromkeys(f.rule_id for f in findings if f.remedy == "skip"))
    if not reasons:
        return None
    skip = Skip()
    m = statistics.model
    skipped = tuple(replay_skips(m.global_norm, m.loss, skip))
    judged = max(0, len(m.global_norm) - skip.min_history)
    winner = None if trials is None or trials.winner is None else \
        next(t for t in trials.trials if t.threshold == trials.winner)
    trial_skips = None
    if winner is not None:
        trial_skips = len(replay_skips(winner.norms, winner.losses, skip))
        judged += max(0, len(winner.norms) - skip.min_history)
    seen = len(skipped) + (trial_skips or 0)
    armed = not (seen >= 2 and seen / max(judged, 1) > FREQUENT_OUTLIERS)
    basis = [because("guard_rule", z=skip.z, window=skip.window, profiled=m.steps, skipped=skipped,
                     trial_skips=trial_skips, trial_steps=None if winner is None else len(winner.norms),
                     min_history=skip.min_history)]
    if not armed:
        basis.append(because("guard_not_armed", seen=seen, judged=judged, one_in=round(1 / FREQUENT_OUTLIERS)))
    return GuardAdvice(skip, armed, reasons, m.steps, judged, skipped, trial_skips, tuple(basis))


def _recommend(statistics: Statistics, findings: Tuple[Finding, ...], trials: Optional[TrialSet]) -> Recommendation:
    norms = statistics.model.global_norm
    finite = norms[np.isfinite(norms) & (norms > 0)]
    reasons = tuple(dict.fromkeys(f.rule_id for f in calling_for_clipping(findings)))
    if not len(finite):
        return _recommendation("none", None, Evidence(0.0, (because("no_finite_norm"),), reasons=reasons))
    if blocking(findings):
        return _recommendation("none", None, Evidence(0.0, (because("fix_first", rules=blocking(findings)),)))
    method = method_for(findings)
    if method == "none":
        net = two_figures(SAFETY_NET_HEADROOM * float(finite.max()))
        return _recommendation("none", None, Evidence(
            0.0, (because("safety_net", net=net, headroom=SAFETY_NET_HEADROOM, largest=float(finite.max())),),
            safety_net=net))
    if method == "agc":
        return _agc(statistics, findings, reasons)
    if method == "value":
        value = _value(statistics, reasons)
        if value is not None:
            return value
    if trials is not None and trials.winner is not None:
        return _from_trials(trials, reasons)
    return _norm(statistics, finite, findings, reasons, trials)


def _from_trials(trials: TrialSet, reasons: Tuple[str, ...]) -> Recommendation:
    winner = next(t for t in trials.trials if t.threshold == trials.winner)
    basis = because("trials", tried=len(trials.trials), steps=trials.steps,
                    carried=trials.longest if trials.longest > trials.steps else None, ruling=trials.reason)
    return _recommendation("norm", trials.winner, Evidence(winner.clip_fraction, (basis,), cosine=1.0, reasons=reasons,
                                                           trials=trials))


def _norm(statistics: Statistics, finite: np.ndarray, findings: Sequence[Finding], reasons: Tuple[str, ...],
          trials: Optional[TrialSet]) -> Recommendation:
    m = statistics.model.metrics
    norms = statistics.model.global_norm
    runaway = any(f.severity == "error" for f in calling_for_clipping(findings))
    if runaway:
        level = start_level(finite)
        threshold = two_figures(RUNAWAY_FRACTION * level)
        estimate = because("estimate_runaway", fraction=RUNAWAY_FRACTION, level=level, peak=m["global_norm_max"])
    else:
        typical = _typical(finite)
        threshold = two_figures(NORM_HEADROOM * typical)
        estimate = because("estimate_typical", headroom=NORM_HEADROOM, typical=typical, largest=m["global_norm_max"])
    basis: Reasons
    if trials is not None:  # trials ran, and none stayed stable
        basis = (because("fallback", ruling=trials.reason, estimate=estimate),)
    else:  # trials off, or a Monitor's report
        basis = (estimate, because("not_confirmed"))
    clipped = float(np.mean(~(norms <= threshold))) if len(norms) else 0.0  # NaN steps count as clipped
    return _recommendation("norm", threshold, Evidence(clipped, basis, cosine=1.0, reasons=reasons, trials=trials))


def _value(statistics: Statistics, reasons: Tuple[str, ...]) -> Optional[Recommendation]:
    """Value clipping at the pooled p99.9 of |g|, when that cuts the spikes yet keeps the direction."""
    pooled = statistics.model.histogram
    threshold = two_figures(hist.quantile(pooled, 0.999))
    if not threshold > 0:
        return None
    cosine = hist.value_clip_cosine(pooled, threshold)
    if cosine < VALUE_MIN_COSINE:
        return None
    per_step_max = np.nanmax(np.stack([l.abs_max_series for l in statistics.active_layers]), axis=0)
    basis = (because("value_quantile", threshold=threshold, cosine=cosine),)
    return _recommendation("value", threshold, Evidence(
        float(np.mean(per_step_max > threshold)), basis, cosine=cosine,
        element_fraction=hist.fraction_above(pooled, threshold), reasons=reasons))


def _agc(statistics: Statistics, findings: Sequence[Finding], reasons: Tuple[str, ...]) -> Recommendation:
    """AGC with λ from the grad-to-weight ratios of the layers the AGC findings do not name."""
    named = {f.layer for f in calling_for_clipping(findings) if f.remedy == "agc" and f.layer}
    others = [l for l in statistics.active_layers if l.name not in named] or list(statistics.active_layers)
    ratios = np.array([l.metrics["grad_to_weight_median"] for l in others], dtype=np.float64)
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    level = float(np.max(ratios)) if len(ratios) else 0.01
    clip_factor = two_figures(min(max(level, 1e-3), 1.0))
    stacked = np.stack([l.grad_to_weight_series for l in statistics.active_layers])
    clipped = float(np.mean(np.nanmax(np.where(np.isfinite(stacked), stacked, np.inf), axis=0) > clip_factor))
    basis = (because("agc_ratio", layers=tuple(sorted(named)), level=level),)
    return _recommendation("agc", clip_factor, Evidence(clipped, basis, reasons=reasons))


def _recommendation(method: str, threshold: Optional[float], evidence: Evidence) -> Recommendation:
    return Recommendation(method, threshold, evidence, snippets(method, threshold))


def _typical(finite: np.ndarray) -> float:
    """Median of the norms after dropping robust outliers (more than 3 MADs above, in log10)."""
    logs = np.log10(finite)
    med = np.median(logs)
    mad = max(1.4826 * np.median(np.abs(logs - med)), 0.02)
    return float(10 ** np.median(logs[logs <= med + 3 * mad]))
