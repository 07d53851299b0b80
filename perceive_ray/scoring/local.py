"""The in-process reference runner: any scorer over a manifest in one process -> the scores table.

This is the plain loop the Ray Data pipeline is compared with: same scoring rows, same scorer object, batches of
``batch_size`` (item, image) rows, images decoded here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from perceive_ray import registry
from perceive_ray.config import ModelConfig, ScorerConfig
from perceive_ray.data.images import ImageError, load_rgb, scoring_rows
from perceive_ray.data.manifest import Manifest
from perceive_ray.metrics.scores import validate_scores


def build_scorer(model: ModelConfig, scorer: ScorerConfig) -> Callable[[Mapping[str, Any]], dict[str, list]]:
    """Instantiate the registered scorer class (loads its model once)."""
    return registry.resolve("scorers", scorer.name)(model, scorer)


@dataclass
class LocalResult:
    scores: pa.Table
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def run_local(
    manifest: Manifest,
    scorer: Callable[[Mapping[str, Any]], dict[str, list]],
    *,
    batch_size: int,
    limit: int | None = None,
    on_error: str = "fail",
    progress: bool = False,
) -> LocalResult:
    """Score every (item, image) row of ``manifest``; ``on_error='record'`` skips unreadable images' items."""
    if on_error not in ("fail", "record"):
        raise ValueError(f"on_error must be 'fail' or 'record', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = scoring_rows(manifest, limit=limit)
    errors: list[dict[str, str]] = []
    bad_items: set[str] = set()
    for row in rows:  # decode first: a bad image fails before any model time is spent
        try:
            row["image"] = load_rgb(manifest.root, row["image_path"])
        except ImageError as exc:
            if on_error == "fail":
                raise
            errors.append({"item_id": row["item_id"], "image_path": row["image_path"], "reason": str(exc)})
            bad_items.add(row["item_id"])
    rows = [row for row in rows if row["item_id"] not in bad_items]

    start = time.perf_counter()
    tables = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        batch = {name: [row[name] for row in chunk] for name in chunk[0]}
        tables.append(pa.table(scorer(batch)))
        if progress:
            done = min(begin + batch_size, len(rows))
            print(f"\r{manifest.benchmark}: scored {done}/{len(rows)} image rows", end="", file=sys.stderr, flush=True)
    if progress and rows:
        print(file=sys.stderr)
    table = pa.concat_tables(tables, promote_options="default") if tables else _empty_scores()
    validate_scores(table, source=f"scorer output for {manifest.benchmark}")
    return LocalResult(scores=table, errors=errors, seconds=time.perf_counter() - start)


def _empty_scores() -> pa.Table:
    return pa.table({"item_id": pa.array([], pa.string()), "image_index": pa.array([], pa.int64()),
                     "text_index": pa.array([], pa.int64()), "score": pa.array([], pa.float64())})


def write_scores(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
