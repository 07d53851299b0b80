"""What'sUp adapters (amitakamath/whatsup_vlms layout): Controlled A/B and the COCO-QA / VG-QA spatial subsets.

Dataset root = the folder that holds the annotation JSON files and the image folders (the reference's ``data/``):
``controlled_images_dataset.json`` + ``controlled_images/``, ``controlled_clevr_dataset.json`` + ``controlled_clevr/``,
``coco_qa_{one,two}_obj.json`` + ``val2017/``, ``vg_qa_{one,two}_obj.json`` + ``vg_images/``. Layout and sizes follow
PROTOCOLS §1.1-1.2.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from perceive_ray.data.manifest import Item, Manifest, ManifestError, check_size
from perceive_ray.data.sources import SourceFiles, check_fields, describe

# Whitespace tokens that name a relation in Controlled captions (the reference's detection rule).
CONTROLLED_WORDS = frozenset({"on", "under", "front", "behind", "left", "right"})
OPPOSITE = {"on": "under", "under": "on", "front": "behind", "behind": "front", "left": "right", "right": "left"}
# Relation word -> metric group.
CONTROLLED_GROUP = {"left": "lr", "right": "lr", "on": "ou", "under": "ou", "front": "fb", "behind": "fb"}

# Positions of a COCO-QA / VG-QA record, named in error messages.
QA_FIELDS = ("image_id", "true_caption", "false_caption")

QA_WORDS = {
    "left": "lr",
    "right": "lr",
    "top": "tb",
    "bottom": "tb",
    "above": "ab",
    "below": "ab",
    "front": "fb",
    "behind": "fb",
}


@dataclass(frozen=True)
class ControlledSpec:
    benchmark: str
    subset: str
    annotation: str
    image_dir: str
    relation_keys: tuple[str, ...]
    images: int
    pairs: int


CONTROLLED_A = ControlledSpec(
    "whatsup_controlled_a", "controlled_a", "controlled_images_dataset.json", "controlled_images",
    ("on", "under", "left", "right"), 412, 103,
)
CONTROLLED_B = ControlledSpec(
    "whatsup_controlled_b", "controlled_b", "controlled_clevr_dataset.json", "controlled_clevr",
    ("in-front", "behind", "left", "right"), 408, 102,
)


@dataclass(frozen=True)
class QASpec:
    benchmark: str
    subset: str
    annotation: str
    image_pattern: str  # format string over the integer image id
    items: int
    groups: dict[str, int]  # published group sizes (PROTOCOLS §1.2)


COCO_ONE = QASpec("whatsup_coco_one", "coco_one", "coco_qa_one_obj.json", "val2017/{:012d}.jpg", 2247,
                  {"lr": 1140, "tb": 1107})
COCO_TWO = QASpec("whatsup_coco_two", "coco_two", "coco_qa_two_obj.json", "val2017/{:012d}.jpg", 440,
                  {"lr": 279, "ab": 161})
VG_ONE = QASpec("whatsup_vg_one", "vg_one", "vg_qa_one_obj.json", "vg_images/{}.jpg", 1160,
                {"lr": 768, "tb": 390, "fb": 2})
VG_TWO = QASpec("whatsup_vg_two", "vg_two", "vg_qa_two_obj.json", "vg_images/{}.jpg", 291,
                {"lr": 264, "tb": 3, "fb": 24})


def parse_controlled_name(name: str, relation_keys: tuple[str, ...], *, where: str) -> tuple[str, str, str]:
    """``mug_left_of_plate.jpeg`` -> (obj1, relation key, obj2); middle tokens such as ``of`` are ignored."""
    stem = name[: -len(".jpeg")] if name.endswith(".jpeg") else None
    if stem is None:
        raise ManifestError(f"{where}: image name {name!r} does not end in '.jpeg'")
    tokens = stem.split("_")
    if len(tokens) < 3 or not tokens[0] or not tokens[-1]:
        raise ManifestError(f"{where}: image name {name!r} does not follow <obj1>_<relation>[_of]_<obj2>.jpeg")
    if tokens[1] not in relation_keys:
        raise ManifestError(
            f"{where}: relation key {tokens[1]!r} in {name!r} is not one of {', '.join(relation_keys)}"
        )
    return tokens[0], tokens[1], tokens[-1]


def compute_two_way(captions: list[str], gold: str, *, where: str) -> tuple[int, int]:
    """Indices [true, opposite] of the 2-way protocol (PROTOCOLS §2.1 steps 1-3), asserted."""
    found = set(captions[0].split()) & CONTROLLED_WORDS
    if found != {gold}:
        raise ManifestError(
            f"{where}: true caption {captions[0]!r} (caption_options[0]) must contain exactly the relation word "
            f"{gold!r}; found {sorted(found) or 'none'}"
        )
    wanted = {gold, OPPOSITE[gold]}
    kept = [i for i, caption in enumerate(captions) if wanted & set(caption.split())]
    if len(kept) != 2 or kept[0] != 0:
        raise ManifestError(
            f"{where}: expected exactly 2 caption_options with {gold!r}/{OPPOSITE[gold]!r}, the first being "
            f"index 0; kept indices {kept}"
        )
    return kept[0], kept[1]


def _load_controlled(root: str | Path, spec: ControlledSpec, strict_sizes: bool) -> Manifest:
    files = SourceFiles(root, spec.benchmark)
    path = files.find(spec.annotation)
    records = files.read_json(path)
    if not isinstance(records, list):
        raise ManifestError(
            f"{path}: expected a JSON array of {{image_path, caption_options}} objects, got {describe(records)}"
        )
    items: list[Item] = []
    relations_by_key: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    for row, record in enumerate(records):
        where = f"{path}: row {row}"
        check_fields(record, ("image_path", "caption_options"), where=where)
        raw_path, captions = record["image_path"], record["caption_options"]
        if not isinstance(captions, list) or len(captions) != 4:
            raise ManifestError(f"{where}: 'caption_options' must be a list of 4 strings, got {describe(captions)}")
        for k, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise ManifestError(
                    f"{where}: 'caption_options' must be a list of 4 strings; element {k} is {describe(caption)}"
                )
        if not isinstance(raw_path, str):
            raise ManifestError(f"{where}: 'image_path' must be a string, got {describe(raw_path)}")
        parts = PurePosixPath(raw_path).parts
        # The reference paths start with data/: drop it and join the rest to the root.
        rel = PurePosixPath(*parts[1:]).as_posix() if parts and parts[0] == "data" and len(parts) > 1 else raw_path
        if PurePosixPath(rel).parent.as_posix() != spec.image_dir:
            raise ManifestError(f"{where}: image_path {raw_path!r} is not under {spec.image_dir}/")
        image = files.image(rel, where=where)
        name = PurePosixPath(rel).name
        obj1, relation, obj2 = parse_controlled_name(name, spec.relation_keys, where=where)
        gold = "front" if relation == "in-front" else relation
        two_way = compute_two_way(captions, gold, where=where)
        pair_key = f"{obj1}/{obj2}"
        if relation in relations_by_key[pair_key]:
            first_name, first_row = relations_by_key[pair_key][relation]
            raise ManifestError(
                f"{where}: object pair {pair_key!r} has relation {relation!r} twice "
                f"({first_name} and {name}); image_path {raw_path!r} duplicates the relation of row {first_row}"
            )
        relations_by_key[pair_key][relation] = (name, row)
        items.append(
            Item(
                item_id=name[: -len(".jpeg")],
                images=(image,),
                texts=tuple(captions),
                subset=spec.subset,
                group=CONTROLLED_GROUP[gold],
                pair_key=pair_key,
                two_way=two_way,
                meta={"obj1": obj1, "obj2": obj2, "relation": relation, "gold_word": gold, "image_path": raw_path},
            )
        )
    for pair_key, relations in relations_by_key.items():
        missing = [r for r in spec.relation_keys if r not in relations]
        if missing:
            raise ManifestError(
                f"{path}: object pair {pair_key!r} lacks image(s) for relation(s) {', '.join(missing)}; "
                f"a set needs all of {', '.join(spec.relation_keys)} "
                f"(has {', '.join(sorted(name for name, _ in relations.values()))})"
            )
    warnings: list[str] = []
    check_size(warnings, what=f"{spec.benchmark} images", actual=len(items), expected=spec.images, strict=strict_sizes)
    check_size(warnings, what=f"{spec.benchmark} object pairs", actual=len(relations_by_key), expected=spec.pairs,
               strict=strict_sizes)
    try:
        return Manifest(spec.benchmark, str(files.root), tuple(items), files.hashes, tuple(warnings))
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc


def _load_qa(root: str | Path, spec: QASpec, strict_sizes: bool) -> Manifest:
    files = SourceFiles(root, spec.benchmark)
    path = files.find(spec.annotation)
    records = files.read_json(path)
    if not isinstance(records, list):
        raise ManifestError(
            f"{path}: expected a JSON array of [image_id, true_caption, false_caption], got {describe(records)}"
        )
    items = []
    group_sizes: dict[str, int] = defaultdict(int)
    for row, record in enumerate(records):
        where = f"{path}: row {row}"
        _check_qa_record(record, where=where)
        image_id, true_caption, false_caption = record
        found = [w for w in true_caption.split() if w in QA_WORDS]
        if len(set(found)) != 1:
            raise ManifestError(
                f"{where}: true caption {true_caption!r} must contain exactly one of "
                f"{', '.join(sorted(QA_WORDS))}; found {sorted(set(found)) or 'none'}"
            )
        group = QA_WORDS[found[0]]
        group_sizes[group] += 1
        items.append(
            Item(
                item_id=str(row),
                images=(files.image(spec.image_pattern.format(image_id), where=where),),
                texts=(true_caption, false_caption),
                subset=spec.subset,
                group=group,
                meta={"image_id": image_id, "gold_word": found[0]},
            )
        )
    warnings: list[str] = []
    check_size(warnings, what=f"{spec.benchmark} items", actual=len(items), expected=spec.items, strict=strict_sizes)
    if len(items) == spec.items:  # group sizes are only meaningful for the full file
        for group in sorted(set(spec.groups) | set(group_sizes)):
            check_size(warnings, what=f"{spec.benchmark} group {group}", actual=group_sizes.get(group, 0),
                       expected=spec.groups.get(group, 0), strict=strict_sizes)
    return Manifest(spec.benchmark, str(files.root), tuple(items), files.hashes, tuple(warnings))


def _check_qa_record(record: object, *, where: str) -> None:
    """``[image_id:int, true_caption:str, false_caption:str]``; the message names the offending element."""
    expected = "expected [image_id:int, true_caption:str, false_caption:str]"
    if not isinstance(record, list):
        raise ManifestError(f"{where}: {expected}, got {describe(record)}")
    if len(record) != 3:
        absent = f"; no {', '.join(QA_FIELDS[len(record):])}" if len(record) < 3 else ""
        raise ManifestError(f"{where}: {expected}, got {len(record)} element(s){absent}: {describe(record)}")
    image_id = record[0]
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise ManifestError(f"{where}: {expected}; image_id (element 0) is {describe(image_id)}")
    for k in (1, 2):
        if not isinstance(record[k], str):
            raise ManifestError(f"{where}: {expected}; {QA_FIELDS[k]} (element {k}) is {describe(record[k])}")


def load_controlled_a(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """What'sUp Controlled_Images_A: 412 images, 103 object pairs, relations on/under/left/right."""
    return _load_controlled(root, CONTROLLED_A, strict_sizes)


def load_controlled_b(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """What'sUp Controlled_Images_B: 408 images, 102 object pairs, relations in-front/behind/left/right."""
    return _load_controlled(root, CONTROLLED_B, strict_sizes)


def load_coco_one(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """What'sUp COCO-QA one-object: 2,247 items over COCO val2017."""
    return _load_qa(root, COCO_ONE, strict_sizes)


def load_coco_two(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """What'sUp COCO-QA two-object: 440 items over COCO val2017."""
    return _load_qa(root, COCO_TWO, strict_sizes)


def load_vg_one(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """What'sUp VG-QA one-object (the paper's GQA-spatial): 1,160 items over Visual Genome."""
    return _load_qa(root, VG_ONE, strict_sizes)


def load_vg_two(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """What'sUp VG-QA two-object: 291 items over Visual Genome."""
    return _load_qa(root, VG_TWO, strict_sizes)
