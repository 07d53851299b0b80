"""The Ray-free evaluation core: everything of an evaluation except the scoring loop.

``run_evaluation(config, executor)`` checks the inputs, loads every manifest, takes the run directory's lock,
compares the resume identity, then hands the not-yet-scored (benchmark, item, image) rows of ALL benchmarks to one
executor (``scoring.local.LocalExecutor`` in this process, ``run.inference.RayDataExecutor`` on Ray Data: one
model load per actor, whatever the number of benchmarks). It writes each returned block as atomic shards per
benchmark (written when the first score lands: ``config.yaml`` and ``run_record.json``), finishes every benchmark
whose rows are all in (complete items only -> metrics -> ``metrics.json`` -> tracker), and appends this
invocation's entry (model loads, rows, devices) to the run record. ``score`` and ``eval`` differ only in the
executor, so the same YAML behaves the same under both.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from perceive_ray import registry
from perceive_ray.config import BenchmarkConfig, ExperimentConfig, config_record, dump_config, redact_uri
from perceive_ray.data.images import scoring_rows
from perceive_ray.data.manifest import Manifest
from perceive_ray.data.scores import write_scores
from perceive_ray.data.shards import ShardWriter, assemble, complete_items, done_rows, read_shards
from perceive_ray.metrics.base import MetricReport
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.models.fingerprint import compute_weights_fingerprint, fingerprint_digest
from perceive_ray.preflight import check_inputs
from perceive_ray.run_directory import (
    RunLock,
    RunMismatchError,
    append_evaluation,
    check_identity,
    read_record,
    read_tracking_state,
    write_record_once,
    write_tracking_state,
)
from perceive_ray.tracking.run_record import build_run_record, experiment_tags, flatten_tags
from perceive_ray.tracking.tracker import (
    GuardedTracker,
    Tracker,
    TrackingFailedError,
    build_tracker,
    resolve_tracking_uri,
)

ON_ERROR = ("record", "fail")
# Fault injection for the reliability suite (tests/reliability, benchmarks/faults.py): the driver SIGKILLs itself at
# the named point, e.g. PERCEIVE_RAY_FAULT=block:3. Points: start, block:<n>, between_benchmarks, final_logging.
FAULT_ENV = "PERCEIVE_RAY_FAULT"


def fault_point(name: str) -> None:
    """Die here, as a killed driver would, when the fault-injection variable names this point."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Executor(Protocol):
    """Turns scoring rows into score blocks. Blocks carry ``benchmark`` and ``error`` ('' or the reason; error rows
    have text_index -1) besides the scores-table columns."""

    runner: str

    def stream(self, config: ExperimentConfig, rows: list[dict[str, Any]], roots: Mapping[str, str],
               on_error: str) -> Iterator[pa.Table]: ...

    def describe(self) -> dict[str, Any]:
        """The scorer's describe() (available once the first block has been produced)."""
        ...

    def loads(self) -> list[dict[str, Any]]:
        """One entry per scorer construction: host, pid, threads, device, load seconds."""
        ...


@dataclass
class BenchmarkPlan:
    config: BenchmarkConfig
    manifest: Manifest  # the whole benchmark
    target: Manifest  # what this run scores (the first ``limit`` items)
    directory: Path

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class BenchmarkResult:
    benchmark: str
    report: MetricReport
    scores_path: Path
    errors: int
    rows_scored_now: int


@dataclass
class EvaluationPlan:
    config: ExperimentConfig
    run_dir: Path
    benchmarks: list[BenchmarkPlan]
    identity: dict[str, Any]  # what decides the scores, known before any model loads
    record: dict[str, Any] | None  # the stored run record of a resumed run
    on_error: str
    lock: RunLock
    runner: str
    rows_scored_now: dict[str, int] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run_dir.name


