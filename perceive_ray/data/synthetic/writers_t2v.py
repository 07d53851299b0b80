"""Plan of the t2v_metrics ``datasets/`` folder: the Winoground family, SugarCrepe and SeeTRUE in one root.

Layout (relative to the root; the adapters in ``perceive_ray.data.benchmarks`` read exactly this):

    winoground/metadata.csv, examples.jsonl, why_winoground_hard.json, images/ex_{i}_img_{k}.png
    eqben_vllm/all_select.json, eqben_vllm/images/<raw subset>/{i}_{k}.png
    NaturalBench-Retrieval/metadata.json, NaturalBench-Retrieval/images/{i}_{k}.jpg
    cococounterfactuals.jsonl, COCOCounterfactuals/images/<stem>.jpg
    sugar_crepe/<subset>.json (7 files), val2017/{id:012d}.jpg
    SeeTRUE.csv, images/<image>

Every 2x2 item shows the same two objects in opposite relations; caption k describes image k only (asserted in
``build_contrast``). SugarCrepe negatives and SeeTRUE label-0 texts are false by construction (``scenes_extra``).
"""

from __future__ import annotations

from perceive_ray.data.synthetic.scenes import OPPOSITE, make_rng
from perceive_ray.data.synthetic.scenes_extra import (
    SEETRUE_SOURCES,
    SUGARCREPE_SUBSETS,
    ContrastItem,
    build_contrast,
    claim_text,
    random_scene,
    seetrue_claims,
    sugarcrepe_claims,
)
from perceive_ray.data.synthetic.writers import Plan

WINOGROUND_HEADER = ("id", "image_0", "image_1", "caption_0", "caption_1")
SEETRUE_HEADER = ("image", "text", "label", "original_dataset_id", "dataset_source")
# EqBen raw subsets written (first folder of image0): a 2-D scene subset and a 3-D location subset (-> eqbenk).
EQBEN_RAW = {"eqbensd": ("A", ("left", "on")), "eqbenkubric_loc": ("B", ("in-front", "left"))}
A_RELATIONS = ("left", "on")  # left/right and on/under contrasts, alternating
COCO_IDS = (1, 581_929)


def pair_items(pairs: int) -> int:
    """2x2 items per Winoground-family benchmark."""
    return max(4, pairs)


