"""SeeTRUE adapter: one 1x1 item (image, text, binary label) per ``SeeTRUE.csv`` row; subset = dataset_source.

Dataset root = the folder holding ``SeeTRUE.csv`` (HF ``yonatanbitton/SeeTRUE``; the reference reads it from
its ``datasets/`` folder) and the image folder: ``images/<image>`` (HF ``images.zip`` unpacked in the root,
the layout of the HF loading script) or ``seetrue/images/<image>`` (where the reference unpacks it); the first
that exists is used.

The CSV must have at least the columns image, text, label, dataset_source (extra columns such as
original_dataset_id are kept in ``meta``); label must be exactly ``0`` or ``1``. Item ids are the 0-based
data-row positions as strings, and errors name the file and that row. No published size is checked ([U]).
"""

from __future__ import annotations

from pathlib import Path

from perceive_ray.data.manifest import Item, Manifest, ManifestError
from perceive_ray.data.sources import SourceFiles

CSV_FILE = "SeeTRUE.csv"
REQUIRED_COLUMNS = ("image", "text", "label", "dataset_source")
IMAGE_DIRS = ("images", "seetrue/images")


def load_seetrue(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """SeeTRUE: 1x1 items with ``Item.label`` in {0, 1} and ``Item.subset`` = dataset_source."""
    files = SourceFiles(root, "seetrue")
    path = files.find(CSV_FILE)
    rows = files.read_csv(path, min_header=REQUIRED_COLUMNS, row_label=lambda i: f"row {i}")
    image_dir = files.rel(files.find_dir(*IMAGE_DIRS))
    items = []
    for row, record in enumerate(rows):
        where = f"{path}: row {row}"
        if record["label"] not in ("0", "1"):
            raise ManifestError(f"{where}: label must be 0 or 1, got {record['label']!r}")
        if not record["dataset_source"]:
            raise ManifestError(f"{where}: dataset_source is empty")
        if not record["text"]:
            raise ManifestError(f"{where}: text is empty")
        if not record["image"]:
            raise ManifestError(f"{where}: image is empty")
        items.append(
            Item(
                item_id=str(row),
                images=(files.image(record["image"], where=where, under=image_dir),),
                texts=(record["text"],),
                subset=record["dataset_source"],
                label=int(record["label"]),
                meta={k: v for k, v in record.items() if k not in REQUIRED_COLUMNS},
            )
        )
    return Manifest("seetrue", str(files.root), tuple(items), dict(files.hashes), ())
