"""Evaluation at scale: manifest rows -> Ray Data (images decoded in CPU tasks) -> scorer actor pool -> shards.

The driver writes each result block as an atomic shard the moment it arrives, so a killed run loses at most the
blocks in flight; re-running the same run id skips every (item, image) row already scored, whatever the actor
count or batch size. Unreadable images become error rows (or stop the run under ``on_error: fail``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from perceive_ray.config import ExperimentConfig, dump_config
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.images import ImageError, load_rgb, scoring_rows
from perceive_ray.data.manifest import Manifest
from perceive_ray.local_eval import format_report, log_benchmark
from perceive_ray.metrics.base import MetricReport
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.run.shards import ShardWriter, assemble, complete_items, done_rows, read_shards
from perceive_ray.scoring.local import build_scorer, write_scores
from perceive_ray.tracking.run_record import build_run_record, experiment_tags
from perceive_ray.tracking.tracker import build_tracker, resolve_tracking_uri

# Keys of the resolved config that decide the scores; a resumed run must agree on all of them.
SCORE_DEFINING = ("model", "scorer.name", "scorer.options", "seed")


class RunMismatchError(ValueError):
    """An existing run directory was produced by a different model/scorer configuration."""


def decode_batch(batch: dict[str, Any], *, root: str, on_error: str) -> dict[str, Any]:
    """Ray Data task: add ``image`` (RGB uint8) and ``error`` ('' or the reason) to each row."""
    images, errors = [], []
    for path in batch["image_path"]:
        try:
            images.append(load_rgb(root, str(path)))
            errors.append("")
        except ImageError as exc:
            if on_error == "fail":
                raise
            images.append(np.zeros((1, 1, 3), np.uint8))  # placeholder; the row is reported, never scored
            errors.append(str(exc))
    return {**batch, "image": images, "error": errors}


class ScoringActor:
    """Actor-pool worker: builds the scorer once, scores readable rows, passes error rows through."""

    def __init__(self, model, scorer):
        from ray.util import metrics

        self.scorer = build_scorer(model, scorer)
        self.scored = metrics.Counter("perceive_rows_scored", description="(item, image) rows scored")
        self.failed = metrics.Counter("perceive_rows_failed", description="rows with unreadable images")
        self.latency = metrics.Histogram("perceive_batch_latency_s", description="scorer time per batch",
                                         boundaries=[0.01, 0.05, 0.1, 0.5, 1, 5, 30])

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        errors = [str(e) for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if not e]
        tables = []
        if ok:
            sub = {name: [batch[name][i] for i in ok] for name in batch if name not in ("error", "image_path")}
            start = time.perf_counter()
            out = pa.table(self.scorer(sub))
            self.latency.observe(time.perf_counter() - start)
            self.scored.inc(len(ok))
            tables.append(out.append_column("error", pa.array([""] * out.num_rows, pa.string())))
        bad = [i for i, e in enumerate(errors) if e]
        if bad:
            self.failed.inc(len(bad))
            tables.append(pa.table({
                "item_id": pa.array([str(batch["item_id"][i]) for i in bad], pa.string()),
                "image_index": pa.array([int(batch["image_index"][i]) for i in bad], pa.int64()),
                "text_index": pa.array([-1] * len(bad), pa.int64()),
                "score": pa.array([float("nan")] * len(bad), pa.float64()),
                "error": pa.array([errors[i] for i in bad], pa.string()),
            }))
        return pa.concat_tables(tables, promote_options="default")


@dataclass
class BenchmarkRun:
    benchmark: str
    report: MetricReport
    scores_path: Path
    errors: int
    rows_scored_now: int


def init_ray(address: str | None) -> bool:
    """Connect to ``address`` / RAY_ADDRESS, else start a local instance. Returns whether we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return True


def check_resumable(run_dir: Path, config: ExperimentConfig) -> None:
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return
    import yaml

    before = yaml.safe_load(stored.read_text())
    now = config.model_dump(mode="json")
    for key in SCORE_DEFINING:
        a, b = before, now
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            raise RunMismatchError(
                f"run directory {run_dir} holds scores for a different {key} ({a!r}, now {b!r}); "
                "pick another run id to start afresh"
            )


