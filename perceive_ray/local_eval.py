"""Evaluate an experiment in one process: datasets checked, model loaded once, scores + metrics + tracking.

This is the path behind `perceive-ray score`; the Ray Data pipeline runs the same scorer objects at scale.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from perceive_ray.config import BenchmarkConfig, ExperimentConfig, dump_config
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.manifest import Manifest
from perceive_ray.metrics.base import MetricReport
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.scoring.local import build_scorer, run_local, write_scores
from perceive_ray.tracking.run_record import build_run_record, experiment_tags
from perceive_ray.tracking.tracker import Tracker, build_tracker, resolve_tracking_uri


def format_report(report: dict) -> str:
    """A metric table with chance levels and numerators/denominators."""
    lines = [f"{report['benchmark']}  (tie_policy={report['tie_policy']}, label_errata={report['label_errata']})",
             f"{'metric':<40} {'value':>8} {'chance':>8} {'n':>12}"]
    counts = report["counts"]
    for key, value in report["metrics"].items():
        n = f"{counts.get(key + '/correct', '')}/{counts.get(key + '/total', '')}"
        lines.append(f"{key:<40} {100 * value:>7.2f}% {100 * report['chance'][key]:>7.2f}% {n:>12}")
    lines.append(f"exact ties: {counts.get('ties', 0)}")
    return "\n".join(lines)


def run_local_experiment(
    config: ExperimentConfig, *, out_dir: Path | None = None, on_error: str = "fail", track: bool = True
) -> list[MetricReport]:
    """Score every benchmark of ``config`` in this process; one tracked run per benchmark."""
    # Every dataset is read and checked before the model loads, so bad input costs no model time.
    manifests = [(bench, load_benchmark(bench.name, bench.root, strict_sizes=bench.strict_sizes))
                 for bench in config.benchmarks]
    out_dir = out_dir or config.output_dir / config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_config(config))
    # The tracker is checked before the model loads too: an unreachable server fails fast, naming the URI.
    tracker = build_tracker(config.tracking.uri, config.tracking.experiment, enabled=track)
    record = build_run_record({bench.name: manifest.source_hashes for bench, manifest in manifests})
    (out_dir / "run_record.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    scorer = build_scorer(config.model, config.scorer)
    reports = []
    # One tracked run per evaluation; metric names carry the benchmark ({benchmark}/{metric}).
    tracker.start(out_dir.name, config.model_dump(mode="json"),
                  experiment_tags(config, record, runner="local", run_id=out_dir.name))
    try:
        for bench, manifest in manifests:
            report, bench_dir = _score_benchmark(config, bench, manifest, scorer, out_dir, on_error)
            log_benchmark(tracker, bench.name, report, bench_dir)
            reports.append(report)
        tracker.log_artifact(out_dir / "config.yaml")
        tracker.log_artifact(out_dir / "run_record.json")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    if getattr(tracker, "run_id", ""):
        print(f"tracked: run {tracker.run_id}")
    if track:
        uri = resolve_tracking_uri(config.tracking.uri)
        print(f"open the runs with: mlflow ui --host 127.0.0.1 --backend-store-uri {uri}"
              if uri.startswith("sqlite") else f"open the runs at: {uri}")
    return reports


def log_benchmark(tracker: Tracker, benchmark: str, report: MetricReport, bench_dir: Path) -> None:
    """Metrics as ``{benchmark}/{metric}`` and the benchmark's files under the artifact folder ``{benchmark}/``."""
    tracker.log_metrics({f"{benchmark}/{key}": value for key, value in report.metrics.items()})
    for name in ("scores.parquet", "metrics.json", "errors.json", "errors.parquet"):
        if (bench_dir / name).is_file():
            tracker.log_artifact(bench_dir / name, benchmark)


def _score_benchmark(config: ExperimentConfig, bench: BenchmarkConfig, manifest: Manifest, scorer, out_dir: Path,
                     on_error: str) -> tuple[MetricReport, Path]:
    for warning in manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    result = run_local(manifest, scorer, batch_size=config.scorer.batch_size, limit=bench.limit,
                       on_error=on_error, progress=True)
    bench_dir = out_dir / bench.name
    write_scores(result.scores, bench_dir / "scores.parquet")
    if result.errors:
        (bench_dir / "errors.json").write_text(json.dumps(result.errors, indent=2))
        print(f"warning: {len(result.errors)} unreadable image(s) skipped; see {bench_dir / 'errors.json'}",
              file=sys.stderr)
    scored = manifest if bench.limit is None and not result.errors else scored_subset(manifest, result.scores)
    report = compute_metrics(scored, result.scores, tie_policy=config.metrics.tie_policy,
                             label_errata=config.metrics.label_errata,
                             max_nan_fraction=config.metrics.max_nan_fraction,
                             source=str(bench_dir / "scores.parquet"))
    payload = report.to_dict() | {"items_scored": len(scored), "items_in_benchmark": len(manifest),
                                  "seconds": round(result.seconds, 3)}
    (bench_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    print(format_report(report.to_dict()))
    print(f"scores: {bench_dir / 'scores.parquet'}  ({len(scored)}/{len(manifest)} items)")
    return report, bench_dir


def scored_subset(manifest: Manifest, scores: pa.Table) -> Manifest:
    """The manifest restricted to the items that were scored (a ``limit`` run, or skipped unreadable images)."""
    scored_ids = set(scores.column("item_id").to_pylist())
    return replace(manifest, items=tuple(item for item in manifest.items if item.item_id in scored_ids))
