"""SugarCrepe adapter: 7 hard-negative subsets over COCO val2017, one 1x2 item per entry (positive first).

Dataset root = a folder holding the seven annotation files and COCO ``val2017/``:

- annotations: ``sugar_crepe/<subset>.json`` (the reference's ``datasets/sugar_crepe/``) or
  ``data/<subset>.json`` (a checkout of RAIVNLab/sugar-crepe); the first of these folders that exists is used
  and must hold all seven;
- each file is a JSON object ``{idx: {"filename", "caption", "negative_caption"}}``;
- images: ``val2017/<filename>`` (COCO 2017 validation images, the same folder the What'sUp COCO-QA adapter
  uses).

Subsets, in the reference's order, with published sizes: add_obj 2,062, add_att 692, replace_obj 1,652,
replace_att 788, replace_rel 1,406, swap_obj 246, swap_att 666 (7,512 in all); each is checked with
``check_size``. Item ids are ``{subset}/{idx}``; texts are [caption, negative_caption], byte-exact.
"""

from __future__ import annotations

from pathlib import Path

from perceive_ray.data.manifest import Item, Manifest, ManifestError, check_size
from perceive_ray.data.sources import SourceFiles, describe

SUBSET_SIZES = {
    "add_obj": 2062,
    "add_att": 692,
    "replace_obj": 1652,
    "replace_att": 788,
    "replace_rel": 1406,
    "swap_obj": 246,
    "swap_att": 666,
}
SUBSETS = tuple(SUBSET_SIZES)
ANNOTATION_DIRS = ("sugar_crepe", "data")
IMAGE_DIR = "val2017"
FIELDS = ("filename", "caption", "negative_caption")


def load_sugarcrepe(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """SugarCrepe: 7,512 items in 7 subsets; texts [caption, negative_caption] over ``val2017/<filename>``."""
    files = SourceFiles(root, "sugarcrepe")
    annotation_dir = next((d for d in ANNOTATION_DIRS if (files.root / d).is_dir()), None)
    if annotation_dir is None:
        raise ManifestError(
            f"sugarcrepe: annotation folder not found under {files.root}: expected one of "
            f"{', '.join(repr(d) for d in ANNOTATION_DIRS)} holding {', '.join(s + '.json' for s in SUBSETS)}"
        )
    items: list[Item] = []
    warnings: list[str] = []
    for subset in SUBSETS:
        path = files.find(f"{annotation_dir}/{subset}.json")
        data = files.read_json(path)
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object {{idx: entry}}, got {describe(data)}")
        for idx, entry in data.items():
            where = f"{path}: key {idx!r}"
            if not isinstance(entry, dict):
                raise ManifestError(f"{where}: expected an object with {', '.join(FIELDS)}, got {describe(entry)}")
            missing = [name for name in FIELDS if name not in entry]
            if missing:
                raise ManifestError(
                    f"{where}: expected an object with {', '.join(FIELDS)}; missing field(s) {', '.join(missing)} "
                    f"(the object has {', '.join(repr(k) for k in list(entry)[:12]) or 'no keys'})"
                )
            for name in FIELDS:
                if not isinstance(entry[name], str) or not entry[name]:
                    raise ManifestError(f"{where}: {name} must be a non-empty string, got {describe(entry[name])}")
            image = files.image(entry["filename"], where=where, under=IMAGE_DIR)
            items.append(
                Item(
                    item_id=f"{subset}/{idx}",
                    images=(image,),
                    texts=(entry["caption"], entry["negative_caption"]),
                    subset=subset,
                    meta={"filename": entry["filename"]},
                )
            )
        check_size(
            warnings,
            what=f"sugarcrepe {subset} items",
            actual=len(data),
            expected=SUBSET_SIZES[subset],
            strict=strict_sizes,
        )
    return Manifest("sugarcrepe", str(files.root), tuple(items), dict(files.hashes), tuple(warnings))
