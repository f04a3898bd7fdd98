"""The fixed log-spaced |g| histogram: its bins, and the quantiles and clip figures read from its counts.

A float32 |g| is binned by its top bits: ``(bits & 0x7FFFFFFF) >> 20`` keeps the 8 exponent bits and the
3 leading mantissa bits, so each octave is split into 8 bins whose edges are exact float32 values. The
binning is a shift on the device, with no log and no comparison, and the bins cover every float32.
Bin 0 holds exact zeros (and |g| < 1.2e-38); bins from ``NONFINITE_FIRST`` on hold inf and NaN.
"""
from __future__ import annotations

import numpy as np

SHIFT = 20
N_BINS = 1 << (31 - SHIFT)  # 2048
NONFINITE_FIRST = 255 << (23 - SHIFT)  # exponent 255: inf and NaN
ABS_MASK = 0x7FFFFFFF
INF_BITS = 0x7F800000  # |g| bits at or above this are inf or NaN

# Lower edge of every finite bin, plus the upper edge of the last one (inf).
EDGES = (np.arange(NONFINITE_FIRST + 1, dtype=np.uint32) << SHIFT).view(np.float32).astype(np.float64)
# A representative |g| per finite bin: the geometric middle, and 0 for the zero bin.
CENTRES = np.sqrt(EDGES[:-1] * np.where(np.isinf(EDGES[1:]), EDGES[:-1], EDGES[1:]))
CENTRES[0] = 0.0


def finite(counts: np.ndarray) -> np.ndarray:
    """The finite part of a histogram (the last axis holds the bins)."""
    return counts[..., :NONFINITE_FIRST]


def nonfinite_count(counts: np.ndarray) -> np.ndarray:
    return counts[..., NONFINITE_FIRST:].sum(axis=-1)


def quantile(counts: np.ndarray, q: float) -> float:
    """The q-quantile of |g|, interpolated log-linearly inside its bin; NaN for an empty histogram."""
    c = finite(counts).astype(np.float64)
    total = c.sum()
    if total <= 0:
        return float("nan")
    cum = np.cumsum(c)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(c) - 1)
    if i == 0:
        return 0.0
    before = cum[i - 1]
    frac = (target - before) / c[i] if c[i] > 0 else 1.0
    lo, hi = EDGES[i], EDGES[i + 1]
    if not np.isfinite(hi):
        return float(lo)
    return float(lo * (hi / lo) ** frac)


def quantiles(counts: np.ndarray, q: float) -> np.ndarray:
    """:func:`quantile` of every row of a (histograms x bins) array, at once and with the same result."""
    c = finite(np.atleast_2d(counts)).astype(np.float64)
    cum = np.cumsum(c, axis=1)
    total = cum[:, -1] if c.shape[1] else np.zeros(len(c))
    target = q * total
    i = np.minimum((cum < target[:, None]).sum(axis=1), c.shape[1] - 1)  # searchsorted, side="left"
    rows = np.arange(len(c))
    before = np.where(i > 0, cum[rows, np.maximum(i - 1, 0)], 0.0)
    inside = c[rows, i]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(inside > 0, (target - before) / inside, 1.0)
        lo, hi = EDGES[i], EDGES[i + 1]
        value = np.where(np.isfinite(hi), lo * (hi / lo) ** frac, lo)
    return np.where(total <= 0, np.nan, np.where(i == 0, 0.0, value))


def kurtoses(counts: np.ndarray) -> np.ndarray:
    """:func:`kurtosis` of every row of a (histograms x bins) array."""
    c = finite(np.atleast_2d(counts)).astype(np.float64)
    total, m2, m4 = c.sum(axis=1), c @ CENTRES**2, c @ CENTRES**4
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((total > 0) & (m2 > 0), m4 * total / m2**2, np.nan)


def fraction_above(counts: np.ndarray, threshold: float) -> float:
    """Fraction of finite elements with |g| > threshold, assuming log-uniform spread inside a bin."""
    c = finite(counts).astype(np.float64)
    total = c.sum()
    if total <= 0 or threshold <= 0:
        return 0.0 if total <= 0 else float(c[1:].sum() / total)
    i = int(np.searchsorted(EDGES, threshold, side="right")) - 1
    if i >= len(c):
        return 0.0
    above = c[i + 1:].sum()
    lo, hi = EDGES[i], EDGES[i + 1]
    if i > 0 and np.isfinite(hi) and c[i] > 0:
        above += c[i] * (np.log(hi) - np.log(threshold)) / (np.log(hi) - np.log(lo))
    return float(above / total)


def value_clip_cosine(counts: np.ndarray, threshold: float) -> float:
    """Cosine between a gradient with this |g| histogram and the same gradient value-clipped at threshold.

    Each element is represented by its bin's centre; clipping keeps signs, so the cosine is
    sum(|g|·min(|g|,c)) / sqrt(sum(|g|²) · sum(min(|g|,c)²)).
    """
    c = finite(counts).astype(np.float64)
    clipped = np.minimum(CENTRES, threshold)
    dot = float((c * CENTRES * clipped).sum())
    norm_sq = float((c * CENTRES**2).sum())
    clip_sq = float((c * clipped**2).sum())
    if norm_sq <= 0 or clip_sq <= 0:
        return 1.0
    return dot / np.sqrt(norm_sq * clip_sq)


def kurtosis(counts: np.ndarray) -> float:
    """Kurtosis E[g⁴]/E[g²]² of the (zero-mean) element distribution; 3 for a Gaussian, 1.8 for uniform."""
    c = finite(counts).astype(np.float64)
    total = c.sum()
    m2 = float((c * CENTRES**2).sum())
    if total <= 0 or m2 <= 0:
        return float("nan")
    return float((c * CENTRES**4).sum() * total / m2**2)
