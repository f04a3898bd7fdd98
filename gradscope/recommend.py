"""Recommend a clipping method (norm, value, agc or none) and a threshold, with the evidence for it.

The method follows what the findings say clipping should address; the threshold comes from the
observed statistics, so it scales with the model: a healthy model whose norms sit near 1e3 is never
told 1.0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Tuple

import numpy as np

from . import histogram as hist
from .evaluate import Finding
from .snippets import snippets
from .stats import Statistics

NORM_HEADROOM = 2.0  # spikes: clip at twice the typical norm, so ordinary steps pass untouched
RUNAWAY_FRACTION = 0.1  # run-away: clip at a tenth of the early norm, so clipping binds on nearly every step
SAFETY_NET_HEADROOM = 10.0  # healthy: a net an order of magnitude above anything seen
VALUE_MIN_COSINE = 0.99  # value clipping only where it barely turns the gradient
DOMINANT_SHARE = 0.8
HEAVY_KURTOSIS = 100.0


@dataclasses.dataclass(frozen=True)
class Evidence:
    clip_fraction: float  # fraction of profiled steps the threshold would have clipped
    basis: str  # how the threshold was derived, in words
    cosine: Optional[float] = None  # value clipping: cosine between clipped and unclipped gradient
    element_fraction: Optional[float] = None  # value clipping: fraction of elements it would cap
    safety_net: Optional[float] = None  # method none: a generous norm threshold that clips nothing seen
    reasons: Tuple[str, ...] = ()  # rule ids of the findings that call for clipping


@dataclasses.dataclass(frozen=True)
class Recommendation:
    method: str  # "norm", "value", "agc" or "none", as timm and Lightning name them
    threshold: Optional[float]
    evidence: Evidence
    snippets: Mapping[str, str]


def recommend(statistics: Statistics, findings: Tuple[Finding, ...]) -> Recommendation:
    rec = _recommend(statistics, findings)
    if statistics.model.sharded and rec.method == "norm":
        rec = dataclasses.replace(rec, snippets=snippets(rec.method, rec.threshold, sharded=True))
    return rec


def _recommend(statistics: Statistics, findings: Tuple[Finding, ...]) -> Recommendation:
    norms = statistics.model.global_norm
    finite = norms[np.isfinite(norms) & (norms > 0)]
    reasons = tuple(dict.fromkeys(f.rule_id for f in findings if f.remedy == "clip" and f.severity != "info"))
    if not len(finite):
        return _make("none", None, Evidence(0.0, "no finite gradient norm was observed: fix the non-finite "
                                            "gradients first; no threshold can be derived", reasons=reasons))
    if not reasons:
        net = nice(SAFETY_NET_HEADROOM * float(finite.max()))
        return _make("none", None, Evidence(
            0.0, f"no finding calls for clipping; as a safety net, norm clipping at {net:.3g} "
                 f"({SAFETY_NET_HEADROOM:g}x the largest global norm seen, {finite.max():.3g}) would clip no step",
            safety_net=net))
    dominant = _dominant_layer(statistics)
    if dominant is not None and not _is_runaway(statistics):
        return _agc(statistics, dominant, reasons)
    value = _value(statistics, reasons)
    if value is not None:
        return value
    return _norm(statistics, finite, reasons)


def _norm(statistics: Statistics, finite: np.ndarray, reasons: Tuple[str, ...]) -> Recommendation:
    m = statistics.model.metrics
    norms = statistics.model.global_norm
    if _is_runaway(statistics):
        # The norm climbs (or blows up): the early steps show the level training should stay at.
        cut = _first_bad_step(norms)
        window = norms[:max(3, min(cut, len(norms) // 4 or 1))]
        window = window[np.isfinite(window) & (window > 0)]
        level = float(np.median(window)) if len(window) else float(np.median(finite))
        threshold = nice(RUNAWAY_FRACTION * level)
        basis = (f"{RUNAWAY_FRACTION:g}x the median global norm of the first {len(window)} steps ({level:.3g}), "
                 f"before training ran away (peak norm {m['global_norm_max']:.3g}, loss x{m['loss_rise']:.3g}): "
                 "clipping has to bind on nearly every step to hold the updates to the early scale")
    else:
        typical = _typical(finite)
        threshold = nice(NORM_HEADROOM * typical)
        basis = (f"{NORM_HEADROOM:g}x the typical global norm ({typical:.3g}, the median of steps without spikes); "
                 f"the largest was {m['global_norm_max']:.3g}")
    clipped = float(np.mean(~(norms <= threshold))) if len(norms) else 0.0  # NaN steps count as clipped
    return _make("norm", threshold, Evidence(clipped, basis, cosine=1.0, reasons=reasons))


def _value(statistics: Statistics, reasons: Tuple[str, ...]) -> Optional[Recommendation]:
    """Value clipping at the pooled p99.9 of |g|, when that cuts the spikes yet keeps the direction."""
    if _is_runaway(statistics):
        return None
    heavy = [l for l in statistics.active_layers if _or(l.metrics.get("grad_kurtosis"), 0.0) > HEAVY_KURTOSIS]
    if not heavy:
        return None
    pooled = statistics.model.histogram
    threshold = nice(hist.quantile(pooled, 0.999))
    if not threshold > 0:
        return None
    cosine = hist.value_clip_cosine(pooled, threshold)
    if cosine < VALUE_MIN_COSINE:
        return None
    per_step_max = np.nanmax(np.stack([l.abs_max_series for l in statistics.active_layers]), axis=0)
    basis = (f"the 99.9th percentile of |g| over all layers and steps ({threshold:.3g}); "
             f"{len(heavy)} layer(s) are heavy-tailed, so capping elements removes the outliers "
             "and keeps the gradient's direction")
    return _make("value", threshold, Evidence(
        float(np.mean(per_step_max > threshold)), basis, cosine=cosine,
        element_fraction=hist.fraction_above(pooled, threshold), reasons=reasons))


def _agc(statistics: Statistics, dominant: str, reasons: Tuple[str, ...]) -> Recommendation:
    """AGC with λ from the grad-to-weight ratios of the layers that do not dominate."""
    others = [l for l in statistics.active_layers if l.name != dominant]
    ratios = np.array([l.metrics["grad_to_weight_median"] for l in others], dtype=np.float64)
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    level = float(np.max(ratios)) if len(ratios) else 0.01
    clip_factor = nice(min(max(level, 1e-3), 1.0))
    stacked = np.stack([l.grad_to_weight_series for l in statistics.active_layers])
    clipped = float(np.mean(np.nanmax(np.where(np.isfinite(stacked), stacked, np.inf), axis=0) > clip_factor))
    share = next(l.metrics["grad_norm_share"] for l in statistics.active_layers if l.name == dominant)
    basis = (f"layer {dominant} carries {share:.0%} of the squared global norm; λ is the largest median "
             f"grad/weight ratio of the other layers ({level:.3g}), so AGC reins in the dominant layer "
             "and leaves the rest (clip rate estimated layer-wise; AGC acts unit-wise)")
    return _make("agc", clip_factor, Evidence(clipped, basis, reasons=reasons))


def _make(method: str, threshold: Optional[float], evidence: Evidence) -> Recommendation:
    return Recommendation(method, threshold, evidence, snippets(method, threshold))


def _dominant_layer(statistics: Statistics) -> Optional[str]:
    active = statistics.active_layers
    if len(active) < 3:
        return None
    best = max(active, key=lambda l: _or(l.metrics.get("grad_norm_share"), 0.0))
    return best.name if _or(best.metrics.get("grad_norm_share"), 0.0) > DOMINANT_SHARE else None


def _is_runaway(statistics: Statistics) -> bool:
    m = statistics.model.metrics
    return bool(m["nonfinite_count"] > 0 or m["loss_nonfinite"] > 0 or _or(m["loss_rise"], 1.0) > 2.0
                or (_or(m["global_norm_growth_low"], 1.0) > 1.0 and _or(m["global_norm_growth_over_run"], 1.0) > 10))


def _first_bad_step(norms: np.ndarray) -> int:
    bad = np.flatnonzero(~np.isfinite(norms))
    return int(bad[0]) if len(bad) else len(norms)


def _typical(finite: np.ndarray) -> float:
    """Median of the norms after dropping robust outliers (more than 3 MADs above, in log10)."""
    logs = np.log10(finite)
    med = np.median(logs)
    mad = max(1.4826 * np.median(np.abs(logs - med)), 0.02)
    return float(10 ** np.median(logs[logs <= med + 3 * mad]))


def nice(value: float) -> float:
    """Round to two significant digits, so the threshold reads like one a person would write."""
    if not value > 0 or not math.isfinite(value):
        return value
    digits = 1 - int(math.floor(math.log10(value)))
    return round(value, digits)


def _or(value: Optional[float], default: float) -> float:
    return default if value is None or not math.isfinite(value) else value