def run_eval(config: ExperimentConfig, *, run_id: str | None = None, address: str | None = None,
             track: bool = True, on_error: str | None = None) -> list[BenchmarkRun]:
    """Evaluate every benchmark of ``config`` through Ray Data; resumable by run id."""
    on_error = on_error or config.on_error
    manifests = [(bench, load_benchmark(bench.name, bench.root, strict_sizes=bench.strict_sizes))
                 for bench in config.benchmarks]
    run_dir = config.output_dir / (run_id or config.name)
    check_resumable(run_dir, config)
    tracker = build_tracker(config.tracking.uri, config.tracking.experiment, enabled=track)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    record = build_run_record({bench.name: m.source_hashes for bench, m in manifests})
    (run_dir / "run_record.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    started = init_ray(address)
    context = ray.data.DataContext.get_current()
    limits_before = context.execution_options.resource_limits
    if config.resources.object_store_mb:
        context.execution_options.resource_limits = limits_before.copy(
            object_store_memory=config.resources.object_store_mb * 2**20)
    results = []
    tracker.start(run_dir.name, config.model_dump(mode="json"),
                  experiment_tags(config, record, runner="ray_data", run_id=run_dir.name))
    try:
        for bench, manifest in manifests:
            result = _run_benchmark(config, bench.limit, manifest, run_dir / bench.name, on_error)
            log_benchmark(tracker, bench.name, result.report, result.scores_path.parent)
            tracker.log_metrics({f"{bench.name}/image_errors": float(result.errors)})
            results.append(result)
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "run_record.json")
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        context.execution_options.resource_limits = limits_before
        if started:
            ray.shutdown()
    tracker.finish()
    if track:
        uri = resolve_tracking_uri(config.tracking.uri)
        print(f"open the runs with: mlflow ui --host 127.0.0.1 --backend-store-uri {uri}"
              if uri.startswith("sqlite") else f"open the runs at: {uri}")
    return results


def _run_benchmark(config: ExperimentConfig, limit: int | None, manifest: Manifest, bench_dir: Path,
                   on_error: str) -> BenchmarkRun:
    for warning in manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    shard_dir = bench_dir / "shards"
    wanted = {item.item_id for item in (manifest.items if limit is None else manifest.items[:limit])}
    target = _restrict(manifest, wanted)
    done = done_rows(read_shards(shard_dir), target)
    rows = [row for row in scoring_rows(target) if (row["item_id"], row["image_index"]) not in done]
    total = len(rows) + len(done)
    print(f"{manifest.benchmark}: {len(done)}/{total} image rows already scored, {len(rows)} to go",
          file=sys.stderr)
    writer = ShardWriter(shard_dir)
    scored_now = 0
    if rows:
        res = config.resources
        # Several input blocks (about one per scorer batch) so results stream back and shards land as they go.
        blocks = max(1, min(1000, -(-len(rows) // config.scorer.batch_size)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(decode_batch, fn_kwargs={"root": manifest.root, "on_error": on_error},
                            batch_size=config.scorer.batch_size, num_cpus=0.25)
        ds = ds.map_batches(ScoringActor, fn_constructor_kwargs={"model": config.model, "scorer": config.scorer},
                            compute=ActorPoolStrategy(size=res.num_actors), batch_size=config.scorer.batch_size,
                            num_cpus=res.num_cpus_per_actor, num_gpus=res.num_gpus_per_actor)
        # Re-batch on the driver so a shard lands about every scorer batch, however Ray fused the blocks; a row
        # split across two shards is only "done" once all its texts are written (see shards.done_rows).
        texts_per_row = max(len(row["texts"]) for row in rows)
        for block in ds.iter_batches(batch_size=config.scorer.batch_size * texts_per_row, batch_format="pyarrow"):
            writer.write(block)
            scored_now += sum(1 for t in block.column("text_index").to_pylist() if t in (0, -1))
            print(f"{manifest.benchmark}: {len(done) + scored_now}/{total} image rows", file=sys.stderr)
    scores, errors = assemble(read_shards(shard_dir), target)
    scores_path = write_scores(scores, bench_dir / "scores.parquet")
    if errors.num_rows:
        write_scores(errors, bench_dir / "errors.parquet")
    whole = complete_items(target, scores)
    report = compute_metrics(whole, scores, tie_policy=config.metrics.tie_policy,
                             label_errata=config.metrics.label_errata,
                             max_nan_fraction=config.metrics.max_nan_fraction, source=str(scores_path))
    payload = report.to_dict() | {"items_scored": len(whole), "items_requested": len(target),
                                  "items_in_benchmark": len(manifest), "image_errors": errors.num_rows}
    (bench_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    print(format_report(report.to_dict()))
    print(f"scores: {scores_path}  ({len(whole)}/{len(target)} items; {errors.num_rows} unreadable image(s))")
    return BenchmarkRun(manifest.benchmark, report, scores_path, errors.num_rows, scored_now)


def _restrict(manifest: Manifest, wanted: set[str]) -> Manifest:
    from dataclasses import replace

    return replace(manifest, items=tuple(item for item in manifest.items if item.item_id in wanted))
