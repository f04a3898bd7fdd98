"""Statistics against naive reimplementations: trend, spike z-score, shares; and the metric registry."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

import gradscope
from gradscope.collect.history import SPIKE_STD_FLOOR, SPIKE_WARMUP, SeriesStore, SpikeTracker
from gradscope.analyse.metrics import LAYER_METRICS, MODEL_METRICS
from gradscope.analyse.stats import trend

from models import healthy_mlp


@pytest.fixture(scope="module")
def report():
    return gradscope.diagnose(healthy_mlp(), steps=12, seed=0)


def test_every_registered_metric_is_computed_and_nothing_else(report):
    assert set(report.statistics.model.metrics) == set(MODEL_METRICS)
    for layer in report.statistics.active_layers:
        assert set(layer.metrics) == set(LAYER_METRICS)


def test_shares_and_global_norm_agree(report):
    s = report.statistics
    norms = np.stack([l.norm_series for l in s.active_layers], axis=1)
    assert np.allclose(np.sqrt((norms ** 2).sum(axis=1)), s.model.global_norm, rtol=1e-6)
    shares = [l.metrics["grad_norm_share"] for l in s.active_layers]
    expected = [np.median(norms[:, k] ** 2 / s.model.global_norm ** 2) for k in range(norms.shape[1])]
    assert np.allclose(shares, expected)


def test_trend_is_theil_sen_on_log10():
    steps = np.arange(20)
    values = 3.0 * 1.3 ** steps
    growth, low = trend(steps, values)
    assert growth == pytest.approx(1.3) and low == pytest.approx(1.3)
    noisy = values * np.exp(np.random.default_rng(0).normal(0, 0.2, 20))
    slope, _, lo, _ = sps.theilslopes(np.log10(noisy), steps, alpha=0.9)
    assert trend(steps, noisy) == pytest.approx((10 ** slope, 10 ** lo))


def test_spike_z_matches_a_naive_running_computation():
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(0, 0.3, 40))
    values[25] *= 50
    tracker = SpikeTracker(1)
    for step, v in enumerate(values):
        z = tracker.update(step, np.array([v]))[0]
        logs = np.log10(values[:step])
        if step >= SPIKE_WARMUP:
            naive = (np.log10(v) - logs.mean()) / max(logs.std(ddof=1), SPIKE_STD_FLOOR)
            assert z == pytest.approx(naive)
        else:
            assert np.isnan(z)
    assert tracker.max_z_step[0] == 25


def test_series_store_decimates_to_its_capacity():
    store = SeriesStore(capacity=16)
    for step in range(1000):
        store.append(step, x=np.array(float(step)))
    assert len(store.steps) <= 16
    assert store.steps == sorted(store.steps) and all(s % store.stride == 0 for s in store.steps)
    assert np.array_equal(store.array("x"), np.array(store.steps, dtype=float))


def test_kept_rows_own_their_memory():
    """A Monitor flushes 16 steps as one host array and hands each step's row on as a view of it; a kept
    view would pin all 16 rows' memory for as long as the store keeps that one step (16x the memory of
    a thinned store, over a gigabyte for a 1,000-layer model past 16,000 steps)."""
    store = SeriesStore(capacity=8)
    flushed = np.arange(16 * 4, dtype=np.float64).reshape(16, 4)  # 16 steps, 4 layers
    for step, row in enumerate(flushed):
        store.append(step, grad_norm=row)
    assert not np.shares_memory(store.fields["grad_norm"], flushed)
    store.amend(store.steps[-1], "grad_norm", flushed[0])
    assert not np.shares_memory(store.fields["grad_norm"], flushed)
    assert np.array_equal(store.array("grad_norm")[-1], flushed[0])


def test_recent_steps_keep_the_last_rows_in_order():
    from gradscope.collect.history import RecentSteps
    ring = RecentSteps(3, 2)
    for step in range(7):
        ring.append(step, float(step), grad_norm=np.array([step, -step]), grad_abs_max=np.zeros(2),
                    nonfinite=np.zeros(2))
    box = ring.snapshot()
    assert box["steps"].tolist() == [4, 5, 6] and box["grad_norm"][:, 1].tolist() == [-4, -5, -6]
    assert RecentSteps(3, 2).snapshot()["steps"].tolist() == []


def test_thinned_theil_sen_stays_close_to_the_exact_estimator():
    """trend() reduces a long series to the medians of TREND_POINTS blocks (Theil-Sen is O(n^2)). On 1,000
    noisy steps growing 1% a step (noise of a factor e, one sigma), the slope is within 2% of the exact
    one on every one of 20 seeds (the worst: 1.2%), and so is its lower bound, where picking as many
    single points misses by up to 9%."""
    import numpy as np
    from scipy import stats as sps

    from gradscope.analyse.stats import TREND_ALPHA, TREND_POINTS, trend
    steps = np.arange(1000)
    worst, worst_low, worst_picked = 0.0, 0.0, 0.0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        values = 1.01 ** steps * np.exp(rng.normal(0, 1.0, len(steps)))
        exact = sps.theilslopes(np.log10(values), steps, alpha=TREND_ALPHA)
        growth, low = trend(steps, values)
        worst = max(worst, abs(np.log10(growth) - exact.slope) / abs(exact.slope))
        worst_low = max(worst_low, abs(np.log10(low) - exact.low_slope) / abs(exact.low_slope))
        pick = np.linspace(0, 999, TREND_POINTS).astype(int)
        picked = sps.theilslopes(np.log10(values[pick]), steps[pick]).slope
        worst_picked = max(worst_picked, abs(picked - exact.slope) / abs(exact.slope))
    assert TREND_POINTS < 1000 and worst < 0.02 and worst_low < 0.02, (worst, worst_low)
    assert worst_picked > 2 * worst  # why blocks: single points carry the noise of one step each



def test_trends_of_many_series_equal_trend_of_each():
    """The vectorised Theil-Sen over all layers gives exactly what trend() gives one series at a time,
    including series with a NaN, an inf, ties and a constant, which take the scalar path."""
    import numpy as np

    from gradscope.analyse.stats import trends
    rng = np.random.default_rng(0)
    for n in (3, 5, 30, 64, 65, 300, 1000):
        steps = np.arange(n)
        values = np.exp(rng.normal(0, 1, (n, 12))) * (1.02 ** steps)[:, None]
        values[min(2, n - 1), 3] = np.nan
        values[0, 4] = np.inf
        values[:, 5] = 2.0
        values[: n // 2, 6] = values[0, 6]
        growth, low = trends(steps, values)
        expected = np.array([trend(steps, values[:, k]) for k in range(12)])
        # equal to the last bit or two: numpy's SIMD kernels (AVX-512 here) may round a whole block and a
        # single series differently in the last place
        np.testing.assert_allclose(growth, expected[:, 0], rtol=1e-14, atol=0, equal_nan=True)
        np.testing.assert_allclose(low, expected[:, 1], rtol=1e-14, atol=0, equal_nan=True)


def test_trends_of_series_with_holes_equal_trend_of_each():
    """Layers whose norm underflows to 0 at some steps (a deep net's first layers) each keep their own
    finite steps: the vectorised blocks give what trend() gives one series at a time, whatever the count
    of finite steps (under 4, under the block count, above it)."""
    import numpy as np

    from gradscope.analyse.stats import TREND_POINTS, trends
    rng = np.random.default_rng(1)
    for n in (30, 64, 200, 1000):
        steps = np.arange(n) * 3 + 7  # increasing, not 0..n-1
        values = np.exp(rng.normal(0, 1, (n, 40))) * (1.01 ** np.arange(n))[:, None]
        for k in range(40):  # a different number of holes in each column, from none to nearly all
            holes = rng.choice(n, size=min(n - 1, int(k / 40 * n)), replace=False)
            values[holes, k] = 0.0 if k % 2 else np.nan
        values[:, 39] = 0.0  # no finite step at all
        growth, low = trends(steps, values)
        expected = np.array([trend(steps, values[:, k]) for k in range(40)])
        np.testing.assert_allclose(growth, expected[:, 0], rtol=1e-14, atol=0, equal_nan=True)
        np.testing.assert_allclose(low, expected[:, 1], rtol=1e-14, atol=0, equal_nan=True)
        counts = (np.isfinite(values) & (values > 0)).sum(axis=0)
        assert (counts < 4).any() and ((counts > TREND_POINTS).any() or n <= TREND_POINTS)
    nothing = np.zeros((50, 3))
    nothing[10, 1] = np.nan  # not one finite, positive value in any column
    assert np.isnan(trends(np.arange(50), nothing)).all()
    tied = np.array([0, 1, 1, 2, 3, 4, 5, 6], dtype=float)  # repeated steps: scipy's correction, as trend()
    values = np.exp(rng.normal(0, 1, (8, 3)))
    np.testing.assert_allclose(trends(tied, values)[0], [trend(tied, values[:, k])[0] for k in range(3)])


def test_column_medians_equal_numpys_nanmedian_of_the_finite_values():
    import warnings

    import numpy as np

    from gradscope.analyse.stats import _finite_median
    rng = np.random.default_rng(0)
    for trial in range(300):
        a = rng.normal(size=(int(rng.integers(1, 40)), int(rng.integers(1, 6))))
        r = rng.random(a.shape)
        a[r < 0.2], a[r > 0.9] = np.nan, np.inf
        if trial % 3 == 0:
            a[::4] = np.nan  # whole missing rows, as a series has on steps whose update was not read
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = np.nanmedian(np.where(np.isfinite(a), a, np.nan), axis=0)
        assert np.allclose(_finite_median(a, axis=0), expected, equal_nan=True)


def test_trend_and_kurtosis_are_scipys_without_loading_it():
    """trend() takes the array path (scipy's theilslopes estimate and interval, exactly) where the steps
    increase, and the kurtosis is scipy's Pearson kurtosis: report() need not load scipy.stats."""
    from scipy import stats as sps

    from gradscope.analyse.stats import TREND_ALPHA, _kurtosis, trend
    rng = np.random.default_rng(3)
    for n in (5, 40, 300):
        steps = np.arange(n) * 3.0
        values = np.exp(0.01 * steps + rng.normal(0, 0.3, n))
        growth, low = trend(steps, values)
        slope, _, bound, _ = sps.theilslopes(np.log10(values), steps, alpha=TREND_ALPHA) if n <= 64 else (None,) * 4
        if slope is not None:
            assert growth == pytest.approx(10**slope, rel=1e-12) and low == pytest.approx(10**bound, rel=1e-12)
        sample = rng.standard_t(4, size=n)
        assert _kurtosis(sample) == pytest.approx(sps.kurtosis(sample, fisher=False), rel=1e-12)
    from gradscope.analyse.stats import _theil_sen
    for n in range(4, 40):  # tied values (Sen's correction narrows the interval): still scipy's, exactly
        x = np.arange(n) + 0.5
        y = np.round(rng.normal(0, 1, n) * 2)
        growth, low = _theil_sen(x[:, None], y[:, None])
        slope, _, bound, _ = sps.theilslopes(y, x, alpha=TREND_ALPHA)
        assert growth[0] == pytest.approx(10**slope, rel=1e-12) and low[0] == pytest.approx(10**bound, rel=1e-12)