def sugarcrepe_images(pairs: int) -> int:
    """Entries per SugarCrepe subset (one per image; every subset uses every image, as the real files share)."""
    return max(2, pairs // 2)


def seetrue_images(pairs: int) -> int:
    """Images per SeeTRUE source; each image has one label-1 and one label-0 text."""
    return max(2, pairs // 2)


def _relation(seed: int, base: str, *purpose: object) -> str:
    """``base`` or its opposite, seeded, so both directions appear as caption 0."""
    return base if make_rng(seed, *purpose, "direction").random() < 0.5 else OPPOSITE[base]


def _contrast(seed: int, kind: str, base: str, style: str, *purpose: object) -> ContrastItem:
    return build_contrast(seed, kind, _relation(seed, base, *purpose), style, *purpose)


def _winoground(plan: Plan, seed: int, n: int) -> None:
    rows, examples, hard = [], [], {}
    for i in range(n):
        item = _contrast(seed, "A", A_RELATIONS[i % 2], "swap", "winoground", i)
        names = [f"images/ex_{i}_img_{k}.png" for k in (0, 1)]
        for name, scene in zip(names, item.scenes, strict=True):
            plan.add_image(f"winoground/{name}", scene)
        c0, c1 = item.captions
        rows.append([str(i), names[0], names[1], c0, c1])
        examples.append(
            {
                "id": i,
                "image_0": f"ex_{i}_img_0",
                "image_1": f"ex_{i}_img_1",
                "caption_0": c0,
                "caption_1": c1,
                "tag": "Noun Phrase",  # the two noun phrases trade places
                "secondary_tag": "",
                "num_main_preds": 1,
                "collapsed_tag": "Object",
            }
        )
        hard[str(i)] = []  # none of the why-hard tags applies to a plain synthetic scene ("No Tag")
    plan.files["winoground/metadata.csv"] = ("csv", (WINOGROUND_HEADER, rows))
    plan.files["winoground/examples.jsonl"] = ("jsonl", examples)
    plan.files["winoground/why_winoground_hard.json"] = ("json_ordered", hard)
    plan.counts["winoground"] = n


def _eqben(plan: Plan, seed: int, n: int) -> None:
    records = []
    raws = list(EQBEN_RAW)
    for i in range(n):
        raw = raws[i % len(raws)]
        kind, bases = EQBEN_RAW[raw]
        item = _contrast(seed, kind, bases[(i // len(raws)) % 2], "relation", "eqben_mini", i)
        names = [f"{raw}/{i:04d}_{k}.png" for k in (0, 1)]
        for name, scene in zip(names, item.scenes, strict=True):
            plan.add_image(f"eqben_vllm/images/{name}", scene)
        records.append(
            {"image0": names[0], "image1": names[1], "caption0": item.captions[0], "caption1": item.captions[1]}
        )
    plan.files["eqben_vllm/all_select.json"] = ("json", records)
    plan.counts["eqben_mini"] = n


def _naturalbench(plan: Plan, seed: int, n: int) -> None:
    records = []
    for i in range(n):
        item = _contrast(seed, "A", A_RELATIONS[i % 2], "sentence", "naturalbench", i)
        names = [f"{i}_{k}.jpg" for k in (0, 1)]
        for name, scene in zip(names, item.scenes, strict=True):
            plan.add_image(f"NaturalBench-Retrieval/images/{name}", scene)
        c0, c1 = item.captions
        records.append({"index": i, "image_0": names[0], "image_1": names[1], "caption_0": c0, "caption_1": c1})
    plan.files["NaturalBench-Retrieval/metadata.json"] = ("json", records)
    plan.counts["naturalbench"] = n


def _coco_cf(plan: Plan, seed: int, n: int) -> None:
    records = []
    for i in range(n):
        item = _contrast(seed, "A", A_RELATIONS[(i + 1) % 2], "relation", "coco_cf", i)
        stems = [f"synthetic_{i:06d}_{k}" for k in (0, 1)]
        for stem, scene in zip(stems, item.scenes, strict=True):
            plan.add_image(f"COCOCounterfactuals/images/{stem}.jpg", scene)
        c0, c1 = item.captions
        records.append({"image_0": stems[0], "image_1": stems[1], "caption_0": c0, "caption_1": c1})
    plan.files["cococounterfactuals.jsonl"] = ("jsonl", records)
    plan.counts["coco_cf"] = n


def _sugarcrepe(plan: Plan, seed: int, n: int) -> None:
    low, high = COCO_IDS
    ids = make_rng(seed, "sugarcrepe", "image-ids").sample(range(low, high + 1), n)
    subsets: dict[str, dict[str, dict[str, str]]] = {s: {} for s in SUGARCREPE_SUBSETS}
    relations = ("left", "right", "on", "under")
    for k, image_id in enumerate(ids):
        scene = random_scene(make_rng(seed, "sugarcrepe", k, "scene"), "A", relations[k % len(relations)])
        filename = f"{image_id:012d}.jpg"
        plan.add_image(f"val2017/{filename}", scene)
        for subset, (positive, negative) in sugarcrepe_claims(seed, k, scene).items():
            subsets[subset][str(k)] = {
                "filename": filename,
                "caption": claim_text(positive),
                "negative_caption": claim_text(negative),
            }
    for subset, entries in subsets.items():
        plan.files[f"sugar_crepe/{subset}.json"] = ("json_ordered", entries)  # keys "0", "1", ... in order
        plan.counts[f"sugarcrepe_{subset}"] = len(entries)
    plan.counts["sugarcrepe"] = n * len(SUGARCREPE_SUBSETS)


def _seetrue(plan: Plan, seed: int, n: int) -> None:
    rows = []
    for source in SEETRUE_SOURCES:
        for j in range(n):
            rng = make_rng(seed, "seetrue", source, j)
            # Spatial texts alternate side-view and depth scenes; attribute texts use side-view scenes.
            kind = "B" if source == "synthetic_spatial" and j % 2 else "A"
            relations = ("in-front", "behind", "left", "right") if kind == "B" else ("on", "under", "left", "right")
            scene = random_scene(rng, kind, relations[(j // 2) % len(relations)])
            image = f"{source}_{j:04d}.jpg"
            plan.add_image(f"images/{image}", scene)
            true, false = seetrue_claims(seed, source, j, scene)
            for label, claim in ((1, true), (0, false)):
                rows.append([image, claim_text(claim), str(label), f"{source}-{j}-{label}", source])
    make_rng(seed, "seetrue", "row-order").shuffle(rows)
    plan.files["SeeTRUE.csv"] = ("csv", (SEETRUE_HEADER, rows))
    plan.counts["seetrue"] = len(rows)


def plan_t2v(seed: int, pairs: int) -> Plan:
    plan = Plan()
    n = pair_items(pairs)
    _winoground(plan, seed, n)
    _eqben(plan, seed, n)
    _naturalbench(plan, seed, n)
    _coco_cf(plan, seed, n)
    _sugarcrepe(plan, seed, sugarcrepe_images(pairs))
    _seetrue(plan, seed, seetrue_images(pairs))
    return plan
