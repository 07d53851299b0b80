"""Winoground-family adapters: 2x2 items of Winoground, EqBen_Mini, NaturalBench-Retrieval and COCO-CF.

Layouts follow the t2v_metrics dataset classes vendored by the reference (``t2v_metrics/dataset.py``). The
dataset root is the folder those classes take as ``root_dir`` (``./datasets`` in the reference); each
benchmark keeps its files in its own place under it, and manifest image paths are POSIX paths relative to the
root:

- winoground (400 items): ``winoground/metadata.csv`` (id, image_0, image_1, caption_0, caption_1; image paths
  are relative to ``winoground/``), ``winoground/examples.jsonl`` (id, num_main_preds, collapsed_tag) and
  ``winoground/why_winoground_hard.json`` ({"id": [tags]}). Image k = ``winoground/<image_k>``.
- eqben_mini (size [U]): ``eqben_vllm/all_select.json``, an array of {image0, image1, caption0, caption1}.
  Image k = ``eqben_vllm/images/<imagek>``.
- naturalbench (size [U]): ``NaturalBench-Retrieval/metadata.json``, an array of {index, image_0, image_1,
  caption_0, caption_1} (the HF ``NaturalBench-Retrieval.zip`` unpacked in the root).
  Image k = ``NaturalBench-Retrieval/images/<image_k>``.
- coco_cf (17,409 items): ``cococounterfactuals.jsonl``, one {image_0, image_1, caption_0, caption_1} a line
  with image stems. Image k = ``COCOCounterfactuals/images/<stem>.jpg`` (the reference) or
  ``images/<stem>.jpg`` (HF ``Intel/COCO-Counterfactuals`` images.zip unpacked in the root); the first folder
  that exists is used.

Every item is built by one function, ``build_pair_item``: images [image_0, image_1], texts [caption_0,
caption_1], caption_k matches image_k. Item ids: Winoground ``id`` (must equal the row position, as the
reference asserts), NaturalBench ``index`` (must equal the position), EqBen and COCO-CF the 0-based row
position. Error messages name the file and the 0-based row (= position among data rows/records).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from perceive_ray.data.manifest import Item, Manifest, ManifestError, check_size
from perceive_ray.data.sources import SourceFiles, check_fields, describe

WINOGROUND_DIR = "winoground"
WINOGROUND_COLUMNS = ("id", "image_0", "image_1", "caption_0", "caption_1")
WINOGROUND_ITEMS = 400

EQBEN_FILE = "eqben_vllm/all_select.json"
EQBEN_IMAGES = "eqben_vllm/images"
EQBEN_FIELDS = ("image0", "image1", "caption0", "caption1")
# First path component of image0 -> reported subset (the reference's grouping; the three Kubric parts are
# one). [U] The reference names gebc/youcook2 `eqbeng`/`eqbeny`; we keep the folder names, as the brief asks.
EQBEN_SUBSETS = {
    "eqbensd": "eqbensd",
    "eqbenkubric_cnt": "eqbenk",
    "eqbenkubric_loc": "eqbenk",
    "eqbenkubric_attr": "eqbenk",
    "eqbengebc": "eqbengebc",
    "eqbenag": "eqbenag",
    "eqbenyoucook2": "eqbenyoucook2",
}

NATURALBENCH_FILE = "NaturalBench-Retrieval/metadata.json"
NATURALBENCH_IMAGES = "NaturalBench-Retrieval/images"
PAIR_FIELDS = ("image_0", "image_1", "caption_0", "caption_1")

COCO_CF_FILE = "cococounterfactuals.jsonl"
# The reference reads COCOCounterfactuals/images; HF Intel/COCO-Counterfactuals' images.zip unpacks to
# images/.
COCO_CF_IMAGE_DIRS = ("COCOCounterfactuals/images", "images")
COCO_CF_ITEMS = 17409

# Decimal ids; the length cap keeps int() within Python's digit limit (no real id comes near it).
_DECIMAL = re.compile(r"[0-9]{1,18}")


def build_pair_item(
    files: SourceFiles,
    record: Any,
    *,
    fields: Sequence[str],
    image_dir: str,
    item_id: str,
    where: str,
    image_suffix: str = "",
    subset: str = "",
    tags: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> Item:
    """One 2x2 item from a record with ``fields`` = (image 0, image 1, caption 0, caption 1) names.

    Images are ``image_dir/<value><image_suffix>``; captions are kept byte-exact and must be non-empty
    strings.
    """
    check_fields(record, fields, where=where)
    image_keys, caption_keys = fields[:2], fields[2:]
    for key in caption_keys:
        if not isinstance(record[key], str) or not record[key]:
            raise ManifestError(f"{where}: {key} must be a non-empty string, got {describe(record[key])}")
    images = []
    for key in image_keys:
        value = record[key]
        if not isinstance(value, str) or not value:
            raise ManifestError(f"{where}: {key} must be a non-empty string, got {describe(value)}")
        images.append(files.image(value + image_suffix, where=f"{where} ({key})", under=image_dir))
    return Item(
        item_id=item_id,
        images=tuple(images),
        texts=tuple(record[key] for key in caption_keys),
        subset=subset,
        tags=tuple(tags),
        meta=dict(meta or {}),
    )


def _manifest(benchmark: str, files: SourceFiles, items: list[Item], warnings: list[str]) -> Manifest:
    return Manifest(benchmark, str(files.root), tuple(items), dict(files.hashes), tuple(warnings))


def _json_array(files: SourceFiles, path: Path) -> list[Any]:
    records = files.read_json(path)
    if not isinstance(records, list):
        raise ManifestError(f"{path}: expected a JSON array of objects, got {describe(records)}")
    return records


def _winoground_examples(files: SourceFiles, path: Path) -> dict[int, dict[str, Any]]:
    """examples.jsonl -> {id: {num_main_preds, collapsed_tag}} (the reference's "original tags")."""
    out: dict[int, dict[str, Any]] = {}
    first_row: dict[int, int] = {}
    for row, record in enumerate(files.read_jsonl(path)):
        where = f"{path}: row {row}"
        check_fields(record, ("id", "num_main_preds", "collapsed_tag"), where=where)
        ex_id, preds, tag = record["id"], record["num_main_preds"], record["collapsed_tag"]
        if isinstance(ex_id, bool) or not isinstance(ex_id, int):
            raise ManifestError(f"{where}: id must be an integer, got {describe(ex_id)}")
        if isinstance(preds, bool) or not isinstance(preds, int) or preds not in (1, 2):
            raise ManifestError(f"{where}: id {ex_id}: num_main_preds must be 1 or 2, got {describe(preds)}")
        if not isinstance(tag, str) or not tag:
            raise ManifestError(
                f"{where}: id {ex_id}: collapsed_tag must be a non-empty string, got {describe(tag)}"
            )
        if ex_id in first_row:
            raise ManifestError(f"{where}: duplicate id {ex_id} (already used by row {first_row[ex_id]})")
        first_row[ex_id] = row
        out[ex_id] = {"num_main_preds": preds, "collapsed_tag": tag}
    return out


def _why_hard_tags(files: SourceFiles, path: Path) -> dict[int, tuple[str, ...]]:
    """why_winoground_hard.json -> {id: tags}; an empty list stays empty (the metric reports "No Tag")."""
    data = files.read_json(path)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object {{id: [tags]}}, got {describe(data)}")
    out: dict[int, tuple[str, ...]] = {}
    for key, tags in data.items():
        if not _DECIMAL.fullmatch(key):
            raise ManifestError(f"{path}: key {key!r} is not a decimal example id")
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise ManifestError(
                f"{path}: key {key!r}: expected a list of non-empty tag strings, got {describe(tags)}"
            )
        out[int(key)] = tuple(dict.fromkeys(tags))  # a tag listed twice still counts once
    return out


def load_winoground(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """Winoground (t2v_metrics zip layout under ``root/winoground/``): 400 2x2 items with tags.

    ``meta`` carries num_main_preds (1/2) and collapsed_tag from examples.jsonl; ``Item.tags`` are the
    why-hard tags. Every metadata id must appear in both tag files and vice versa.
    """
    files = SourceFiles(root, "winoground")
    meta_path = files.find(f"{WINOGROUND_DIR}/metadata.csv")
    examples_path = files.find(f"{WINOGROUND_DIR}/examples.jsonl")
    hard_path = files.find(f"{WINOGROUND_DIR}/why_winoground_hard.json")
    rows = files.read_csv(meta_path, min_header=WINOGROUND_COLUMNS, row_label=lambda i: f"row {i}")
    examples = _winoground_examples(files, examples_path)
    why_hard = _why_hard_tags(files, hard_path)

    items = []
    for row, record in enumerate(rows):
        where = f"{meta_path}: row {row}"
        raw_id = record["id"]
        if not _DECIMAL.fullmatch(raw_id) or int(raw_id) != row:
            raise ManifestError(f"{where}: id {raw_id!r} must equal the row position {row}")
        if row not in examples:
            raise ManifestError(f"{examples_path}: no entry for id {row} ({where})")
        if row not in why_hard:
            raise ManifestError(f"{hard_path}: no key {str(row)!r} ({where})")
        items.append(
            build_pair_item(
                files,
                record,
                fields=WINOGROUND_COLUMNS[1:],
                image_dir=WINOGROUND_DIR,
                item_id=str(row),
                where=where,
                tags=why_hard[row],
                meta=examples[row],
            )
        )
    for path, ids in ((examples_path, examples), (hard_path, why_hard)):
        extra = sorted(set(ids) - set(range(len(items))))
        if extra:
            raise ManifestError(f"{path}: id(s) {extra[:5]} have no row in {meta_path} ({len(items)} rows)")
    warnings: list[str] = []
    check_size(
        warnings, what="winoground items", actual=len(items), expected=WINOGROUND_ITEMS, strict=strict_sizes
    )
    return _manifest("winoground", files, items, warnings)


def load_eqben_mini(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """EqBen_Mini (``root/eqben_vllm/``): 2x2 items; subset = image0's first folder, Kubric parts ``eqbenk``.

    ``meta["raw_subset"]`` keeps the folder name (e.g. ``eqbenkubric_cnt``). No published size is checked
    ([U]). Some images are ``.npy`` arrays (YouCook2, BGR); they are referenced as they are.
    """
    files = SourceFiles(root, "eqben_mini")
    path = files.find(EQBEN_FILE)
    items = []
    for row, record in enumerate(_json_array(files, path)):
        where = f"{path}: row {row}"
        first = record.get("image0") if isinstance(record, dict) else None
        raw_subset = first.split("/", 1)[0] if isinstance(first, str) else None
        if raw_subset is not None and raw_subset not in EQBEN_SUBSETS:
            raise ManifestError(
                f"{where}: image0 {first!r} is not under a known EqBen subset folder "
                f"({', '.join(EQBEN_SUBSETS)})"
            )
        items.append(
            build_pair_item(
                files,
                record,
                fields=EQBEN_FIELDS,
                image_dir=EQBEN_IMAGES,
                item_id=str(row),
                where=where,
                subset=EQBEN_SUBSETS.get(raw_subset or "", ""),
                meta={"raw_subset": raw_subset},
            )
        )
    return _manifest("eqben_mini", files, items, [])


def load_naturalbench(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """NaturalBench-Retrieval (``root/NaturalBench-Retrieval/``): 2x2 items; ``index`` == position.

    No published size is checked ([U]).
    """
    files = SourceFiles(root, "naturalbench")
    path = files.find(NATURALBENCH_FILE)
    items = []
    for row, record in enumerate(_json_array(files, path)):
        where = f"{path}: row {row}"
        check_fields(record, ("index", *PAIR_FIELDS), where=where)
        index = record["index"]
        if isinstance(index, bool) or not isinstance(index, int) or index != row:
            raise ManifestError(f"{where}: index {index!r} must equal the row position {row}")
        items.append(
            build_pair_item(
                files,
                record,
                fields=PAIR_FIELDS,
                image_dir=NATURALBENCH_IMAGES,
                item_id=str(row),
                where=where,
            )
        )
    return _manifest("naturalbench", files, items, [])


def load_coco_cf(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """COCO-Counterfactuals (``root/cococounterfactuals.jsonl``): 17,409 2x2 items; images ``<stem>.jpg``."""
    files = SourceFiles(root, "coco_cf")
    path = files.find(COCO_CF_FILE)
    image_dir = files.rel(files.find_dir(*COCO_CF_IMAGE_DIRS))
    items = [
        build_pair_item(
            files,
            record,
            fields=PAIR_FIELDS,
            image_dir=image_dir,
            image_suffix=".jpg",
            item_id=str(row),
            where=f"{path}: row {row}",
        )
        for row, record in enumerate(files.read_jsonl(path))
    ]
    warnings: list[str] = []
    check_size(warnings, what="coco_cf items", actual=len(items), expected=COCO_CF_ITEMS, strict=strict_sizes)
    return _manifest("coco_cf", files, items, warnings)
