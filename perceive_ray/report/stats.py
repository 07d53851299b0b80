"""Uncertainty for reports: 95% percentile-bootstrap intervals over units and exact paired McNemar tests.

Small benchmarks make differences noisy (What'sUp has 103 left/right pairs: one pair is ~1 point), so every
number gets an interval from resampling its units (items, pairs, texts: whatever the metric averages over),
and two configurations are compared on the units both were scored on. Every interval uses a fresh Generator
from the same seed, so a number's interval does not depend on the report's other numbers or their order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
# Elements of one resample batch (resamples x units): bounds the bootstrap's memory on large benchmarks.
BATCH_ELEMENTS = 4_000_000


def bootstrap_interval(values: Any, *, n_resamples: int = 10_000, seed: int = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (one per unit), from ``n_resamples`` resamples
    drawn by a Generator seeded with ``seed``.

    All units equal (all correct, all wrong) gives the point itself at both ends: every resample has that
    mean."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty 1-D array, got shape {x.shape}")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    # Sorted, the interval depends only on the values' multiset, not on the order the units were listed in:
    # the same outcomes give the same interval from any file, and k ones in n (counts) the outcomes' interval.
    x = np.sort(x)
    result = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, method="percentile",
                             confidence_level=confidence, vectorized=True, axis=-1,
                             batch=max(1, min(n_resamples, BATCH_ELEMENTS // x.size)),
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class Interval:
    """A reported number with its interval; ``source`` says what was resampled."""

    value: float
    low: float | None
    high: float | None
    n: int | None  # units resampled
    source: str  # "outcomes" (outcomes.parquet), "counts" (metrics.json counts; older runs), "none"


def metric_interval(bench: Any, metric: str, *, n_resamples: int = 10_000, seed: int = 0) -> Interval:
    """The interval of ``bench.metrics[metric]`` (``bench``: a report.data.BenchmarkData)."""
    value = bench.metrics[metric]
    units = bench.units(metric)
    if units is not None:
        low, high = bootstrap_interval(units.to_numpy(), n_resamples=n_resamples, seed=seed)
        return Interval(value, low, high, len(units), "outcomes")
    correct, total = bench.counts.get(f"{metric}/correct"), bench.counts.get(f"{metric}/total")
    # Without outcomes.parquet (a run made before it existed), the bootstrap of a plain mean depends only on
    # how many units were right: k ones and n-k zeros resample exactly like the real units. ROC-AUC counts
    # pairs of items, not units, and an outcomes.parquet lists every metric that has units: none for the rest.
    if bench.outcomes is None and not metric.endswith("roc_auc") and correct is not None and total:
        x = np.r_[np.ones(correct), np.zeros(total - correct)]
        low, high = bootstrap_interval(x, n_resamples=n_resamples, seed=seed)
        return Interval(value, low, high, total, "counts")
    return Interval(value, None, None, None, "none")


@dataclass(frozen=True)
class PairedTest:
    """Exact McNemar test of two configurations on their shared units.

    b: units A got right and B wrong; c: units A got wrong and B right; p: two-sided exact binomial p of
    min(b, c) in b + c trials at 1/2 (1 when b + c = 0)."""

    n: int
    b: int
    c: int
    p: float
    accuracy_a: float
    accuracy_b: float

    @property
    def difference(self) -> float:
        """Accuracy of A minus accuracy of B on the shared units (a fraction)."""
        return self.accuracy_a - self.accuracy_b


def mcnemar_exact(a: Any, b: Any) -> PairedTest:
    """``a``, ``b``: 0/1 pandas Series indexed by unit id; compared on the intersection of their units."""
    import pandas as pd
    from scipy import stats

    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
    x, y = joined["a"].to_numpy(dtype=bool), joined["b"].to_numpy(dtype=bool)
    n = len(joined)
    if n == 0:
        return PairedTest(0, 0, 0, 1.0, math.nan, math.nan)
    b_count, c_count = int(np.sum(x & ~y)), int(np.sum(~x & y))
    trials = b_count + c_count
    p = 1.0 if trials == 0 else float(stats.binomtest(min(b_count, c_count), trials, 0.5).pvalue)
    return PairedTest(n, b_count, c_count, p, float(x.mean()), float(y.mean()))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p values (each configuration pair on one column)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def mean_interval(columns: list[Any], *, n_resamples: int = 10_000, seed: int = 0,
                  confidence: float = CONFIDENCE) -> Interval:
    """Mean of several configurations' accuracies (each over its own units), with a percentile-bootstrap
    interval.

    ``columns``: 0/1 Series by unit id, one per configuration. A resample draws unit ids from the union of
    their units, and each configuration's accuracy is its mean over the drawn ids it has: one draw resamples a
    unit for every configuration at once, so the interval is about the benchmark's units with the
    configurations held fixed, and its point is exactly the mean of the configurations' reported numbers."""
    import pandas as pd
    from scipy import stats

    if not columns:
        return Interval(math.nan, None, None, 0, "none")
    table = pd.concat([c.rename(i) for i, c in enumerate(columns)], axis=1, join="outer").sort_index()
    grid = table.to_numpy(dtype=float)  # (units, configurations); NaN where a configuration lacks a unit
    point = float(np.mean(np.nanmean(grid, axis=0)))
    if np.all(grid[~np.isnan(grid)] == grid[~np.isnan(grid)][0]):
        return Interval(point, point, point, len(grid), "outcomes")

    def statistic(index: Any, axis: int = -1) -> Any:
        drawn = grid[np.asarray(index, dtype=np.int64)]  # (..., units drawn, configurations)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a configuration none of whose units was drawn
            return np.nanmean(drawn, axis=-2).mean(axis=-1)

    per_batch = max(1, BATCH_ELEMENTS // (len(grid) * len(columns)))
    result = stats.bootstrap((np.arange(len(grid)),), statistic, n_resamples=n_resamples,
                             method="percentile", confidence_level=confidence, vectorized=True, axis=-1,
                             batch=min(n_resamples, per_batch), rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return Interval(point, float(interval.low), float(interval.high), len(grid), "outcomes")
