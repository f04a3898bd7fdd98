"""Statistics: turn a raw Profile into per-layer and model-wide metrics, the vocabulary the rules read."""
from __future__ import annotations

import dataclasses
import warnings
from statistics import NormalDist
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from . import histogram as hist
from .clipping import ClippingSummary, levels, longest_rate
from .profile import Profile

START_STEPS = 3  # the first steps give the level a run starts at, before it can have blown up
TREND_POINTS = 64  # Theil-Sen is O(n²): a longer history is reduced to the medians of this many blocks
TREND_ALPHA = 0.90  # the growth's lower bound is the one-sided 95% bound of Theil-Sen's 90% interval
_Z = NormalDist().inv_cdf((1 - TREND_ALPHA) / 2)  # as scipy.stats.theilslopes computes it
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
    # the steps up to the first non-finite one, whole: ``steps``, ``global_norm``, ``layers`` (names) and
    # ``grad_norm``, ``grad_abs_max``, ``nonfinite`` (steps × layers); see ``Profile.before_nonfinite``
    before_nonfinite: Optional[Mapping[str, Any]] = None
    # the user's own clipping: what it did (gradscope.analyse.clipping.ClippingSummary), and the post-clip global
    # norm and the clipped-unclipped cosine at the series' steps; None / empty where not watched
    clip: Optional[ClippingSummary] = None
    post_clip_norm: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0))
    clip_cosine: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0))
    optimizer: Optional[Any] = None  # gradscope.analyse.profile.OptimizerSetup, where the optimizer was known
    spikes: Tuple[Any, ...] = ()  # gradscope.analyse.profile.SpikeSamples: diagnose's spikes taken apart


@dataclasses.dataclass(frozen=True)
class Statistics:
    model: ModelStats
    layers: Tuple[LayerStats, ...]

    @property
    def active_layers(self) -> Tuple[LayerStats, ...]:
        return tuple(layer for layer in self.layers if layer.status == "active")


def compute(profile: Profile) -> Statistics:
    """All metrics of the registry, for the model and for every layer with trainable parameters.

    Every per-layer figure is computed for all layers at once, column by column of the (steps x layers)
    series, so the cost grows with the size of the series, not with a Python loop per layer.
    """
    s = profile.series
    width = len(profile.active)
    norms = _rows(s, "grad_norm", width)
    global_norm = s.get("global_norm", np.empty(0)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = norms**2 / (global_norm[:, None] ** 2)
        rms = _finite_median(norms, axis=0) / np.sqrt(np.array([profile.layers[i].trainable_numel for i in profile.active]))
    median_rms = _finite_median(rms[np.isfinite(rms) & (rms > 0)])
    abs_max = _rows(s, "grad_abs_max", width)
    g2w = _rows(s, "grad_to_weight", width)
    columns = _layer_columns(profile, norms, share, abs_max, g2w)
    columns["grad_rms_vs_median_layer"] = rms / median_rms if median_rms > 0 else np.full(width, NAN)
    names = list(columns)
    table = np.stack([np.asarray(columns[n], dtype=np.float64) for n in names], axis=1) if width else \
        np.empty((0, len(names)))
    layer_metrics = [dict(zip(names, row.tolist())) for row in table]
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
                                 status, norms[:, k].copy(), abs_max[:, k].copy(), g2w[:, k].copy(), profile.histograms[k],
                                 layer_metrics[k], info.source))
    model = _model_stats(profile, global_norm, layer_metrics, layers)
    return Statistics(model=model, layers=tuple(layers))


