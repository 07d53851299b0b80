"""ROC-AUC by rank counting (Mann-Whitney, ties worth ½) and the SeeTRUE metric built on it (PROTOCOLS §2.5).

ROC-AUC = P(score of a random positive > score of a random negative) + ½ P(equal). Over P positives and N
negatives it is (2W + T) / (2PN) with W strictly-won and T tied (positive, negative) pairs; both are integers,
so the value is exact and Tally stores numerator 2W + T and denominator 2PN ("half-pairs") as its
correct/total counts. This equals sklearn's ``roc_auc_score`` (trapezoidal ROC), which the reference uses;
sklearn is not a dependency here.

SeeTRUE: one AUC per ``dataset_source`` (key ``{source}/roc_auc``, chance 0.5) with counts ``{source}/n``,
``{source}/n_pos``, ``{source}/n_neg`` of the items it was computed on and ``{source}/nan_excluded``; there is
no overall AUC, as in the reference. Items whose score is NaN are excluded by item id (the reference compacts
the score list and then indexes it with the original row numbers, misaligning every later item), counted in
``nan_excluded``, and refused with MetricError when their fraction exceeds ``max_nan_fraction``. A source with
a single label class gets no AUC, only its counts and a note. ``ties`` counts tied (positive, negative) pairs.
Neither ``tie_policy`` (ties are always ½) nor ``label_errata`` changes an AUC; both are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from perceive_ray.data.manifest import Manifest
from perceive_ray.metrics.base import MetricError, MetricReport, Tally, check_policy
from perceive_ray.metrics.scores import ScoreGrids

CHANCE = 0.5


@dataclass(frozen=True)
class AucCounts:
    """Pair counts behind one ROC-AUC: ``wins`` and ``ties`` among the n_pos x n_neg (pos, neg) pairs."""

    n_pos: int
    n_neg: int
    wins: int
    ties: int

    @property
    def numerator(self) -> int:
        return 2 * self.wins + self.ties

    @property
    def denominator(self) -> int:
        return 2 * self.n_pos * self.n_neg

    @property
    def value(self) -> float:
        if self.denominator == 0:
            raise MetricError(
                f"ROC-AUC is undefined with {self.n_pos} positive(s) and {self.n_neg} negative(s)"
            )
        return self.numerator / self.denominator


def compute_auc_counts(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> AucCounts:
    """Count won and tied (positive, negative) pairs in O((P + N) log N); labels 0/1, scores not NaN."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise MetricError(f"scores {scores.shape} and labels {labels.shape} must be 1-D arrays of one length")
    if np.isnan(scores).any():
        raise MetricError(
            f"{int(np.isnan(scores).sum())} NaN score(s); exclude them before computing a ROC-AUC"
        )
    if not np.isin(labels, (0, 1)).all():
        raise MetricError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    negatives = np.sort(scores[labels == 0])
    positives = scores[labels == 1]
    below = np.searchsorted(negatives, positives, side="left")  # negatives strictly below each positive
    up_to = np.searchsorted(negatives, positives, side="right")  # negatives below or equal
    return AucCounts(
        n_pos=int(positives.size),
        n_neg=int(negatives.size),
        wins=int(below.sum()),
        ties=int((up_to - below).sum()),
    )


def compute_roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """ROC-AUC of ``scores`` against binary ``labels``; MetricError when a class is missing."""
    return compute_auc_counts(scores, labels).value


def compute_seetrue(
    manifest: Manifest,
    grids: ScoreGrids,
    *,
    tie_policy: str = "strict",
    label_errata: str = "original",
    max_nan_fraction: float = 0.0,
) -> MetricReport:
    """Per-``dataset_source`` ROC-AUC of the 1x1 scores against ``Item.label``, NaN items excluded by id."""
    check_policy(tie_policy, label_errata, benchmark=manifest.benchmark)
    if not 0.0 <= max_nan_fraction <= 1.0:
        raise MetricError(f"max_nan_fraction must be in [0, 1], got {max_nan_fraction}")
    nan_ids = set(grids.nan_items)
    scored: dict[str, tuple[list[float], list[int]]] = {}
    nan_by_source: dict[str, int] = {}
    excluded: list[str] = []
    for item in manifest.items:
        grid = np.asarray(grids[item.item_id])
        if grid.shape != (1, 1):
            raise MetricError(
                f"seetrue item {item.item_id!r}: expected a 1x1 score grid, got shape {grid.shape}"
            )
        if item.label not in (0, 1):
            raise MetricError(f"seetrue item {item.item_id!r}: label must be 0 or 1, got {item.label}")
        source = item.subset
        scores, labels = scored.setdefault(source, ([], []))
        nan_by_source.setdefault(source, 0)
        score = float(grid[0, 0])
        # Exclusion is decided per item id, so every kept score stays paired with its own label.
        if item.item_id in nan_ids or np.isnan(score):
            excluded.append(item.item_id)
            nan_by_source[source] += 1
            continue
        scores.append(score)
        labels.append(item.label)

    total = len(manifest.items)
    if excluded and len(excluded) / total > max_nan_fraction:
        shown = ", ".join(repr(i) for i in excluded[:5])
        raise MetricError(
            f"seetrue: {len(excluded)} of {total} item(s) have NaN scores "
            f"(fraction {len(excluded) / total:.4g} > "
            f"max_nan_fraction {max_nan_fraction}), e.g. item id(s) {shown}"
        )

    tally = Tally()
    counts: dict[str, int] = {}
    notes: list[str] = []
    for source in sorted(scored):
        scores, labels = scored[source]
        n_pos = sum(labels)
        counts[f"{source}/n"] = len(labels)
        counts[f"{source}/n_pos"] = n_pos
        counts[f"{source}/n_neg"] = len(labels) - n_pos
        counts[f"{source}/nan_excluded"] = nan_by_source[source]
        if n_pos == 0 or n_pos == len(labels):
            notes.append(
                f"seetrue {source}: no ROC-AUC, its {len(labels)} scored item(s) have {n_pos} positive and "
                f"{len(labels) - n_pos} negative label(s)"
            )
            continue
        auc = compute_auc_counts(scores, labels)
        tally.add_fraction(f"{source}/roc_auc", auc.numerator, auc.denominator, CHANCE)
        tally.ties += auc.ties
    report = tally.report(
        manifest.benchmark, tie_policy, label_errata, items=total, nan_excluded=len(excluded), **counts
    )
    report.notes.extend(notes)
    return report
