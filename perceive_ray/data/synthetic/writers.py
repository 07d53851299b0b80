"""Writers of the synthetic benchmark in the real layouts: What'sUp Controlled A/B, MMVP-VLM, LLaVA-1.5 JSON.

The other families (What'sUp COCO/VG-QA and MMVP in ``writers_qa``, the t2v_metrics folder in ``writers_t2v``)
are first planned (``Plan``: image specs + annotation payloads) and then written by ``write_plan``.

Everything written goes through ``TreeWriter``, which fixes the byte encoding (sorted-key JSON with 2-space
indent, RFC-4180 CSV, baseline JPEG without metadata) and records a sha256 per file: one seed, one tree.
No timestamps and no absolute paths are written anywhere.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from perceive_ray.data.synthetic.render import encode_jpeg, encode_png, render_scene, render_spec
from perceive_ray.data.synthetic.scenes import (
    KIND_RELATIONS,
    OPPOSITE,
    RELATION_PHRASES,
    VLM_TYPES,
    build_random_scene,
    build_vlm_pair,
    build_whatsup_sets,
    caption_options,
    make_rng,
    phrase_for,
    with_article,
)

# What'sUp Controlled (PROTOCOLS §1.1): subset -> (annotation file, image folder). Paths in the JSON start
# with "data/", which the adapters drop before joining to the root, exactly as for the real files.
WHATSUP_FILES = {
    "A": ("controlled_images_dataset.json", "controlled_images"),
    "B": ("controlled_clevr_dataset.json", "controlled_clevr"),
}
MMVP_VLM_HEADER = ("Question ID", "Type", "Statement")
MMVP_VLM_LLAVA_HEADER = ("lndex", "Question", "Options", "Correct Answer")  # the upstream typo, kept
MMVP_VLM_IMAGES = "MLLM_VLM Images"  # the HF folder name, space included

# LLaVA-1.5 files: the real record schema under names that say the data are synthetic (real files:
# blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json). ``image`` is relative to LLAVA_IMAGES.
LLAVA_PRETRAIN = "synthetic_558k.json"
LLAVA_MIX = "synthetic_mix665k.json"
LLAVA_IMAGES = "images"
_BRIEF_PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "Write a brief description of the scene.",
    "Summarize what the image shows in a few words.",
)


def read_generator_summary(path: Path, generator: str, fields: Sequence[str]) -> dict[str, Any] | None:
    """The JSON summary ``generator`` left at ``path`` (``SYNTH.json``, ``STUDY.json``), or None if there is no file.

    ValueError naming the file where it is unreadable, written by another generator, missing one of ``fields``, or
    has a non-integer ``version``.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable {path.name}: {exc}") from exc
    if not isinstance(data, dict) or data.get("generator") != generator or any(f not in data for f in fields):
        raise ValueError(f"{path}: not a {path.name} written by {generator}")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: version must be an integer, got {version!r}")
    return data