def _layer_columns(profile: Profile, norms: np.ndarray, share: np.ndarray, abs_max: np.ndarray, g2w: np.ndarray
                   ) -> Dict[str, np.ndarray]:
    """Each layer metric as one array over the active layers (the registry's order)."""
    s, width = profile.series, len(profile.active)
    counts = profile.histograms
    median, peak = _finite_median(norms, axis=0), _finite_max(norms, axis=0)
    growth, growth_low = trends(profile.series_steps, norms)
    p50, p99, p999 = (hist.quantiles(counts, q) if width else np.empty(0) for q in (0.5, 0.99, 0.999))
    updates = _rows(s, "update_ratio", width)
    weights = _rows(s, "weight_norm", width)
    elements = np.asarray(profile.elements_total, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "grad_norm_median": median,
            "grad_norm_max": peak,
            "grad_norm_last": norms[-1] if len(norms) else np.full(width, NAN),
            "grad_norm_peak_over_median": np.where(median > 0, peak / median, NAN),
            "grad_norm_growth": growth,
            "grad_norm_growth_low": growth_low,
            "grad_norm_spike_z": np.asarray(profile.layer_spike_z, dtype=np.float64),
            "grad_norm_share": _finite_median(share, axis=0),
            "grad_abs_max": _finite_max(abs_max, axis=0),
            "grad_abs_p50": p50,
            "grad_abs_p99": p99,
            "grad_abs_p999": p999,
            "grad_tail_ratio": np.where(p50 > 0, p999 / p50, NAN),
            "grad_kurtosis": hist.kurtoses(counts) if width else np.empty(0),
            "grad_mean": _finite_median(_rows(s, "grad_mean", width), axis=0),
            "grad_std": _finite_median(_rows(s, "grad_std", width), axis=0),
            "zero_fraction": np.where(elements > 0, np.asarray(profile.zero_total) / elements, NAN),
            "nonfinite_count": np.asarray(profile.nonfinite_total, dtype=np.float64),
            "grad_present_fraction": np.asarray(profile.grad_present_steps, dtype=np.float64) / profile.steps
            if profile.steps else np.full(width, NAN),
            "weight_norm": weights[-1] if profile.steps and len(weights) else np.full(width, NAN),
            "grad_to_weight_median": _finite_median(g2w, axis=0),
            "grad_to_weight_max": _finite_max(g2w, axis=0),
            "update_ratio_median": _finite_median(updates, axis=0),
            "update_ratio_max": np.asarray(profile.update_ratio_max, dtype=np.float64),
            "update_rms_median": _finite_median(updates * weights, axis=0) /
            np.sqrt(np.array([profile.layers[i].trainable_numel for i in profile.active], dtype=np.float64))
            if len(updates) else np.full(width, NAN),
            **_optimizer_layer_columns(profile.optimizer, width),
            "params": np.array([profile.layers[i].trainable_numel for i in profile.active], dtype=np.float64),
        }


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
        kurt = _kurtosis(finite_norm) if len(finite_norm) >= 4 else NAN
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
        "global_norm_growth_over_run": growth ** (max(profile.steps - 1, 0) * profile.every)
        if np.isfinite(growth) else NAN,
        "global_norm_spike_z": profile.global_spike_z,
        "global_norm_kurtosis": kurt,
        "grad_cosine_median": _finite_median(cosine),
        "grad_cosine_negative_fraction": _finite_share(cosine < 0, cosine),
        "nonfinite_count": float(profile.nonfinite_total.sum()),
        "nonfinite_steps": float(len(profile.nonfinite_steps)),
        "loss_nonfinite": 1.0 if profile.loss_nonfinite_step is not None else 0.0,
        "amp_skipped_steps": float(len(profile.amp_skipped_steps)),
        "amp_skipped_fraction": len(profile.amp_skipped_steps) / profile.steps if profile.steps else NAN,
        "adaptive_optimizer": NAN if profile.adaptive_optimizer is None else float(profile.adaptive_optimizer),
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
        **clip_metrics(profile.clip, _finite_max(global_norm)),
        **_trial_metrics(profile.trials),
        **optimizer_metrics(profile.optimizer),
        **spike_metrics(profile.spikes),
    }
    return ModelStats(
        steps=profile.steps, series_steps=profile.series_steps, global_norm=global_norm.copy(), cosine=cosine.copy(),
        loss=loss.copy(),
        histogram=pooled, first_nonfinite=profile.first_nonfinite, loss_nonfinite_step=profile.loss_nonfinite_step,
        global_spike_step=profile.global_spike_step, measurement=profile.measurement, device=profile.device, metrics=m,
        source=profile.model_source, ranks=profile.ranks, sharded=profile.sharded,
        before_nonfinite=None if profile.before_nonfinite is None else
        {**profile.before_nonfinite, "layers": tuple(profile.layers[i].name for i in profile.active)},
        clip=profile.clip, post_clip_norm=s.get("post_clip_norm", np.empty(0)).reshape(-1).copy(),
        clip_cosine=s.get("clip_cosine", np.empty(0)).reshape(-1).copy(),
        optimizer=profile.optimizer, spikes=profile.spikes,
    )


