"""Statistics: turn a raw Profile into per-layer and model-wide metrics, the vocabulary the rules read."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
from scipy import stats as sps

from . import histogram as hist
from .profile import Profile

START_STEPS = 3  # the first steps give the level a run starts at, before it can have blown up
TREND_POINTS = 200  # Theil-Sen is O(n²): a longer history is thinned to this many points
NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class LayerStats:
    name: str
    kind: str
    param_names: Tuple[str, ...]
    params: int
    frozen_params: int
    status: str  # "active", "unused" (no gradient reached it) or "frozen"
    norm_series: np.ndarray
    abs_max_series: np.ndarray
    grad_to_weight_series: np.ndarray
    histogram: Optional[np.ndarray]
    metrics: Mapping[str, float]
    source: Optional[Tuple[str, int]] = None


@dataclasses.dataclass(frozen=True)
class ModelStats:
    steps: int
    series_steps: np.ndarray
    global_norm: np.ndarray
    cosine: np.ndarray
    loss: np.ndarray
    histogram: np.ndarray  # pooled over layers and steps
    first_nonfinite: Optional[Tuple[int, str]]
    loss_nonfinite_step: Optional[int]
    global_spike_step: int
    measurement: str
    device: str
    metrics: Mapping[str, float]
    source: Optional[Tuple[str, int]] = None
    ranks: int = 1
    sharded: bool = False


@dataclasses.dataclass(frozen=True)
class Statistics:
    model: ModelStats
    layers: Tuple[LayerStats, ...]

    @property
    def active_layers(self) -> Tuple[LayerStats, ...]:
        return tuple(layer for layer in self.layers if layer.status == "active")


def compute(profile: Profile) -> Statistics:
    """All metrics of the registry, for the model and for every layer with trainable parameters."""
    s = profile.series
    norms = _rows(s, "grad_norm", len(profile.active))
    global_norm = s.get("global_norm", np.empty(0)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = norms**2 / (global_norm[:, None] ** 2)
        rms = _finite_median(norms, axis=0) / np.sqrt(np.array([profile.layers[i].trainable_numel for i in profile.active]))
    median_rms = _finite_median(rms[np.isfinite(rms) & (rms > 0)])
    layer_metrics = []
    for k, layer_i in enumerate(profile.active):
        layer = profile.layers[layer_i]
        m = _layer_metrics(profile, k, norms[:, k], share[:, k], rms[k] / median_rms if median_rms > 0 else NAN)
        m["params"] = float(layer.trainable_numel)
        layer_metrics.append(m)
    abs_max = _rows(s, "grad_abs_max", len(profile.active))
    g2w = _rows(s, "grad_to_weight", len(profile.active))
    layers = []
    active_index = {layer_i: k for k, layer_i in enumerate(profile.active)}
    for layer_i, info in enumerate(profile.layers):
        k = active_index.get(layer_i)
        if k is None:
            layers.append(LayerStats(info.name, info.kind, info.param_names, 0, info.frozen_numel, "frozen",
                                     np.empty(0), np.empty(0), np.empty(0), None, {}, info.source))
            continue
        status = "active" if profile.grad_present_steps[k] > 0 else "unused"
        layers.append(LayerStats(info.name, info.kind, info.param_names, info.trainable_numel, info.frozen_numel,
                                 status, norms[:, k], abs_max[:, k], g2w[:, k], profile.histograms[k],
                                 layer_metrics[k], info.source))
    model = _model_stats(profile, global_norm, layer_metrics, layers)
    return Statistics(model=model, layers=tuple(layers))


def _layer_metrics(profile: Profile, k: int, norm: np.ndarray, share: np.ndarray, rms_ratio: float) -> Dict[str, float]:
    s, steps = profile.series, profile.series_steps
    counts = profile.histograms[k]
    median = _finite_median(norm)
    peak = _finite_max(norm)
    growth, growth_low = trend(steps, norm)
    p50, p999 = hist.quantile(counts, 0.5), hist.quantile(counts, 0.999)
    g2w = _rows(s, "grad_to_weight", len(profile.active))[:, k]
    updates = _rows(s, "update_ratio", len(profile.active))[:, k]
    elements = profile.elements_total[k]
    m = {
        "grad_norm_median": median,
        "grad_norm_max": peak,
        "grad_norm_last": float(norm[-1]) if len(norm) else NAN,
        "grad_norm_peak_over_median": peak / median if median > 0 else NAN,
        "grad_norm_growth": growth,
        "grad_norm_growth_low": growth_low,
        "grad_norm_spike_z": float(profile.layer_spike_z[k]),
        "grad_norm_share": _finite_median(share),
        "grad_rms_vs_median_layer": float(rms_ratio),
        "grad_abs_max": _finite_max(_rows(s, "grad_abs_max", len(profile.active))[:, k]),
        "grad_abs_p50": p50,
        "grad_abs_p99": hist.quantile(counts, 0.99),
        "grad_abs_p999": p999,
        "grad_tail_ratio": p999 / p50 if p50 > 0 else NAN,
        "grad_kurtosis": hist.kurtosis(counts),
        "grad_mean": _finite_median(_rows(s, "grad_mean", len(profile.active))[:, k]),
        "grad_std": _finite_median(_rows(s, "grad_std", len(profile.active))[:, k]),
        "zero_fraction": float(profile.zero_total[k] / elements) if elements else NAN,
        "nonfinite_count": float(profile.nonfinite_total[k]),
        "grad_present_fraction": float(profile.grad_present_steps[k] / profile.steps) if profile.steps else NAN,
        "weight_norm": float(_rows(s, "weight_norm", len(profile.active))[-1, k]) if profile.steps else NAN,
        "grad_to_weight_median": _finite_median(g2w),
        "grad_to_weight_max": _finite_max(g2w),
        "update_ratio_median": _finite_median(updates),
        "update_ratio_max": float(profile.update_ratio_max[k]),
    }
    return m


def _model_stats(profile: Profile, global_norm: np.ndarray, layer_metrics: list, layers: list) -> ModelStats:
    s = profile.series
    loss = s.get("loss", np.empty(0)).reshape(-1)
    cosine = s.get("cosine", np.empty(0)).reshape(-1)
    finite_norm = global_norm[np.isfinite(global_norm)]
    median, peak = _finite_median(global_norm), _finite_max(global_norm)
    growth, growth_low = trend(profile.series_steps, global_norm)
    finite_loss = loss[np.isfinite(loss)]
    pooled = profile.histograms.sum(axis=0) if len(profile.histograms) else np.zeros(hist.N_BINS, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kurt = float(sps.kurtosis(finite_norm, fisher=False)) if len(finite_norm) >= 4 else NAN
    m = {
        "steps": float(profile.steps),
        "global_norm_median": median,
        "global_norm_p95": float(np.percentile(finite_norm, 95)) if len(finite_norm) else NAN,
        "global_norm_max": peak,
        "global_norm_first": float(global_norm[0]) if len(global_norm) else NAN,
        "global_norm_last": float(global_norm[-1]) if len(global_norm) else NAN,
        "global_norm_peak_over_median": peak / median if median > 0 else NAN,
        "global_norm_growth": growth,
        "global_norm_growth_low": growth_low,
        "global_norm_growth_over_run": growth ** max(profile.steps - 1, 0) if np.isfinite(growth) else NAN,
        "global_norm_spike_z": profile.global_spike_z,
        "global_norm_kurtosis": kurt,
        "grad_cosine_median": _finite_median(cosine),
        "nonfinite_count": float(profile.nonfinite_total.sum()),
        "nonfinite_steps": float(len(profile.nonfinite_steps)),
        "loss_nonfinite": 1.0 if profile.loss_nonfinite_step is not None else 0.0,
        "amp_skipped_steps": float(len(profile.amp_skipped_steps)),
        "amp_skipped_fraction": len(profile.amp_skipped_steps) / profile.steps if profile.steps else NAN,
        "loss_first": float(loss[0]) if len(loss) else NAN,
        "loss_last": float(finite_loss[-1]) if len(finite_loss) else NAN,
        "loss_rise": rise(finite_loss),
        "loss_peak_over_start": _over_start(finite_loss, _sustained_peak(finite_loss)),
        "loss_last_over_start": _over_start(finite_loss, _last_quarter(finite_loss)),
        "global_norm_peak_over_start": _over_start(finite_norm, _sustained_peak(finite_norm)),
        "max_layer_share": max((lm["grad_norm_share"] for lm in layer_metrics if np.isfinite(lm["grad_norm_share"])),
                               default=NAN),
        "active_layers": float(sum(1 for layer in layers if layer.status == "active")),
        "unused_layers": float(sum(1 for layer in layers if layer.status == "unused")),
    }
    return ModelStats(
        steps=profile.steps, series_steps=profile.series_steps, global_norm=global_norm, cosine=cosine, loss=loss,
        histogram=pooled, first_nonfinite=profile.first_nonfinite, loss_nonfinite_step=profile.loss_nonfinite_step,
        global_spike_step=profile.global_spike_step, measurement=profile.measurement, device=profile.device, metrics=m,
        source=profile.model_source, ranks=profile.ranks, sharded=profile.sharded,
    )


def _rows(series: Mapping[str, np.ndarray], name: str, width: int) -> np.ndarray:
    rows = series.get(name)
    return rows.reshape(-1, width) if rows is not None and rows.size else np.empty((0, width))


def trend(steps: np.ndarray, values: np.ndarray) -> Tuple[float, float]:
    """Theil-Sen growth factor per step of the values (and its 90% lower bound), on a log10 scale."""
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log10(values)
    ok = np.isfinite(y)
    x, y = np.asarray(steps, dtype=np.float64)[ok], y[ok]
    if len(y) < 4 or np.ptp(x) == 0:
        return NAN, NAN
    if len(y) > TREND_POINTS:
        pick = np.linspace(0, len(y) - 1, TREND_POINTS).astype(int)
        x, y = x[pick], y[pick]
    slope, _, low, _ = sps.theilslopes(y, x, alpha=0.90)
    return float(10**slope), float(10**low)


def start_level(values: np.ndarray) -> float:
    """The level a run starts at: the median of its first START_STEPS finite values."""
    return float(np.median(values[:START_STEPS])) if len(values) else NAN


def _over_start(values: np.ndarray, value: float) -> float:
    """``value`` over the start level; NaN unless both are positive (a loss can be negative)."""
    start = start_level(values)
    return value / start if start > 0 and value > 0 else NAN


def _sustained_peak(values: np.ndarray) -> float:
    """The largest median of START_STEPS consecutive values: a peak held for several steps, not one outlier batch."""
    if len(values) < START_STEPS:
        return NAN
    windows = np.lib.stride_tricks.sliding_window_view(values, START_STEPS)
    return float(np.median(windows, axis=1).max())


def _last_quarter(values: np.ndarray) -> float:
    return float(np.median(values[-max(len(values) // 4, 1):])) if len(values) else NAN


def rise(values: np.ndarray) -> float:
    """Median of the last quarter over the median of the first quarter; NaN unless both are positive."""
    if len(values) < 4:
        return NAN
    q = max(len(values) // 4, 1)
    first, last = float(np.median(values[:q])), float(np.median(values[-q:]))
    return last / first if first > 0 and last > 0 else NAN


def _finite_median(values: np.ndarray, axis=None):
    a = np.asarray(values, dtype=np.float64)
    if axis is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(np.where(np.isfinite(a), a, np.nan), axis=axis)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else NAN


def _finite_max(values: np.ndarray) -> float:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else NAN