def clear_generated(out_dir: Path, names: Sequence[str], summary_file: str, *, overwrite: bool, owner: str,
                    check_summary: Callable[[Path], Any], hint: str = "") -> None:
    """Refuse to mix trees; with ``overwrite`` remove only what a generator wrote in ``out_dir``: its top-level
    ``names`` and ``summary_file``, and only where that summary is there and ``check_summary(out_dir)`` accepts it
    (it raises ValueError otherwise). ``owner`` names the generator in the refusal; ``hint`` follows
    ``overwrite=True`` in it (a CLI flag)."""
    present = [name for name in (*names, summary_file)
               if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if not present:
        return
    if not overwrite:
        raise ValueError(f"{out_dir} already holds {', '.join(present)}; pass overwrite=True{hint} to replace them")
    if not (out_dir / summary_file).is_file():
        raise ValueError(f"{out_dir} holds {', '.join(present)} but no {summary_file}: not written by {owner}, "
                         "not removing it")
    check_summary(out_dir)
    for name in present:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class TreeWriter:
    """Writes files under ``root`` with fixed encodings; keeps each file's sha256 by POSIX relative path."""

    def __init__(self, root: Path):
        self.root = root
        self.hashes: dict[str, str] = {}

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.hashes[rel] = hashlib.sha256(data).hexdigest()

    def write_json(self, rel: str, obj: Any, *, sort_keys: bool = True) -> None:
        text = json.dumps(obj, sort_keys=sort_keys, indent=2, ensure_ascii=False) + "\n"
        self.write_bytes(rel, text.encode("utf-8"))

    def write_jsonl(self, rel: str, records: list[Any]) -> None:
        """One compact JSON object a line, keys in insertion order (what the real .jsonl files hold)."""
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        self.write_bytes(rel, "".join(lines).encode("utf-8"))

    def write_csv(self, rel: str, header: tuple[str, ...], rows: list[list[str]]) -> None:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180: CRLF, quotes doubled, minimal quoting
        writer.writerow(header)
        writer.writerows(rows)
        self.write_bytes(rel, buffer.getvalue().encode("utf-8"))

    def write_jpeg(self, rel: str, image: Image.Image) -> None:
        self.write_bytes(rel, encode_jpeg(image))

    def write_image(self, rel: str, image: Image.Image) -> None:
        """PNG for ``.png`` paths, baseline JPEG for ``.jpg``/``.jpeg``."""
        if rel.endswith(".png"):
            self.write_bytes(rel, encode_png(image))
        elif rel.endswith((".jpg", ".jpeg")):
            self.write_jpeg(rel, image)
        else:
            raise ValueError(f"no image encoding for {rel!r}")

    def tree_sha256(self) -> str:
        """One digest over every (path, sha256) written, in sorted path order."""
        digest = hashlib.sha256()
        for rel in sorted(self.hashes):
            digest.update(f"{rel}\0{self.hashes[rel]}\n".encode())
        return digest.hexdigest()


@dataclass
class Plan:
    """What one benchmark family writes under its root (paths relative to it): image specs and annotation files.

    Builders fill a Plan without touching the disk, so tests can rebuild the spec behind every image.
    ``files`` values are ``("json", obj)``, ``("json_ordered", obj)`` (keys kept in insertion order),
    ``("jsonl", records)`` or ``("csv", (header, rows))``.
    """

    images: dict[str, Any] = field(default_factory=dict)
    files: dict[str, tuple[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add_image(self, rel: str, spec: Any) -> str:
        if rel in self.images:
            raise AssertionError(f"image {rel!r} planned twice")
        self.images[rel] = spec
        return rel


def write_plan(tree: TreeWriter, prefix: str, plan: Plan) -> dict[str, int]:
    """Render and write every planned image, then every annotation file, under ``prefix``."""
    for rel, spec in plan.images.items():
        tree.write_image(f"{prefix}/{rel}", render_spec(spec))
    for rel, (fmt, payload) in plan.files.items():
        path = f"{prefix}/{rel}"
        if fmt == "json":
            tree.write_json(path, payload)
        elif fmt == "json_ordered":
            tree.write_json(path, payload, sort_keys=False)
        elif fmt == "jsonl":
            tree.write_jsonl(path, payload)
        elif fmt == "csv":
            header, rows = payload
            tree.write_csv(path, header, rows)
        else:
            raise ValueError(f"unknown file format {fmt!r} for {rel!r}")
    return dict(plan.counts)


def write_whatsup(tree: TreeWriter, prefix: str, *, seed: int, pairs: int) -> dict[str, int]:
    """Controlled A and B under ``prefix``: ``pairs`` sets of 4 images each; returns item counts."""
    counts = {}
    for kind, (annotation, folder) in WHATSUP_FILES.items():
        records = []
        for index, scenes in enumerate(build_whatsup_sets(seed, kind, pairs)):
            for scene in scenes:
                tree.write_jpeg(f"{prefix}/{folder}/{scene.filename}", render_scene(scene))
                records.append(
                    {
                        "image_path": f"data/{folder}/{scene.filename}",
                        "caption_options": caption_options(seed, scene, index),
                    }
                )
        tree.write_json(f"{prefix}/{annotation}", records)
        counts[f"whatsup_controlled_{kind.lower()}"] = len(records)
    return counts


def plan_mmvp_vlm(seed: int, pairs_per_type: int) -> Plan:
    """``Questions.csv`` + ``MLLM_VLM Images/<Type>/<Question ID>.jpg``; rows (2k-1, 2k) form pair k. Also the
    reference's converted questions ``Questions-llava.csv`` (``lndex,Question,Options,Correct Answer``, typo kept;
    pair rows share question and options, odd rows answer ``(a)``, even ``(b)``), the VLM2Vec query prompts."""
    from perceive_ray.data.synthetic.writers_qa import pair_question  # writers_qa builds on this module

    plan = Plan()
    rows: list[list[str]] = []
    llava: list[list[str]] = []
    for category in VLM_TYPES:
        for index in range(pairs_per_type):
            specs = build_vlm_pair(seed, category, index)
            question, labels = pair_question(category, specs)
            for k, spec in enumerate(specs):
                qid = len(rows) + 1
                plan.add_image(f"{MMVP_VLM_IMAGES}/{category}/{qid}.jpg", spec)
                rows.append([str(qid), category, spec.statement])
                llava.append([str(qid), question, f"(a) {labels[0]} (b) {labels[1]}", "(a)" if k == 0 else "(b)"])
    plan.files["Questions.csv"] = ("csv", (MMVP_VLM_HEADER, rows))
    plan.files["Questions-llava.csv"] = ("csv", (MMVP_VLM_LLAVA_HEADER, llava))
    plan.counts.update(mmvp_vlm_pairs=len(rows) // 2, mmvp_vlm_rows=len(rows))
    return plan


def write_mmvp_vlm(tree: TreeWriter, prefix: str, *, seed: int, pairs_per_type: int) -> dict[str, int]:
    """MMVP-VLM under ``prefix`` (see ``plan_mmvp_vlm``); returns item counts."""
    return write_plan(tree, prefix, plan_mmvp_vlm(seed, pairs_per_type))


def _sentence(name1: str, relation: str, name2: str) -> str:
    return f"The {name1} is {RELATION_PHRASES[relation]} the {name2}."


def build_pretrain_records(tree: TreeWriter, prefix: str, *, seed: int, n: int) -> list[dict[str, Any]]:
    """558K-shaped records: one human turn (``<image>`` + a brief-caption request), one gpt caption."""
    records = []
    relations = KIND_RELATIONS["A"]
    for i in range(1, n + 1):
        # Cycling the relation guarantees left/right captions (what NegCLIP's hard negatives swap).
        scene = build_random_scene(seed, relations[(i - 1) % len(relations)], "llava", "pretrain", i)
        image = f"pretrain/{i:06d}.jpg"
        tree.write_jpeg(f"{prefix}/{LLAVA_IMAGES}/{image}", render_scene(scene))
        rng = make_rng(seed, "llava", "pretrain", i, "prompt")
        prompt = rng.choice(_BRIEF_PROMPTS)
        # The real 558K puts <image> before or after the request; keep both forms.
        human = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
        obj1, obj2 = (o.name for o in scene.objects)
        caption = phrase_for(obj1, scene.relation, obj2)  # BLIP-style: lower case, no period
        records.append(
            {
                "id": f"synthetic-pretrain-{i:06d}",
                "image": image,
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
            }
        )
    return records


def build_mix_records(
    tree: TreeWriter, prefix: str, *, seed: int, n_image: int, n_text: int
) -> list[dict[str, Any]]:
    """665K-shaped records: multi-turn image conversations, plus text-only ones (no ``image`` key)."""
    records = []
    relations = KIND_RELATIONS["A"]
    for i in range(1, n_image + 1):
        scene = build_random_scene(seed, relations[(i - 1) % len(relations)], "llava", "mix", i)
        image = f"mix/{i:06d}.jpg"
        tree.write_jpeg(f"{prefix}/{LLAVA_IMAGES}/{image}", render_scene(scene))
        obj1, obj2 = (o.name for o in scene.objects)
        if scene.relation in ("left", "right"):
            leftmost = obj1 if scene.relation == "left" else obj2
            follow_q, follow_a = "Which object is on the left?", f"The {leftmost} is on the left."
        else:
            top = obj1 if scene.relation == "on" else obj2
            follow_q, follow_a = "Which object is on top?", f"The {top} is on top."
        records.append(
            {
                "id": f"synthetic-mix-{i:06d}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": f"<image>\nWhere is the {obj1} relative to the {obj2}?"},
                    {"from": "gpt", "value": _sentence(obj1, scene.relation, obj2)},
                    {"from": "human", "value": follow_q},
                    {"from": "gpt", "value": follow_a},
                ],
            }
        )
    for i in range(1, n_text + 1):
        scene = build_random_scene(seed, relations[(i - 1) % len(relations)], "llava", "text", i)
        obj1, obj2 = (o.name for o in scene.objects)
        phrase = RELATION_PHRASES[scene.relation]
        fact = f"{with_article(obj1).capitalize()} is {phrase} {with_article(obj2)}."
        question = f"{fact} Where is the {obj2} relative to the {obj1}?"
        records.append(
            {
                "id": f"synthetic-text-{i:06d}",
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": _sentence(obj2, OPPOSITE[scene.relation], obj1)},
                ],
            }
        )
    make_rng(seed, "llava", "mix-order").shuffle(records)  # text-only samples interleaved, as in the real mix
    return records


def write_llava(tree: TreeWriter, prefix: str, *, seed: int, pairs: int) -> dict[str, int]:
    """LLaVA-1.5 style split: 4 x pairs captions and image chats, max(1, pairs // 2) text-only chats."""
    pretrain = build_pretrain_records(tree, prefix, seed=seed, n=4 * pairs)
    mix = build_mix_records(tree, prefix, seed=seed, n_image=4 * pairs, n_text=max(1, pairs // 2))
    tree.write_json(f"{prefix}/{LLAVA_PRETRAIN}", pretrain)
    tree.write_json(f"{prefix}/{LLAVA_MIX}", mix)
    n_text = sum("image" not in r for r in mix)
    return {"llava_pretrain": len(pretrain), "llava_mix": len(mix), "llava_mix_text_only": n_text}
