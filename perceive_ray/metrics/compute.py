"""Compute a benchmark's metrics from its manifest and a scores table (the `perceive-ray metrics` core)."""

from __future__ import annotations

import pyarrow as pa

from perceive_ray import registry
from perceive_ray.data.manifest import Manifest
from perceive_ray.metrics.base import MetricReport
from perceive_ray.metrics.scores import ScoresError, build_score_grids


def compute_metrics(
    manifest: Manifest,
    scores: pa.Table,
    *,
    tie_policy: str = "strict",
    label_errata: str = "original",
    max_nan_fraction: float = 0.0,
    source: str = "<scores>",
) -> MetricReport:
    """Check that ``scores`` cover every item of ``manifest``, then run the benchmark's registered metric."""
    entry = registry.benchmark(manifest.benchmark)
    metric = registry.load_target(entry.metric)
    grids = build_score_grids(manifest, scores, source=source)
    options = {}
    if entry.nan_tolerant:
        options["max_nan_fraction"] = max_nan_fraction
    elif grids.nan_items:
        shown = ", ".join(repr(i) for i in grids.nan_items[:5])
        raise ScoresError(
            f"{source}: {len(grids.nan_items)} item(s) of {manifest.benchmark!r} have NaN scores, e.g. {shown}"
        )
    report = metric(manifest, grids, tie_policy=tie_policy, label_errata=label_errata, **options)
    report.counts["extra_score_rows"] = grids.extra_rows
    report.notes = list(manifest.warnings) + report.notes
    return report
