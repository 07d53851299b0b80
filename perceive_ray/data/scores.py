"""The scores table, defined once: one row per scored (item, image, text), Parquet with provenance metadata.

Contract: ``item_id`` string, ``image_index`` int64, ``text_index`` int64, ``score`` float64; extra columns
(``lm_tokens``, ``score_t2v``, ``query_prompt``, ``score_two_way``, ...) are allowed and kept. A table written by
an evaluation carries the scorer's ``describe()`` output as JSON under the Parquet key-value metadata key
``perceive_ray.describe`` (and the run's identity under ``perceive_ray.run``), so a scores file says what made it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DESCRIBE_KEY = b"perceive_ray.describe"
RUN_KEY = b"perceive_ray.run"

SCORE_COLUMNS = {"item_id": pa.string(), "image_index": pa.int64(), "text_index": pa.int64(), "score": pa.float64()}


class ScoresError(ValueError):
    """The scores table is malformed or does not cover the benchmark's items."""


def scores_table(item_ids, image_indices, text_indices, scores) -> pa.Table:
    """Build a scores table with the contract's column types."""
    return pa.table(
        {
            "item_id": pa.array([str(i) for i in item_ids], pa.string()),
            "image_index": pa.array(image_indices, pa.int64()),
            "text_index": pa.array(text_indices, pa.int64()),
            "score": pa.array(scores, pa.float64()),
        }
    )


def read_scores(path: str | Path, *, keep_extra: bool = False) -> pa.Table:
    """A scores file, checked against the contract; ``keep_extra`` keeps the extra columns (score views, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ScoresError(f"{path}: scores file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ScoresError(f"{path}: not a readable Parquet file: {exc}") from exc
    checked = validate_scores(table, source=str(path))
    if not keep_extra:
        return checked
    extra = [name for name in table.column_names if name not in SCORE_COLUMNS]
    for name in extra:
        checked = checked.append_column(name, table.column(name))
    return checked


def validate_scores(table: pa.Table, *, source: str = "<scores>") -> pa.Table:
    """Check the column contract and cast to it; return the four contract columns."""
    missing = [name for name in SCORE_COLUMNS if name not in table.column_names]
    if missing:
        raise ScoresError(f"{source}: scores table lacks column(s) {missing}; has {table.column_names}")
    columns = {}
    for name, kind in SCORE_COLUMNS.items():
        column = table.column(name)
        if column.null_count:
            raise ScoresError(f"{source}: column {name!r} has {column.null_count} null value(s)")
        try:
            columns[name] = column.cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ScoresError(f"{source}: column {name!r} cannot be read as {kind}: {exc}") from exc
    return pa.table(columns)


def empty_scores() -> pa.Table:
    return scores_table([], [], [], [])


def write_scores(table: pa.Table, path: str | Path, *, describe: Mapping[str, Any] | None = None,
                 run: Mapping[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename), with the provenance JSON in the Parquet key-value metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(table.schema.metadata or {})
    if describe is not None:
        metadata[DESCRIBE_KEY] = json.dumps(describe, sort_keys=True).encode()
    if run is not None:
        metadata[RUN_KEY] = json.dumps(run, sort_keys=True).encode()
    temp = path.with_name(path.name + ".tmp")
    pq.write_table(table.replace_schema_metadata(metadata or None), temp)
    os.replace(temp, path)
    return path


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The ``describe`` and ``run`` JSON stored in a scores file's metadata ({} where absent)."""
    metadata = pq.read_schema(path).metadata or {}
    return {key.decode().removeprefix("perceive_ray."): json.loads(value) for key, value in metadata.items()
            if key in (DESCRIBE_KEY, RUN_KEY)}
