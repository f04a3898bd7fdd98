"""The bit-pattern histogram against naive numpy on the raw values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradscope.analyse import histogram as hist


def counts_of(values: np.ndarray) -> np.ndarray:
    bits = torch.from_numpy(values.astype(np.float32)).view(torch.int32) & hist.ABS_MASK
    return torch.bincount(bits >> hist.SHIFT, minlength=hist.N_BINS).numpy()


@pytest.fixture
def heavy():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.standard_normal(200_000) * 1e-3, rng.standard_cauchy(2_000) * 1e-2])


def test_bins_are_log_spaced_with_exact_edges():
    assert hist.EDGES[127 * 8] == 1.0 and hist.EDGES[128 * 8] == 2.0
    octave = hist.EDGES[127 * 8:128 * 8 + 1]
    assert np.allclose(octave, 1 + np.arange(9) / 8)
    ratios = hist.EDGES[10:2040] / hist.EDGES[9:2039]
    assert ratios.min() > 1.05 and ratios.max() < 1.13


def test_every_value_lands_in_the_bin_that_contains_it(heavy):
    values = np.abs(heavy.astype(np.float32)).astype(np.float64)
    index = (np.abs(heavy.astype(np.float32)).view(np.int32) >> hist.SHIFT)
    assert np.all(hist.EDGES[index] <= values) and np.all(values < hist.EDGES[index + 1])


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999])
def test_quantiles_match_numpy_within_a_bin(heavy, q):
    exact = np.quantile(np.abs(heavy), q)
    estimate = hist.quantile(counts_of(heavy), q)
    assert abs(np.log(estimate / exact)) < np.log(1.13)


def test_fraction_above_matches_numpy(heavy):
    counts = counts_of(heavy)
    for threshold in (1e-4, 1e-3, 3e-3, 1e-1):
        exact = np.mean(np.abs(heavy) > threshold)
        assert hist.fraction_above(counts, threshold) == pytest.approx(exact, abs=0.01, rel=0.1)


def test_value_clip_cosine_matches_clipping_the_vector(heavy):
    counts = counts_of(heavy)
    for threshold in (1e-3, 3e-3, 1e-2):
        clipped = np.clip(heavy, -threshold, threshold)
        exact = heavy @ clipped / (np.linalg.norm(heavy) * np.linalg.norm(clipped))
        assert hist.value_clip_cosine(counts, threshold) == pytest.approx(exact, abs=0.01)


def test_kurtosis_matches_moments():
    rng = np.random.default_rng(1)
    for values, expected in ((rng.standard_normal(100_000), 3.0), (rng.uniform(-1, 1, 100_000), 1.8)):
        assert hist.kurtosis(counts_of(values)) == pytest.approx(expected, rel=0.05)


def test_zeros_and_nonfinite_have_their_own_bins():
    values = np.array([0.0, 0.0, np.inf, -np.inf, np.nan, 1.0], dtype=np.float32)
    counts = counts_of(values)
    assert counts[0] == 2
    assert hist.nonfinite_count(counts) == 3
    assert hist.quantile(counts, 0.99) == pytest.approx(1.0, rel=0.13)


def test_empty_histogram_gives_nan_not_an_error():
    empty = np.zeros(hist.N_BINS)
    assert np.isnan(hist.quantile(empty, 0.5)) and np.isnan(hist.kurtosis(empty))
    assert hist.fraction_above(empty, 1.0) == 0.0


def test_row_wise_quantiles_and_kurtoses_equal_the_single_histogram_ones():
    rng = np.random.default_rng(0)
    counts = np.zeros((60, hist.N_BINS), dtype=np.int64)
    for row in range(1, 60):  # row 0 stays empty; some rows hold only zeros or non-finite values
        at = rng.integers(0, hist.N_BINS, size=int(rng.integers(1, 300)))
        np.add.at(counts[row], at, rng.integers(1, 50, size=len(at)))
        if row % 7 == 0:
            counts[row] = 0
            counts[row, 0 if row % 2 else hist.NONFINITE_FIRST] = 5
    for q in (0.0, 0.5, 0.99, 0.999, 1.0):
        expected = np.array([hist.quantile(c, q) for c in counts])
        # to the last bit or two: numpy's SIMD kernels may round a block and a single row differently
        np.testing.assert_allclose(hist.quantiles(counts, q), expected, rtol=1e-14, atol=0, equal_nan=True)
    expected = np.array([hist.kurtosis(c) for c in counts])
    assert np.allclose(hist.kurtoses(counts), expected, rtol=1e-12, equal_nan=True)
