"""The in-process executor: scoring rows -> score blocks in this process (the path behind ``perceive-ray score``).

``LocalExecutor`` builds the scorer once, decodes each batch's images as it goes (streaming: memory stays at one
batch of images whatever the benchmark size) and yields score blocks; ``perceive_ray.evaluation`` does the rest.
``score_decoded_batch`` is shared with the Ray Data actors, so both executors turn a batch into the same block.
``run_local`` is the plain loop over one manifest that tests and benchmarks compare with.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from perceive_ray import registry
from perceive_ray.config import ModelConfig, ScorerConfig
from perceive_ray.data.images import ImageError, load_rgb, scoring_rows
from perceive_ray.data.manifest import Manifest
from perceive_ray.data.scores import empty_scores, validate_scores
from perceive_ray.data.scores import write_scores as write_scores  # noqa: PLC0414 (re-exported)

ScorerFn = Callable[[Mapping[str, Any]], dict[str, list]]


def build_scorer(model: ModelConfig, scorer: ScorerConfig) -> ScorerFn:
    """Instantiate the registered scorer class (loads its model once)."""
    return registry.resolve("scorers", scorer.name)(model, scorer)


def decode_rows(rows: list[dict[str, Any]], roots: Mapping[str, str], on_error: str) -> tuple[list, list[str]]:
    """Decoded RGB arrays (a 1x1 placeholder for unreadable ones) and '' or the reason, per row."""
    images, errors = [], []
    for row in rows:
        try:
            images.append(load_rgb(roots[str(row["benchmark"])], str(row["image_path"])))
            errors.append("")
        except ImageError as exc:
            if on_error == "fail":
                raise
            images.append(np.zeros((1, 1, 3), np.uint8))  # never scored: the row is reported as an error row
            errors.append(str(exc))
    return images, errors


def score_decoded_batch(scorer: ScorerFn, batch: Mapping[str, Any]) -> pa.Table:
    """Score the readable rows of a batch (columns of scoring rows + ``image`` + ``error``); unreadable rows become
    error rows (text_index -1, score NaN). Every row of the result carries ``benchmark`` and ``error``."""
    errors = [str(e) for e in batch["error"]]
    benchmarks = [str(b) for b in batch["benchmark"]]
    ok = [i for i, e in enumerate(errors) if not e]
    tables = []
    # One scorer call per benchmark present (item ids are unique only within a benchmark; Ray Data batches can
    # straddle two benchmarks at a boundary).
    for name in dict.fromkeys(benchmarks[i] for i in ok):
        rows = [i for i in ok if benchmarks[i] == name]
        sub = {column: [batch[column][i] for i in rows] for column in batch if column not in ("error", "image_path")}
        out = pa.table(scorer(sub))
        out = out.append_column("benchmark", pa.array([name] * out.num_rows, pa.string()))
        tables.append(out.append_column("error", pa.array([""] * out.num_rows, pa.string())))
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        tables.append(pa.table({
            "item_id": pa.array([str(batch["item_id"][i]) for i in bad], pa.string()),
            "image_index": pa.array([int(batch["image_index"][i]) for i in bad], pa.int64()),
            "text_index": pa.array([-1] * len(bad), pa.int64()),
            "score": pa.array([float("nan")] * len(bad), pa.float64()),
            "benchmark": pa.array([benchmarks[i] for i in bad], pa.string()),
            "error": pa.array([errors[i] for i in bad], pa.string()),
        }))
    return pa.concat_tables(tables, promote_options="default")


def batches_by_benchmark(rows: list[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive rows in batches of ``batch_size``, never mixing two benchmarks in one batch."""
    chunk: list[dict[str, Any]] = []
    for row in rows:
        if chunk and (len(chunk) == batch_size or row["benchmark"] != chunk[-1]["benchmark"]):
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk


def load_record(seconds: float, threads: int, describe: Mapping[str, Any]) -> dict[str, Any]:
    """One scorer construction, as the run record lists it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "threads": threads,
            "device": describe.get("device", "cpu"), "load_seconds": round(seconds, 3)}


class LocalExecutor:
    """Scores in this process: one scorer built on first use, batches of ``scorer.batch_size`` scoring rows."""

    runner = "local"

    def __init__(self, *, progress: bool = True) -> None:
        self.scorer: Any = None
        self._loads: list[dict[str, Any]] = []
        self.progress = progress

    def build(self, config: Any) -> Any:
        if self.scorer is None:
            import torch

            start = time.perf_counter()
            self.scorer = build_scorer(config.model, config.scorer)
            self._loads.append(load_record(time.perf_counter() - start, torch.get_num_threads(),
                                           self.scorer.describe()))
        return self.scorer

    def stream(self, config: Any, rows: list[dict[str, Any]], roots: Mapping[str, str],
               on_error: str) -> Iterator[pa.Table]:
        scorer = self.build(config)
        for chunk in batches_by_benchmark(rows, config.scorer.batch_size):
            images, errors = decode_rows(chunk, roots, on_error)
            batch = {name: [row[name] for row in chunk] for name in chunk[0]}
            yield score_decoded_batch(scorer, batch | {"image": images, "error": errors})

    def describe(self) -> dict[str, Any]:
        return self.scorer.describe() if self.scorer is not None else {}

    def loads(self) -> list[dict[str, Any]]:
        return list(self._loads)


@dataclass
class LocalResult:
    scores: pa.Table
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def run_local(manifest: Manifest, scorer: ScorerFn, *, batch_size: int, limit: int | None = None,
              on_error: str = "fail", progress: bool = False) -> LocalResult:
    """Score every (item, image) row of ``manifest`` in this process (the plain loop tests and benchmarks use);
    ``on_error='record'`` drops the items of unreadable images and lists them in ``errors``."""
    if on_error not in ("fail", "record"):
        raise ValueError(f"on_error must be 'fail' or 'record', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = scoring_rows(manifest, limit=limit)
    start = time.perf_counter()
    tables, errors = [], []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        images, reasons = decode_rows(chunk, {manifest.benchmark: manifest.root}, on_error)
        batch = {name: [row[name] for row in chunk] for name in chunk[0]}
        block = score_decoded_batch(scorer, batch | {"image": images, "error": reasons})
        tables.append(block)
        if progress:
            done = min(begin + batch_size, len(rows))
            print(f"\r{manifest.benchmark}: scored {done}/{len(rows)} image rows", end="", file=sys.stderr, flush=True)
    if progress and rows:
        print(file=sys.stderr)
    table = pa.concat_tables(tables, promote_options="default") if tables else empty_scores()
    if "error" in table.column_names:
        bad = table.filter(pa.compute.not_equal(table.column("error"), ""))
        bad_items = set(bad.column("item_id").to_pylist())
        for item_id, reason in zip(bad.column("item_id").to_pylist(), bad.column("error").to_pylist(), strict=True):
            errors.append({"item_id": item_id, "reason": reason})
        keep = pa.compute.invert(pa.compute.is_in(table.column("item_id"), pa.array(sorted(bad_items), pa.string())))
        table = table.filter(keep).drop(["error", "benchmark"])
    validate_scores(table, source=f"scorer output for {manifest.benchmark}")
    return LocalResult(scores=table, errors=errors, seconds=time.perf_counter() - start)