def build_identity(config: ExperimentConfig, manifests: Mapping[str, Manifest]) -> dict[str, Any]:
    """Model, scorer (options with defaults filled, placement options left out), seed, dataset file hashes and the
    weights fingerprint: a resume must agree on all of them."""
    options_model = registry.resolve_options(config.scorer.name)
    options = {k: v for k, v in config.scorer.options.items() if k not in options_model.placement_fields}
    return {
        "model": config.model.model_dump(mode="json"),
        "scorer": {"name": config.scorer.name, "options": options},
        "seed": config.seed,
        "datasets": {name: dict(m.source_hashes) for name, m in manifests.items()},
        "weights": compute_weights_fingerprint(config.model, config.scorer.options, options_model.weight_fields),
    }


def comparable_describe(describe: Mapping[str, Any]) -> dict[str, Any]:
    """describe() without the device: a resume on another card type is allowed (devices are recorded per run)."""
    return {k: v for k, v in describe.items() if k != "device"}


def plan_evaluation(config: ExperimentConfig, *, run_id: str | None = None, run_dir: Path | None = None,
                    on_error: str | None = None, runner: str = "local") -> EvaluationPlan:
    """Check inputs, load manifests, take the lock and compare the resume identity; nothing is loaded or started."""
    on_error = on_error or config.on_error
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    manifests = check_inputs(config)  # model source, weight files, every dataset: before anything expensive
    for manifest in manifests:
        for warning in manifest.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    run_dir = Path(run_dir) if run_dir is not None else config.output_dir / (run_id or config.name)
    benchmarks = [BenchmarkPlan(bench, manifest, manifest.head(bench.limit), run_dir / bench.name)
                  for bench, manifest in zip(config.benchmarks, manifests, strict=True)]
    names = [b.name for b in benchmarks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        from perceive_ray.config import ConfigError

        raise ConfigError(f"benchmarks: {', '.join(duplicates)} listed twice; one entry per benchmark")
    identity = build_identity(config, {b.name: b.manifest for b in benchmarks})
    lock = RunLock(run_dir).acquire()
    try:
        record = read_record(run_dir)
        if record is None and any((b.directory / "shards").is_dir() and any((b.directory / "shards").iterdir())
                                  for b in benchmarks):
            raise RunMismatchError(f"run directory {run_dir} holds shards but no run record: it was written by "
                                   "another version of this tool; pick another --run-id")
        stored = record.get("identity") if record else None
        if stored is not None:
            stored = {k: v for k, v in stored.items() if k != "describe"}
        check_identity(run_dir, stored, identity, what="model, scorer, data, weights or seed")
    except BaseException:
        lock.release()
        raise
    return EvaluationPlan(config, run_dir, benchmarks, identity, record, on_error, lock, runner)


def pending_rows(plan: EvaluationPlan) -> list[dict[str, Any]]:
    """Scoring rows of every benchmark not yet scored (resume is per (benchmark, item, image) row)."""
    rows: list[dict[str, Any]] = []
    for bench in plan.benchmarks:
        done = done_rows(read_shards(bench.directory / "shards"), bench.target)
        todo = [row for row in scoring_rows(bench.target) if (row["item_id"], row["image_index"]) not in done]
        total = sum(len(item.images) for item in bench.target.items)
        print(f"{bench.name}: {total - len(todo)}/{total} image rows already scored, {len(todo)} to go",
              file=sys.stderr)
        rows.extend(todo)
    return rows


def format_report(report: Mapping[str, Any]) -> str:
    """A metric table with chance levels and numerators/denominators."""
    lines = [f"{report['benchmark']}  (tie_policy={report['tie_policy']}, label_errata={report['label_errata']})",
             f"{'metric':<40} {'value':>8} {'chance':>8} {'n':>12}"]
    counts = report["counts"]
    for key, value in report["metrics"].items():
        n = f"{counts.get(key + '/correct', '')}/{counts.get(key + '/total', '')}"
        excluded = counts.get(key + "/excluded")
        note = f"  ({excluded} incomplete group(s) excluded)" if excluded else ""
        lines.append(f"{key:<40} {100 * value:>7.2f}% {100 * report['chance'][key]:>7.2f}% {n:>12}{note}")
    lines.append(f"exact ties: {counts.get('ties', 0)}")
    return "\n".join(lines)


class _Session:
    """The driver side of one invocation: shards per benchmark, the record, progress, per-benchmark completion."""

    def __init__(self, plan: EvaluationPlan, rows: list[dict[str, Any]], tracker: Tracker, executor: Executor):
        self.plan, self.tracker, self.executor = plan, tracker, executor
        self.writers = {b.name: ShardWriter(b.directory / "shards") for b in plan.benchmarks}
        self.texts: dict[tuple[str, str, int], int] = {}
        self.cells: dict[str, int] = defaultdict(int)  # score cells still expected per benchmark
        self.rows_total: dict[str, int] = defaultdict(int)
        for row in rows:
            self.texts[(row["benchmark"], row["item_id"], row["image_index"])] = len(row["texts"])
            self.cells[row["benchmark"]] += len(row["texts"])
            self.rows_total[row["benchmark"]] += 1
        self.rows_now: dict[str, int] = defaultdict(int)
        self.describe: dict[str, Any] | None = (plan.record or {}).get("identity", {}).get("describe")
        self.checked = False
        self.results: dict[str, BenchmarkResult] = {}
        self.last_progress = 0.0
        self.blocks = 0

    def on_block(self, block: pa.Table) -> None:
        if block.num_rows == 0:
            return
        if not self.checked:
            self._first_block()
        for name in pc.unique(block.column("benchmark")).to_pylist():
            part = block.filter(pc.equal(block.column("benchmark"), name)).drop(["benchmark"])
            self.writers[name].write(part)
            items, images = part.column("item_id").to_pylist(), part.column("image_index").to_pylist()
            texts = part.column("text_index").to_pylist()
            for item_id, image, text in zip(items, images, texts, strict=True):
                if text == -1:  # an unreadable image: one error row stands for all its texts
                    self.cells[name] -= self.texts.get((name, item_id, int(image)), 1)
                    self.rows_now[name] += 1
                else:
                    self.cells[name] -= 1
                    self.rows_now[name] += int(text == 0)
            if self.cells[name] <= 0 and name not in self.results:
                self.finish_benchmark(name)
                if len(self.results) < len(self.plan.benchmarks):
                    fault_point("between_benchmarks")
        self.blocks += 1
        fault_point(f"block:{self.blocks}")
        self._progress()

    def _first_block(self) -> None:
        """Before the first shard is written: check the scorer's describe() against a resumed run, write the
        record and config once, and tag the tracked run."""
        describe = self.executor.describe()
        stored = (self.plan.record or {}).get("identity", {}).get("describe")
        if stored is not None:
            check_identity(self.plan.run_dir, comparable_describe(stored), comparable_describe(describe),
                           what="scorer setup (describe)")
        self.describe = describe
        record = build_run_record({b.name: b.manifest.source_hashes for b in self.plan.benchmarks})
        record.update(run_id=self.plan.run_id, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      identity={**self.plan.identity, "describe": describe})
        write_record_once(self.plan.run_dir, record, dump_config(self.plan.config))
        self.tracker.log_tags(flatten_tags({"describe": describe}))
        self.checked = True

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress < 2.0:
            return
        self.last_progress = now
        done = sum(self.rows_now.values())
        total = sum(self.rows_total.values())
        parts = ", ".join(f"{n} {self.rows_now[n]}/{self.rows_total[n]}" for n in self.rows_total)
        print(f"scored {done}/{total} image rows ({parts})", file=sys.stderr)

    def finish_benchmark(self, name: str) -> BenchmarkResult:
        bench = next(b for b in self.plan.benchmarks if b.name == name)
        result = finish_benchmark(self.plan, bench, self.describe, self.rows_now.get(name, 0))
        log_benchmark(self.tracker, name, result)
        self.results[name] = result
        return result


def finish_benchmark(plan: EvaluationPlan, bench: BenchmarkPlan, describe: Mapping[str, Any] | None,
                     rows_now: int) -> BenchmarkResult:
    """Assemble the shards, restrict to complete items, compute the metrics, write scores/errors/metrics files."""
    config = plan.config
    scores, errors = assemble(read_shards(bench.directory / "shards"), bench.target)
    run = {"run_id": plan.run_id, "weights": fingerprint_digest(plan.identity["weights"]),
           "datasets": plan.identity["datasets"].get(bench.name, {})}
    scores_path = write_scores(scores, bench.directory / "scores.parquet", describe=describe, run=run)
    if errors.num_rows:
        write_scores(errors, bench.directory / "errors.parquet", run=run)
    whole = complete_items(bench.target, scores)
    report = compute_metrics(whole, scores, tie_policy=config.metrics.tie_policy,
                             label_errata=config.metrics.label_errata,
                             max_nan_fraction=config.metrics.max_nan_fraction, source=str(scores_path),
                             mmvp_logit_scale=registry.scorer(config.scorer.name).mmvp_logit_scale)
    report.counts["items_excluded"] = len(bench.target) - len(whole)
    payload = report.to_dict() | {"items_scored": len(whole), "items_requested": len(bench.target),
                                  "items_excluded": len(bench.target) - len(whole),
                                  "items_in_benchmark": len(bench.manifest), "image_errors": errors.num_rows}
    if describe and describe.get("score_columns") and len(report.score_columns) > 1:
        payload["score_column_prompts"] = describe["score_columns"]  # which prompt produced which column
    (bench.directory / "metrics.json").write_text(json.dumps(payload, indent=2))
    import pyarrow.parquet as pq  # per-unit 0/1 outcomes: what a report's intervals and paired tests resample

    pq.write_table(report.outcomes_table(), bench.directory / "outcomes.parquet")
    print(format_report(report.to_dict()))
    print(f"scores: {scores_path}  ({len(whole)}/{len(bench.target)} items; {errors.num_rows} unreadable image(s))")
    return BenchmarkResult(bench.name, report, scores_path, errors.num_rows, rows_now)


def log_benchmark(tracker: Tracker, benchmark: str, result: BenchmarkResult) -> None:
    """Metrics as ``{benchmark}/{metric}`` and the benchmark's files under the artifact folder ``{benchmark}/``."""
    counts = result.report.counts
    excluded = {f"{benchmark}/{key}": float(n) for key, n in counts.items() if key.endswith("/excluded")}
    tracker.log_metrics({f"{benchmark}/{key}": value for key, value in result.report.metrics.items()} | excluded
                        | {f"{benchmark}/image_errors": float(result.errors),
                           f"{benchmark}/items_excluded": float(counts.get("items_excluded", 0))})
    for name in ("scores.parquet", "metrics.json", "outcomes.parquet", "errors.parquet"):
        path = result.scores_path.parent / name
        if path.is_file():
            tracker.log_artifact(path, benchmark)


class TooManyImageErrors(ValueError):
    """More unreadable images than ``max_error_fraction`` allows; everything scored is written first."""


def check_error_budget(plan: EvaluationPlan, results: Mapping[str, BenchmarkResult]) -> None:
    """Fail (after everything is written) when a benchmark has more unreadable images than allowed."""
    limit = plan.config.max_error_fraction
    over = []
    for bench in plan.benchmarks:
        result = results.get(bench.name)
        rows = sum(len(item.images) for item in bench.target.items)
        if result is None or rows == 0 or result.errors / rows <= limit:
            continue
        import pyarrow.parquet as pq

        reasons = pq.read_table(result.scores_path.with_name("errors.parquet")).column("error").to_pylist()
        shown = "; ".join(reasons[:3]) + (f"; ... {len(reasons) - 3} more" if len(reasons) > 3 else "")
        over.append(f"{bench.name}: {result.errors} of {rows} images unreadable "
                    f"({100 * result.errors / rows:.1f}% > max_error_fraction {100 * limit:g}%): {shown}")
    if over:
        raise TooManyImageErrors("too many unreadable images (scores, metrics and errors.parquet are written):\n  "
                                 + "\n  ".join(over))


def run_evaluation(config: ExperimentConfig, executor: Executor, *, run_id: str | None = None,
                   run_dir: Path | None = None, track: bool = True, on_error: str | None = None,
                   attach_run: str | None = None) -> list[BenchmarkResult]:
    """Evaluate every benchmark of ``config`` with ``executor``; resumable by run id (see the module docstring).
    ``attach_run``: log into that MLflow run (a sweep trial's child, which the sweep ends) instead of one per run.

    A tracking failure mid-run does not stop the scoring: the evaluation finishes, then raises
    TrackingFailedError naming the run directory (``perceive-ray track RUN_DIR`` logs it later)."""
    plan = plan_evaluation(config, run_id=run_id, run_dir=run_dir, on_error=on_error, runner=executor.runner)
    started = time.time()
    uri = resolve_tracking_uri(config.tracking.uri)
    try:
        # An unreachable tracking server fails here, before any model time.
        tracker = GuardedTracker(build_tracker(config.tracking.uri, config.tracking.experiment, enabled=track,
                                               timeout_s=config.tracking.timeout_s,
                                               max_retries=config.tracking.max_retries,
                                               attach=(attach_run, "eval") if attach_run else None))
        rows = pending_rows(plan)
        session = _Session(plan, rows, tracker, executor)
        tags = experiment_tags(config, plan.identity, runner=executor.runner, run_id=plan.run_id)
        tracker.start(plan.run_id, config_record(config), tags,
                      resume_run_id=read_tracking_state(plan.run_dir, uri) if track else None)
        if track:
            write_tracking_state(plan.run_dir, uri, config.tracking.experiment, tracker.run_id, "RUNNING",
                                 tracker.failure)
        fault_point("start")
        status = "FINISHED"
        try:
            if rows:
                roots = {b.name: b.manifest.root for b in plan.benchmarks}
                for block in executor.stream(config, rows, roots, plan.on_error):
                    session.on_block(block)
                session._progress(force=True)
            for bench in plan.benchmarks:
                if bench.name not in session.results:
                    session.finish_benchmark(bench.name)
            loads = executor.loads() if rows else []
            fault_point("final_logging")
            append_evaluation(plan.run_dir, {
                "runner": executor.runner, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "seconds": round(time.time() - started, 3), "model_loads": len(loads), "actors": loads,
                "rows_scored": dict(session.rows_now), "config": config_record(config),
                "git_sha": build_run_record({})["git_sha"], "tracking_run_id": tracker.run_id,
            })
            for path in (plan.run_dir / "config.yaml", plan.run_dir / "run_record.json"):
                if path.is_file():
                    tracker.log_artifact(path)
            check_error_budget(plan, session.results)
        except BaseException:
            status = "FAILED"
            raise
        finally:
            tracker.finish(status)
            if track:
                final = status if tracker.failure is None else "TRACKING_FAILED"
                write_tracking_state(plan.run_dir, uri, config.tracking.experiment, tracker.run_id, final,
                                     tracker.failure)
    finally:
        plan.lock.release()
    if tracker.failure is not None:
        raise TrackingFailedError(
            f"every benchmark was scored and written to {plan.run_dir}, but tracking to {redact_uri(uri)} failed "
            f"({tracker.failure}); log the run once the server is back with: perceive-ray track {plan.run_dir}")
    if track:
        print(f"tracked: run {tracker.run_id}")
        print(f"open the runs with: mlflow ui --host 127.0.0.1 --backend-store-uri {uri}"
              if uri.startswith("sqlite") else f"open the runs at: {redact_uri(uri)}")
    return [session.results[b.name] for b in plan.benchmarks]
