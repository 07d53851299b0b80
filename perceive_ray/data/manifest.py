"""The one Manifest schema every benchmark adapter produces, with Parquet IO and validation.

A manifest is a list of *items*. An item is the unit a metric judges: a grid of ``len(images) x len(texts)``
candidate scores (What'sUp Controlled 1x4, COCO/VG 1x2, MMVP and the Winoground family 2x2, SugarCrepe 1x2,
SeeTRUE 1x1). Image references are POSIX paths relative to the dataset root; texts are byte-exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_VERSION = 1

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("pair_key", pa.string(), nullable=False),
        pa.field("image_paths", pa.list_(pa.string()), nullable=False),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("two_way", pa.list_(pa.int64()), nullable=False),
        pa.field("tags", pa.list_(pa.string()), nullable=False),
        pa.field("meta", pa.string(), nullable=False),
    ]
)


class ManifestError(ValueError):
    """A benchmark file is structurally wrong; the message names the file and the row or key."""


@dataclass(frozen=True)
class Item:
    """One scored unit.

    item_id   -- stable id used as the scores table's ``item_id`` (see the scores-table contract).
    subset    -- sub-benchmark (e.g. SugarCrepe ``add_obj``, EqBen ``eqbenk``, SeeTRUE ``dataset_source``).
    group     -- relation group (``lr``, ``ou``, ``fb``, ``tb``, ``ab``) or category (MMVP-VLM); ``""`` if none.
    pair_key  -- What'sUp Controlled object pair ``obj1/obj2`` (the 4 images of a key form a set).
    images    -- image paths relative to the dataset root.
    texts     -- candidate texts, byte-exact.
    label     -- binary label where the benchmark has one (SeeTRUE), else -1.
    two_way   -- What'sUp Controlled: text indices [true, opposite] for the 2-way protocol.
    tags      -- free tags (Winoground why-hard tags).
    meta      -- JSON-serialisable extras (raw statements, questions, relation keys, ...).
    """

    item_id: str
    images: tuple[str, ...]
    texts: tuple[str, ...]
    subset: str = ""
    group: str = ""
    pair_key: str = ""
    label: int = -1
    two_way: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "subset": self.subset,
            "group": self.group,
            "pair_key": self.pair_key,
            "image_paths": list(self.images),
            "texts": list(self.texts),
            "label": int(self.label),
            "two_way": [int(i) for i in self.two_way],
            "tags": list(self.tags),
            "meta": json.dumps(dict(self.meta), sort_keys=True, ensure_ascii=False),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Item:
        return cls(
            item_id=row["item_id"],
            images=tuple(row["image_paths"]),
            texts=tuple(row["texts"]),
            subset=row["subset"],
            group=row["group"],
            pair_key=row["pair_key"],
            label=int(row["label"]),
            two_way=tuple(int(i) for i in row["two_way"]),
            tags=tuple(row["tags"]),
            meta=json.loads(row["meta"]),
        )


@dataclass(frozen=True)
class Manifest:
    """All items of one benchmark read from one dataset root.

    source_hashes maps each annotation file (relative to ``root``) to its sha256, so runs record what they read.
    warnings carries non-fatal findings (e.g. a size that differs from the published one).
    """

    benchmark: str
    root: str
    items: tuple[Item, ...]
    source_hashes: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for item in self.items:
            if item.item_id in seen:
                raise ManifestError(f"{self.benchmark}: duplicate item_id {item.item_id!r}")
            seen.add(item.item_id)
            if not item.images or not item.texts:
                raise ManifestError(f"{self.benchmark}: item {item.item_id!r} needs at least one image and one text")

    def __len__(self) -> int:
        return len(self.items)

    def by_id(self) -> dict[str, Item]:
        return {item.item_id: item for item in self.items}

    def restrict(self, item_ids: Iterable[str]) -> Manifest:
        """The same manifest with only the items whose id is in ``item_ids`` (manifest order kept)."""
        wanted = set(item_ids)
        return replace(self, items=tuple(item for item in self.items if item.item_id in wanted))

    def head(self, limit: int | None) -> Manifest:
        """The first ``limit`` items (all of them for None): what a ``limit`` run scores."""
        return self if limit is None else replace(self, items=self.items[:limit])

    def to_table(self) -> pa.Table:
        table = pa.Table.from_pylist([item.to_row() for item in self.items], schema=MANIFEST_SCHEMA)
        meta = {
            b"perceive_ray.manifest": json.dumps(
                {
                    "version": MANIFEST_VERSION,
                    "benchmark": self.benchmark,
                    "root": self.root,
                    "source_hashes": dict(self.source_hashes),
                    "warnings": list(self.warnings),
                },
                sort_keys=True,
            ).encode()
        }
        return table.replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, table: pa.Table, *, source: str = "<table>") -> Manifest:
        raw = (table.schema.metadata or {}).get(b"perceive_ray.manifest")
        if raw is None:
            raise ManifestError(f"{source}: not a perceive_ray manifest (schema metadata 'perceive_ray.manifest' missing)")
        header = json.loads(raw)
        missing = [f.name for f in MANIFEST_SCHEMA if f.name not in table.column_names]
        if missing:
            raise ManifestError(f"{source}: manifest columns missing: {', '.join(missing)}")
        items = tuple(Item.from_row(row) for row in table.select(MANIFEST_SCHEMA.names).to_pylist())
        return cls(
            benchmark=header["benchmark"],
            root=header["root"],
            items=items,
            source_hashes=header.get("source_hashes", {}),
            warnings=tuple(header.get("warnings", ())),
        )

    def write_parquet(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.to_table(), path)
        return path

    @classmethod
    def read_parquet(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"{path}: manifest file not found")
        return cls.from_table(pq.read_table(path), source=str(path))


def check_size(
    warnings: list[str], *, what: str, actual: int, expected: int | Iterable[int], strict: bool
) -> None:
    """Compare a count with its published value: a warning, or a ManifestError under ``strict``."""
    allowed = {expected} if isinstance(expected, int) else set(expected)
    if actual in allowed:
        return
    want = " or ".join(str(e) for e in sorted(allowed))
    message = f"{what}: {actual} found, published size is {want}"
    if strict:
        raise ManifestError(message + " (--strict-sizes)")
    warnings.append(message)