def _optimizer_layer_columns(setup: Any, width: int) -> Dict[str, np.ndarray]:
    """Adam's second moment per layer (see gradscope.collect.optimizers); NaN where the optimizer is unknown."""
    if setup is None:
        return {"adam_eps_dominated_share": np.full(width, NAN), "adam_outlier_share": np.full(width, NAN)}
    return {"adam_eps_dominated_share": np.asarray(setup.eps_dominated, dtype=np.float64),
            "adam_outlier_share": np.asarray(setup.outliers, dtype=np.float64)}


OPTIMIZER_METRICS = ("optimizer_missed_share", "optimizer_missed_params", "decayed_exempt_params",
                     "decayed_exempt_weight_decay", "optimizer_eps", "optimizer_beta2")


def optimizer_metrics(setup: Any) -> Dict[str, float]:
    """The optimizer's configuration as model metrics (all NaN where the Monitor was not given it)."""
    if setup is None:
        return dict.fromkeys(OPTIMIZER_METRICS, NAN)
    return {"optimizer_missed_share": setup.missed_numel / setup.trainable_numel if setup.trainable_numel else NAN,
            "optimizer_missed_params": float(len(setup.missed)),
            "decayed_exempt_params": float(len(setup.decayed_exempt)),
            "decayed_exempt_weight_decay": setup.weight_decay, "optimizer_eps": setup.eps,
            "optimizer_beta2": setup.beta2}


SPIKE_METRICS = ("spike_top2_share", "spike_loss_over_previous", "spike_nonfinite_samples",
                 "spike_nonfinite_inputs", "spike_batch_size")


def spike_metrics(spikes: Tuple[Any, ...]) -> Dict[str, float]:
    """The first spike taken apart, as model metrics (all NaN where none was): the share of its squared norm
    that its two largest samples carry (NaN where some sample's gradient was not finite), its batch's loss
    over the batch before's at the same weights, its samples with a non-finite gradient and with an inf or
    NaN in their own tensors, and its batch size. Every one reads the same spike."""
    out = dict.fromkeys(SPIKE_METRICS, NAN)
    if not spikes:
        return out
    first = spikes[0]
    out["spike_nonfinite_inputs"] = float(len(first.nonfinite_inputs))
    out["spike_batch_size"] = float(first.batch_size)
    if np.isfinite(first.batch_loss) and np.isfinite(first.previous_loss) and first.previous_loss > 0:
        out["spike_loss_over_previous"] = float(first.batch_loss / first.previous_loss)
    if first.samples:
        finite = [np.isfinite(s.grad_norm) for s in first.samples]
        out["spike_nonfinite_samples"] = float(len(finite) - sum(finite))
        if all(finite):
            out["spike_top2_share"] = float(sum(s.share for s in first.samples[:2]))
    return out


CLIP_METRICS = ("clip_threshold", "clip_steps", "clip_rate", "clip_rate_window", "clip_window_steps",
                "clip_scale_mean", "clip_capped_fraction", "clip_cosine_min", "clip_reference_norm",
                "clip_recent_norm", "clip_norm_drift", "clip_headroom", "clip_spikes")


