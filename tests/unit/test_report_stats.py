"""Report statistics against independent computations: the percentile bootstrap against plain numpy
resampling and against the exact bootstrap distribution of a 0/1 mean (Binomial(n, k/n) / n), McNemar's exact
p against the binomial tail summed with math.comb; edge cases (all correct, no discordant unit, partly shared
units)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from perceive_ray.report.data import BenchmarkData
from perceive_ray.report.stats import (
    bootstrap_interval,
    holm,
    mcnemar_exact,
    mean_interval,
    metric_interval,
)


def numpy_percentile_bootstrap(values, resamples=40_000, seed=99):
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return np.percentile(means, 2.5), np.percentile(means, 97.5)


def binomial_quantile(n: int, k: int, q: float) -> float:
    """The q-quantile of Binomial(n, k/n) / n: the exact distribution of the bootstrap mean of k ones in n."""
    p, total = k / n, 0.0
    for j in range(n + 1):
        total += math.comb(n, j) * p**j * (1 - p) ** (n - j)
        if total >= q:
            return j / n
    return 1.0


def exact_mcnemar_p(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


@pytest.mark.parametrize(("n", "k"), [(400, 130), (103, 96), (206, 19)])
def test_bootstrap_interval_matches_independent_computations(n, k):
    x = np.zeros(n)
    x[np.random.default_rng(1).choice(n, k, replace=False)] = 1
    low, high = bootstrap_interval(x, n_resamples=10_000, seed=0)
    ref_low, ref_high = numpy_percentile_bootstrap(x)
    step = 1 / n  # the bootstrap mean lives on a 1/n grid: Monte Carlo may land one step off
    assert abs(low - ref_low) <= step + 1e-9 and abs(high - ref_high) <= step + 1e-9
    assert abs(low - binomial_quantile(n, k, 0.025)) <= step + 1e-9
    assert abs(high - binomial_quantile(n, k, 0.975)) <= step + 1e-9
    assert low <= k / n <= high


def test_bootstrap_interval_is_seeded_and_order_free():
    x = (np.random.default_rng(2).random(150) < 0.4).astype(float)
    first = bootstrap_interval(x, n_resamples=2000, seed=5)
    assert bootstrap_interval(x, n_resamples=2000, seed=5) == first
    assert bootstrap_interval(x[::-1].copy(), n_resamples=2000, seed=5) == first  # same multiset and interval
    assert bootstrap_interval(x, n_resamples=2000, seed=6) != first


def test_bootstrap_interval_degenerate_and_bad_input():
    assert bootstrap_interval(np.ones(50)) == (1.0, 1.0)
    assert bootstrap_interval(np.zeros(7)) == (0.0, 0.0)
    assert bootstrap_interval([1]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_interval([])


def test_metric_interval_from_outcomes_counts_and_auc():
    units = [f"u{i}" for i in range(80)]
    correct = (np.arange(80) % 5 != 0).astype("int8")  # 64 / 80
    outcomes = pd.DataFrame({"metric": "pair_acc", "unit": units, "correct": correct})
    counts = {"pair_acc/correct": 64, "pair_acc/total": 80}
    metrics = {"pair_acc": 0.8, "src/roc_auc": 0.7}
    with_units = metric_interval(BenchmarkData(metrics, {}, counts, outcomes), "pair_acc", n_resamples=3000)
    assert with_units.source == "outcomes" and with_units.n == 80 and with_units.value == 0.8
    # A run without outcomes.parquet: k ones and n - k zeros give exactly the interval of the real units.
    from_counts = metric_interval(BenchmarkData(metrics, {}, counts, None), "pair_acc", n_resamples=3000)
    assert from_counts.source == "counts"
    assert (from_counts.low, from_counts.high) == (with_units.low, with_units.high)
    for outcomes_table in (None, outcomes):
        auc = metric_interval(BenchmarkData(metrics, {}, {"src/roc_auc/correct": 7, "src/roc_auc/total": 10},
                                            outcomes_table), "src/roc_auc")
        assert auc.source == "none" and auc.low is None and auc.high is None


def series(pairs: dict[str, int]) -> pd.Series:
    return pd.Series(list(pairs.values()), index=list(pairs), dtype="int8")


def test_mcnemar_matches_the_binomial_tail_on_partly_shared_units():
    rng = np.random.default_rng(3)
    a = series({f"u{i}": int(rng.random() < 0.7) for i in range(0, 90)})
    b = series({f"u{i}": int(rng.random() < 0.5) for i in range(30, 130)})  # shared: u30..u89
    test = mcnemar_exact(a, b)
    shared = [f"u{i}" for i in range(30, 90)]
    b_count = sum(a[u] == 1 and b[u] == 0 for u in shared)
    c_count = sum(a[u] == 0 and b[u] == 1 for u in shared)
    assert (test.n, test.b, test.c) == (60, b_count, c_count) and b_count + c_count > 0
    assert test.p == pytest.approx(exact_mcnemar_p(b_count, c_count), rel=1e-12)
    assert test.accuracy_a == pytest.approx(np.mean([a[u] for u in shared]))
    assert test.difference == pytest.approx((b_count - c_count) / 60)


@pytest.mark.parametrize(("b", "c"), [(0, 9), (3, 12), (10, 10), (1, 0), (25, 40)])
def test_mcnemar_p_values(b, c):
    units = [f"u{i}" for i in range(b + c + 5)]
    a_ok = [1] * b + [0] * c + [1, 1, 0, 0, 1]
    b_ok = [0] * b + [1] * c + [1, 1, 0, 0, 1]
    test = mcnemar_exact(series(dict(zip(units, a_ok, strict=True))),
                         series(dict(zip(units, b_ok, strict=True))))
    assert (test.b, test.c) == (b, c)
    assert test.p == pytest.approx(exact_mcnemar_p(b, c), rel=1e-12)


def test_mcnemar_edge_cases():
    same = series({"x": 1, "y": 0, "z": 1})
    test = mcnemar_exact(same, same)
    assert (test.n, test.b, test.c, test.p, test.difference) == (3, 0, 0, 1.0, 0.0)  # no discordant unit
    all_right = series({"x": 1, "y": 1})
    assert mcnemar_exact(all_right, all_right).p == 1.0
    disjoint = mcnemar_exact(series({"x": 1}), series({"y": 0}))
    assert disjoint.n == 0 and disjoint.p == 1.0 and math.isnan(disjoint.difference)


def test_holm_by_hand():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> kept monotone: 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_mean_interval_against_numpy():
    rng = np.random.default_rng(4)
    a = series({f"u{i}": int(rng.random() < 0.8) for i in range(100)})
    b = series({f"u{i}": int(rng.random() < 0.6) for i in range(4, 100)})  # 4 units only in a
    result = mean_interval([a, b], n_resamples=5000, seed=0)
    assert result.value == pytest.approx((a.mean() + b.mean()) / 2) and result.n == 100
    grid = np.array([[a.get(u, np.nan), b.get(u, np.nan)] for u in sorted(a.index)], dtype=float)
    draws = grid[np.random.default_rng(7).integers(0, 100, size=(20_000, 100))]
    means = np.nanmean(draws, axis=1).mean(axis=1)
    assert result.low == pytest.approx(np.percentile(means, 2.5), abs=0.012)
    assert result.high == pytest.approx(np.percentile(means, 97.5), abs=0.012)
    ones = series({"x": 1, "y": 1})
    assert (mean_interval([ones, ones]).low, mean_interval([ones, ones]).high) == (1.0, 1.0)
