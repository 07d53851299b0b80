"""Score shards of a run: atomic part files, what is already done (resume), and the final assembled tables.

A run directory holds ``<benchmark>/shards/part-*.parquet``, each written whole (temp file + rename) by the driver
as results stream in, whichever executor produced them. Rows with ``error`` set record an unreadable image
(text_index -1). Plain pyarrow: no Ray.
"""

from __future__ import annotations

import os
import uuid
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perceive_ray.data.manifest import Manifest
from perceive_ray.data.scores import empty_scores


class ShardWriter:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.count = len(list(directory.glob("part-*.parquet")))

    def write(self, table: pa.Table) -> Path:
        self.count += 1
        final = self.directory / f"part-{self.count:06d}-{uuid.uuid4().hex[:8]}.parquet"
        temp = final.with_suffix(".tmp")
        pq.write_table(table, temp)
        os.replace(temp, final)  # a killed run leaves at most a .tmp file, never half a part
        return final


def read_shards(directory: Path) -> pa.Table | None:
    parts = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")


def done_rows(table: pa.Table | None, manifest: Manifest) -> set[tuple[str, int]]:
    """(item_id, image_index) rows whose every text has a score; error rows are retried on resume."""
    if table is None:
        return set()
    texts = {item.item_id: len(item.texts) for item in manifest.items}
    ok = table.filter(pc.equal(table.column("error"), "")) if "error" in table.column_names else table
    seen: dict[tuple[str, int], set[int]] = defaultdict(set)
    for item_id, image, text in zip(ok.column("item_id").to_pylist(), ok.column("image_index").to_pylist(),
                                    ok.column("text_index").to_pylist(), strict=True):
        seen[(item_id, int(image))].add(int(text))
    return {key for key, got in seen.items() if key[0] in texts and len(got) == texts[key[0]]}


def assemble(table: pa.Table | None, manifest: Manifest) -> tuple[pa.Table, pa.Table]:
    """Final (scores, errors): one score row per (item, image, text) in manifest order, first write wins; errors
    only for rows that never got scores."""
    if table is None:
        table = empty_scores().append_column("error", pa.array([], pa.string()))
    is_error = pc.not_equal(table.column("error"), "")
    scores, errors = table.filter(pc.invert(is_error)), table.filter(is_error)
    order = {item.item_id: n for n, item in enumerate(manifest.items)}
    keys = list(zip(scores.column("item_id").to_pylist(), scores.column("image_index").to_pylist(),
                    scores.column("text_index").to_pylist(), strict=True))
    first: dict[tuple, int] = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    ranked = sorted(first.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][1], kv[0][2]))
    scores = scores.take(pa.array([row for _, row in ranked], pa.int64())).drop(["error"])
    scored = {(k[0], k[1]) for k, _ in ranked}
    err_keys = list(zip(errors.column("item_id").to_pylist(), errors.column("image_index").to_pylist(), strict=True))
    keep = [row for row, key in enumerate(err_keys) if key not in scored]
    errors = errors.take(pa.array(keep, pa.int64())).select(["item_id", "image_index", "error"])
    return scores, errors


def complete_items(manifest: Manifest, scores: pa.Table) -> Manifest:
    """The manifest restricted to items whose every (image, text) cell is scored (metrics need whole items)."""
    cells: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for item_id, image, text in zip(scores.column("item_id").to_pylist(), scores.column("image_index").to_pylist(),
                                    scores.column("text_index").to_pylist(), strict=True):
        cells[item_id].add((int(image), int(text)))
    return manifest.restrict(item.item_id for item in manifest.items
                             if len(cells.get(item.item_id, ())) == len(item.images) * len(item.texts))