def clip_metrics(record: Any, norm_max: float) -> Dict[str, float]:
    """The user's clipping over the run, as model metrics (all NaN where the Monitor was not told of it).
    Where the Clipper clipped adaptively, its own counts give the rate."""
    out = dict.fromkeys(CLIP_METRICS, NAN)
    if record is None:
        return out
    spec = record.spec
    out["clip_threshold"] = spec.threshold if spec.threshold is not None else NAN
    guard = record.guard or {}
    if not spec.per_step:  # adaptive: the Clipper counted what it did
        steps = float(guard.get("steps", 0))
        out.update(clip_steps=steps, clip_rate=guard.get("clipped", 0) / steps if steps else NAN,
                   clip_scale_mean=float(guard.get("mean_clip_scale", NAN)), clip_spikes=float(len(record.spikes)))
        return out
    window, span = longest_rate(record)
    reference, recent = levels(record)
    reference = spec.reference_norm or reference
    drift = recent / reference if reference > 0 else NAN
    with np.errstate(divide="ignore", invalid="ignore"):
        out.update(
            clip_steps=float(record.steps), clip_rate=record.rate(), clip_rate_window=window,
            clip_window_steps=float(span),
            clip_scale_mean=float(np.exp(record.log_scale_sum / record.clipped)) if record.clipped else 1.0,
            clip_capped_fraction=record.capped_sum / record.capped_total if record.capped_total else NAN,
            clip_cosine_min=record.cosine_min if spec.method != "norm" else 1.0,
            clip_reference_norm=reference, clip_recent_norm=recent,
            clip_norm_drift=max(drift, 1 / drift) if drift > 0 else NAN,
            clip_headroom=spec.threshold / norm_max if spec.method == "norm" and norm_max > 0 else NAN,
            clip_spikes=float(len(record.spikes)),
        )
    return {k: float(v) for k, v in out.items()}


def _rows(series: Mapping[str, np.ndarray], name: str, width: int) -> np.ndarray:
    rows = series.get(name)
    return rows.reshape(-1, width) if rows is not None and rows.size else np.empty((0, width))


def trend(steps: np.ndarray, values: np.ndarray) -> Tuple[float, float]:
    """Theil-Sen growth factor per step of the values (and its 90% lower bound), on a log10 scale.

    A series longer than TREND_POINTS is first reduced to the medians of TREND_POINTS consecutive
    blocks (steps and log values alike): Theil-Sen is O(n²), and block medians keep the estimate
    within about 1% of the exact one on 1,000 noisy steps, where picking as many single points misses
    by up to 9% (tests/test_stats.py states both).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log10(np.asarray(values, dtype=np.float64))
    ok = np.isfinite(y)
    x, y = _blocks(np.asarray(steps, dtype=np.float64)[ok]), _blocks(y[ok])
    if len(y) < 4 or np.ptp(x) == 0:
        return NAN, NAN
    if (np.diff(x) > 0).all():  # block medians of increasing steps: the array path, exactly scipy's figures
        growth, low = _theil_sen(x[:, None], y[:, None])
        return float(growth[0]), float(low[0])
    from scipy.stats import theilslopes  # tied steps: scipy's correction for them (loaded only then)
    slope, _, low, _ = theilslopes(y, x, alpha=TREND_ALPHA)
    return float(10**slope), float(10**low)


def _kurtosis(values: np.ndarray) -> float:
    """Pearson's kurtosis (the normal's is 3), as ``scipy.stats.kurtosis(values, fisher=False)``; NaN for
    a constant series."""
    centred = values - values.mean()
    m2 = np.mean(centred**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(centred**4) / m2**2) if m2 > 0 else NAN


def trends(steps: np.ndarray, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`trend` of every column of a (steps x series) array, all at once.

    Each column's finite, positive values are reduced to block medians as :func:`trend` reduces them;
    the columns with holes (a layer whose norm underflows to 0 at some steps, a series measured on a
    cadence) each have their own blocks, and all of them are found by one sort (:func:`_ragged_blocks`).
    Columns with the same number of blocks and no tied values then get their Theil-Sen slopes as one
    array operation and their interval as one pair of order statistics, exactly as scipy computes them;
    a column with tied values goes to scipy with its blocks as they are.
    """
    values = np.asarray(values, dtype=np.float64)
    width = values.shape[1] if values.ndim == 2 else 0
    growth, low = np.full(width, NAN), np.full(width, NAN)
    if not width or not len(values):
        return growth, low
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(values)
    steps = np.asarray(steps, dtype=np.float64)
    if len(steps) > 1 and not (np.diff(steps) > 0).all():  # tied steps: scipy's correction for them, column by column
        for k in range(width):
            growth[k], low[k] = trend(steps, values[:, k])
        return growth, low
    finite = np.isfinite(logs)
    clean = finite.all(axis=0)
    if clean.any():
        x = _blocks(steps)
        growth[clean], low[clean] = _theil_sen(np.repeat(x[:, None], clean.sum(), axis=1), _blocks(logs[:, clean]))
    holed = np.flatnonzero(~clean)
    if len(holed):
        counts = finite[:, holed].sum(axis=0)
        xs, ys = _ragged_blocks(steps, logs[:, holed], finite[:, holed])
        for n in np.unique(np.minimum(counts, TREND_POINTS)):
            cols = np.flatnonzero(np.minimum(counts, TREND_POINTS) == n)
            if n >= 4:
                x = np.stack([xs[k] for k in cols], axis=1)
                growth[holed[cols]], low[holed[cols]] = _theil_sen(x, np.stack([ys[k] for k in cols], axis=1))
    return growth, low


