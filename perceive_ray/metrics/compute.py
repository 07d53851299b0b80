"""Compute a benchmark's metrics from its manifest and a scores table (the `perceive-ray metrics` core).

Score views: a scores table may carry a second score column for one protocol of a benchmark. What'sUp Controlled
scored by VLM2Vec asks a different question for the 2-way and the 4-way protocol (the reference's ``eval`` and
``eval_4``), so its table holds ``score`` (4-way question) and ``score_two_way`` (2-way question); the 2way/* keys are
computed from the latter. ``MetricReport.score_columns`` says which column produced which keys.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

from perceive_ray import registry
from perceive_ray.data.manifest import Manifest
from perceive_ray.metrics.base import MetricReport
from perceive_ray.metrics.scores import ScoresError, build_score_grids

# Benchmark metric keyword -> (score column, the key prefix it decides).
SCORE_VIEWS = {"two_way_grids": ("score_two_way", "2way/")}
VIEW_BENCHMARKS = {"two_way_grids": ("whatsup_controlled_a", "whatsup_controlled_b")}


def _view_table(scores: pa.Table, column: str) -> pa.Table | None:
    """The table with ``column`` as its ``score``, if the column is present and filled for these rows."""
    if column not in scores.column_names:
        return None
    values = scores.column(column)
    if values.null_count == len(values) or bool(pc.all(pc.is_nan(values.fill_null(math.nan))).as_py()):
        return None
    table = scores.drop(["score"])
    return table.rename_columns(["score" if name == column else name for name in table.column_names])


def compute_metrics(
    manifest: Manifest,
    scores: pa.Table,
    *,
    tie_policy: str = "strict",
    label_errata: str = "original",
    max_nan_fraction: float = 0.0,
    source: str = "<scores>",
    mmvp_logit_scale: float = 1.0,
) -> MetricReport:
    """Check that ``scores`` cover every item of ``manifest``, then run the benchmark's registered metric.

    ``mmvp_logit_scale``: the scorer's factor before the reference's float32 MMVP softmax (registry
    ``ScorerEntry.mmvp_logit_scale``); passed on only with ``tie_policy="mmvp_reference"``.
    """
    entry = registry.benchmark(manifest.benchmark)
    metric = registry.load_target(entry.metric)
    grids = build_score_grids(manifest, scores, source=source)
    options: dict = {}
    if entry.nan_tolerant:
        options["max_nan_fraction"] = max_nan_fraction
    elif grids.nan_items:
        shown = ", ".join(repr(i) for i in grids.nan_items[:5])
        raise ScoresError(
            f"{source}: {len(grids.nan_items)} item(s) of {manifest.benchmark!r} have NaN scores, e.g. {shown}"
        )
    if tie_policy == "mmvp_reference" and tie_policy in entry.tie_policies:
        options["logit_scale"] = mmvp_logit_scale
    score_columns = {"*": "score"}
    for keyword, (column, prefix) in SCORE_VIEWS.items():
        if manifest.benchmark not in VIEW_BENCHMARKS[keyword]:
            continue
        view = _view_table(scores, column)
        if view is not None:
            options[keyword] = build_score_grids(manifest, view, source=f"{source} ({column})")
            score_columns[prefix + "*"] = column
    report = metric(manifest, grids, tie_policy=tie_policy, label_errata=label_errata, **options)
    report.counts["extra_score_rows"] = grids.extra_rows
    report.notes = list(manifest.warnings) + report.notes
    report.score_columns = score_columns
    return report