def _ragged_blocks(steps: np.ndarray, logs: np.ndarray, finite: np.ndarray):
    """For each column, the block medians of its finite values and of their steps, as :func:`_blocks` takes
    them from that column's finite values alone: one lexsort over every value, not a median per block."""
    col, row = np.nonzero(finite.T)  # column-major: each column's finite rows, in order
    counts = finite.sum(axis=0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(col)) - starts[col]
    n = counts[col]
    size, extra = n // TREND_POINTS, n % TREND_POINTS  # np.array_split: the first `extra` blocks hold one more
    blocked = n > TREND_POINTS
    head = extra * (size + 1)
    block = np.where(~blocked, position,
                     np.where(position < head, position // np.maximum(size + 1, 1),
                              extra + (position - head) // np.maximum(size, 1)))
    xs = _group_medians(col, block, steps[row], len(counts))
    ys = _group_medians(col, block, logs[row, col], len(counts))
    return xs, ys


def _group_medians(col: np.ndarray, block: np.ndarray, v: np.ndarray, width: int):
    """The median of ``v`` in every (column, block) group, as np.median takes it: the middle value, or the
    mean of the two middle ones; a list over the columns of each column's medians, block by block."""
    if not len(v):  # no column has a finite value
        return [np.empty(0) for _ in range(width)]
    order = np.lexsort((v, block, col))
    col, block, v = col[order], block[order], v[order]
    first = np.flatnonzero(np.r_[True, (col[1:] != col[:-1]) | (block[1:] != block[:-1])])
    size = np.diff(np.r_[first, len(v)])
    medians = np.mean([v[first + (size - 1) // 2], v[first + size // 2]], axis=0)
    owner = col[first]
    return np.split(medians, np.searchsorted(owner, np.arange(1, width)))


def _theil_sen(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """10 ** the Theil-Sen slope of every column of ``y`` against the same column of ``x`` (blocks x columns,
    each column's x strictly increasing), and 10 ** its TREND_ALPHA lower bound, as scipy's theilslopes."""
    growth, low = np.full(y.shape[1], NAN), np.full(y.shape[1], NAN)
    n = len(x)
    spread = np.ptp(x, axis=0) > 0
    if n < 4:
        return growth, low
    ordered = np.sort(y, axis=0)
    tied = (ordered[1:] == ordered[:-1]).any(axis=0)
    i, j = np.nonzero(np.arange(n)[:, None] > np.arange(n)[None, :])  # every pair with a later step
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = (y[i] - y[j]) / (x[i] - x[j])
    pairs = len(i)
    middle = [(pairs - 1) // 2, pairs // 2]
    lower = _lower_index(pairs, n * (n - 1) * (2 * n + 5) / 18.0)  # no tied steps: block medians of increasing steps
    slopes.partition(sorted({lower, *middle}), axis=0)
    fast = spread & ~tied
    growth[fast] = (10 ** (0.5 * (slopes[middle[0]] + slopes[middle[1]])))[fast]
    low[fast] = (10 ** slopes[lower])[fast]
    for k in np.flatnonzero(spread & tied):  # tied values narrow the interval: Sen's (2.6), as scipy applies it
        counts = np.unique(y[:, k], return_counts=True)[1]
        repeats = counts[counts > 1].astype(np.float64)
        variance = (n * (n - 1) * (2 * n + 5) - np.sum(repeats * (repeats - 1) * (2 * repeats + 5))) / 18.0
        at = _lower_index(pairs, variance)
        column = np.partition(slopes[:, k], sorted({at, *middle}))
        growth[k] = 10 ** (0.5 * (column[middle[0]] + column[middle[1]]))
        low[k] = 10 ** column[at] if at >= 0 else NAN
    return growth, low


def _lower_index(pairs: int, variance: float) -> int:
    """The order statistic of the pairwise slopes that bounds Theil-Sen's slope from below at TREND_ALPHA,
    from Sen's variance of the Kendall statistic (scipy.stats.theilslopes's ``Rl``); -1 where none does."""
    if not variance >= 0:
        return -1
    return max(int(np.round((pairs + _Z * np.sqrt(variance)) / 2.0)) - 1, 0)


def _blocks(values: np.ndarray) -> np.ndarray:
    """The medians of TREND_POINTS consecutive blocks along the first axis (the values as they are if shorter)."""
    if len(values) <= TREND_POINTS:
        return values
    return np.stack([np.median(values[b], axis=0) for b in np.array_split(np.arange(len(values)), TREND_POINTS)])


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


def _finite_share(mask: np.ndarray, values: np.ndarray) -> float:
    """The share of the finite ``values`` where ``mask`` holds (NaN where none is finite)."""
    finite = np.isfinite(values)
    return float(np.mean(mask[finite])) if finite.any() else NAN


def _finite_median(values: np.ndarray, axis=None):
    a = np.asarray(values, dtype=np.float64)
    if axis is not None:
        if a.shape[axis] == 0:
            return np.full(a.shape[1 - axis] if a.ndim == 2 else 0, NAN)
        return _column_medians(a if axis == 0 else a.T)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else NAN


def _column_medians(a: np.ndarray) -> np.ndarray:
    """The median of the finite values of each column (NaN where there is none), in a few array passes.

    numpy's nanmedian falls back to a Python loop over columns once any value is NaN, and series have
    NaN rows (a step whose update was not read). Rows that are missing in every column are dropped; what
    is then complete goes through np.median at once, and only a ragged remainder is sorted.
    """
    ok = np.isfinite(a)
    if not ok.all():
        a, ok = a[ok.any(axis=1)], ok[ok.any(axis=1)]
    if ok.all():
        return np.median(a, axis=0) if len(a) else np.full(a.shape[1], NAN)
    ordered = np.sort(np.where(ok, a, np.inf), axis=0)  # missing values sort last
    n = ok.sum(axis=0)
    low = np.take_along_axis(ordered, np.maximum((n - 1) // 2, 0)[None], axis=0)[0]
    high = np.take_along_axis(ordered, np.maximum(n // 2, 0)[None], axis=0)[0]
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, 0.5 * (low + high), NAN)


def _finite_max(values: np.ndarray, axis=None):
    a = np.asarray(values, dtype=np.float64)
    if axis is not None:
        if a.shape[axis] == 0:
            return np.full(a.shape[1 - axis] if a.ndim == 2 else 0, NAN)
        top = np.where(np.isfinite(a), a, -np.inf).max(axis=axis)
        return np.where(np.isfinite(top), top, NAN)
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else NAN


def _trial_metrics(outcome) -> Dict[str, float]:
    """What the threshold trials showed of unclipped training (a TrialOutcome), NaN where none ran."""
    if outcome is None:
        return {"trial_unclipped_unstable": NAN, "trial_unclipped_steps": NAN, "trial_clipped_stable": NAN}
    return {"trial_unclipped_unstable": float(outcome.unclipped_unstable and outcome.clipped_stable > 0),
            "trial_unclipped_steps": float(outcome.unclipped_steps),
            "trial_clipped_stable": float(outcome.clipped_stable)}
