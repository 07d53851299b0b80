"""Synthetic benchmark: determinism, real layouts, the 2-way rule, geometry vs relations, real adapters."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceive_ray import registry
from perceive_ray.data.synthetic import MAX_PAIRS, SynthSummary, generate, mmvp_vlm_pairs_per_type
from perceive_ray.data.synthetic import scenes as sc
from perceive_ray.data.synthetic.render import render_scene
from perceive_ray.data.synthetic.writers import TreeWriter, write_mmvp_vlm

SEED, PAIRS = 7, 8  # 8 pairs -> 2 MMVP-VLM pairs per category, so within-category contiguity is exercised
SUBSETS = {
    "A": ("controlled_images_dataset.json", "controlled_images", ("on", "under", "left", "right")),
    "B": ("controlled_clevr_dataset.json", "controlled_clevr", ("in-front", "behind", "left", "right")),
}
RELATION_WORDS = {"on", "under", "front", "behind", "left", "right"}
OPPOSITE_WORD = {
    "on": "under",
    "under": "on",
    "left": "right",
    "right": "left",
    "front": "behind",
    "behind": "front",
}
PHRASES = {
    "on": "on",
    "under": "under",
    "left": "to the left of",
    "right": "to the right of",
    "in-front": "in front of",
    "behind": "behind",
}
NAME_RE = re.compile(r"^([a-z]+-[a-z]+)_(on|under|left|right|in-front|behind)(_of)?_([a-z]+-[a-z]+)\.jpeg$")
VLM_TYPES = [
    "Orientation",
    "Presence",
    "State",
    "Quantity",
    "Spatial",
    "Color",
    "Structural Character",
    "Text",
    "Camera Perspective",
]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, seed=SEED, pairs=PAIRS)
    return root


def load_whatsup(out: Path, kind: str) -> list[dict]:
    annotation, _, _ = SUBSETS[kind]
    return json.loads((out / "whatsup" / annotation).read_text("utf-8"))


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_whatever_the_global_rng(out, tmp_path):
    random.seed(12345)  # global state must not leak into the output
    np.random.seed(54321)
    again = tmp_path / "again"
    summary = generate(again, seed=SEED, pairs=PAIRS)
    first, second = tree_bytes(out), tree_bytes(again)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []
    assert summary.tree_sha256 == json.loads((out / "SYNTH.json").read_text())["tree_sha256"]


def test_different_seed_differs(out, tmp_path):
    other = tmp_path / "other"
    generate(other, seed=SEED + 1, pairs=PAIRS)
    first, second = tree_bytes(out), tree_bytes(other)
    for rel in (
        "whatsup/controlled_images_dataset.json",
        "whatsup/controlled_clevr_dataset.json",
        "MMVP_VLM/Questions.csv",
        "llava/synthetic_558k.json",
        "llava/synthetic_mix665k.json",
        "SYNTH.json",
    ):
        assert first[rel] != second[rel], rel
    images = [k for k in first if k.startswith("llava/images/")]
    assert any(first[k] != second.get(k) for k in images)


def test_rng_is_keyed_by_seed_and_purpose():
    a = sc.make_rng(3, "A", 0, "sizes").random()
    assert a == sc.make_rng(3, "A", 0, "sizes").random()
    assert a != sc.make_rng(3, "A", 1, "sizes").random()
    assert a != sc.make_rng(4, "A", 0, "sizes").random()


# ---------------------------------------------------------------- What'sUp layout


@pytest.mark.parametrize("kind", ["A", "B"])
def test_whatsup_counts_filenames_and_sets(out, kind):
    annotation, folder, relations = SUBSETS[kind]
    records = load_whatsup(out, kind)
    assert len(records) == PAIRS * 4
    on_disk = sorted(p.name for p in (out / "whatsup" / folder).iterdir())
    assert len(on_disk) == PAIRS * 4
    assert sorted(r["image_path"] for r in records) == [f"data/{folder}/{n}" for n in on_disk]
    sets: dict[tuple[str, str], set[str]] = {}
    for record in records:
        assert set(record) == {"image_path", "caption_options"}
        name = record["image_path"].rsplit("/", 1)[1]
        match = NAME_RE.match(name)
        assert match, name
        obj1, relation, of, obj2 = match.groups()
        assert relation in relations
        assert (of == "_of") == (
            relation in ("left", "right", "in-front")
        )  # mug_on_plate vs mug_left_of_plate
        assert obj1 != obj2
        sets.setdefault((obj1, obj2), set()).add(relation)
        words1, words2 = obj1.replace("-", " "), obj2.replace("-", " ")
        assert record["caption_options"][0] == f"A {words1} {PHRASES[relation]} a {words2}"
        expected = {f"A {words1} {PHRASES[r]} a {words2}" for r in relations}
        assert set(record["caption_options"]) == expected and len(record["caption_options"]) == 4
    assert len(sets) == PAIRS and all(found == set(relations) for found in sets.values())


@pytest.mark.parametrize("kind", ["A", "B"])
def test_every_caption_set_satisfies_the_two_way_rule(out, kind):
    records = load_whatsup(out, kind)
    orders = set()
    for record in records:
        relation = NAME_RE.match(record["image_path"].rsplit("/", 1)[1]).group(2)
        gold = "front" if relation == "in-front" else relation
        options = record["caption_options"]
        for caption in options:  # exactly one relation word per caption, so no colour/shape name interferes
            assert len(set(caption.split()) & RELATION_WORDS) == 1, caption
        assert set(options[0].split()) & RELATION_WORDS == {gold}
        kept = [i for i, c in enumerate(options) if {gold, OPPOSITE_WORD[gold]} & set(c.split())]
        assert len(kept) == 2 and kept[0] == 0
        orders.add(tuple(sorted(set(c.split()) & RELATION_WORDS)[0] for c in options[1:]))
    assert len(orders) > 1  # the three distractors are shuffled, not in one fixed order


def test_images_decode(out):
    paths = [p for p in out.rglob("*") if p.suffix in (".jpg", ".jpeg", ".png")]
    summary = json.loads((out / "SYNTH.json").read_text())
    assert len(paths) == summary["counts"]["images"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == ("PNG" if path.suffix == ".png" else "JPEG"), path
            assert image.mode == "RGB" and image.size == (sc.CANVAS, sc.CANVAS)
            assert "exif" not in image.info
            image.load()


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("kind", ["A", "B"])
def test_geometry_agrees_with_relations(out, kind):
    sets = sc.build_whatsup_sets(SEED, kind, PAIRS)
    names = sorted(f"data/{SUBSETS[kind][1]}/{s.filename}" for group in sets for s in group)
    assert names == sorted(r["image_path"] for r in load_whatsup(out, kind))  # the specs are what was written
    for group in sets:
        for scene in group:
            a, b = scene.objects
            (ax, ay), (bx, by) = a.centre, b.centre
            if scene.relation == "left":
                assert ax < bx and a.box[2] <= b.box[0] and a.box[3] == b.box[3]
            elif scene.relation == "right":
                assert ax > bx and b.box[2] <= a.box[0] and a.box[3] == b.box[3]
            elif scene.relation == "on":  # stacked with contact: obj1's bottom edge is obj2's top edge
                assert ay < by and a.box[3] == b.box[1] and a.box[0] < b.box[2] and b.box[0] < a.box[2]
            elif scene.relation == "under":
                assert ay > by and b.box[3] == a.box[1] and a.box[0] < b.box[2] and b.box[0] < a.box[2]
            elif scene.relation == "in-front":  # lower in the frame, larger, drawn over the other
                assert a.box[3] > b.box[3] and a.area > b.area and a.z > b.z
            else:
                assert scene.relation == "behind"
                assert a.box[3] < b.box[3] and a.area < b.area and a.z < b.z
            assert sc.derive_relation(kind, scene.objects) == scene.relation


def pixel_stats(image: Image.Image, rgb) -> tuple[float, float, int]:
    """Centroid (x, y) and lowest row of the pixels with exactly this colour."""
    pixels = np.asarray(image)
    ys, xs = np.nonzero(np.all(pixels == np.array(rgb, dtype=np.uint8), axis=-1))
    assert len(xs) > 0
    return float(xs.mean()), float(ys.mean()), int(ys.max())


@pytest.mark.parametrize("kind", ["A", "B"])
def test_rendered_pixels_agree_with_relations(kind):
    for group in sc.build_whatsup_sets(SEED, kind, 4):
        for scene in group:
            a, b = scene.objects
            ax, ay, a_low = pixel_stats(render_scene(scene), sc.COLOURS[a.colour])
            bx, by, b_low = pixel_stats(render_scene(scene), sc.COLOURS[b.colour])
            expect = {
                "left": ax < bx,
                "right": ax > bx,
                "on": ay < by,
                "under": ay > by,
                "in-front": a_low > b_low,
                "behind": a_low < b_low,
            }
            assert expect[scene.relation], (scene.filename, (ax, ay, a_low), (bx, by, b_low))


def colour_count(scene: sc.Scene, colour: str, box: tuple[int, int, int, int]) -> int:
    x0, y0, x1, y1 = box
    region = np.asarray(render_scene(scene))[y0:y1, x0:x1]
    return int(np.all(region == np.array(sc.COLOURS[colour], dtype=np.uint8), axis=-1).sum())


def test_front_object_occludes_the_back_one():
    """Inside the boxes' overlap the far object shows fewer pixels than if it were drawn on top."""
    for group in sc.build_whatsup_sets(SEED, "B", 4):
        for scene in group:
            if scene.relation not in ("in-front", "behind"):
                continue
            near, far = sorted(scene.objects, key=lambda o: -o.z)
            overlap = (max(near.box[0], far.box[0]), max(near.box[1], far.box[1]))
            overlap += (min(near.box[2], far.box[2]), min(near.box[3], far.box[3]))
            assert overlap[0] < overlap[2] and overlap[1] < overlap[3]  # the boxes overlap
            swapped = dataclasses.replace(
                scene, objects=tuple(dataclasses.replace(o, z=1 - o.z) for o in scene.objects)
            )
            assert colour_count(scene, far.colour, overlap) < colour_count(swapped, far.colour, overlap), (
                scene.filename
            )


def test_derive_relation_rejects_ambiguous_geometry():
    g = sc.GROUND_A
    overlapping = (
        sc.SceneObject("red", "circle", (10, g - 20, 30, g)),
        sc.SceneObject("blue", "square", (20, g - 20, 40, g)),
    )
    with pytest.raises(ValueError, match="ambiguous"):
        sc.derive_relation("A", overlapping)
    floating = (
        sc.SceneObject("red", "circle", (10, 10, 30, 30)),
        sc.SceneObject("blue", "square", (10, 40, 30, 60)),
    )
    with pytest.raises(ValueError, match="ambiguous"):
        sc.derive_relation("A", floating)  # vertically apart but not touching: neither on nor under
    near, far = sc.BASE_B["near"], sc.BASE_B["far"]
    smaller_near = (
        sc.SceneObject("red", "cube", (20, near - 10, 30, near), z=1),
        sc.SceneObject("blue", "sphere", (22, far - 16, 38, far)),
    )
    with pytest.raises(ValueError, match="depth cues"):
        sc.derive_relation("B", smaller_near)


def test_object_names_hold_no_relation_word():
    for name in [*sc.COLOURS, *sc.SHAPES_2D, *sc.SHAPES_3D]:
        assert set(name.split()) & RELATION_WORDS == set() and "_" not in name and "-" not in name


# ---------------------------------------------------------------- MMVP-VLM


def test_mmvp_vlm_csv_and_folders(out):
    raw = (out / "MMVP_VLM" / "Questions.csv").read_bytes()
    assert raw.startswith(b"Question ID,Type,Statement\r\n")
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    header, body = rows[0], rows[1:]
    per_type = mmvp_vlm_pairs_per_type(PAIRS)
    assert header == ["Question ID", "Type", "Statement"] and per_type == 2
    assert [int(r[0]) for r in body] == list(range(1, len(body) + 1))
    assert [r[1] for r in body] == [t for t in VLM_TYPES for _ in range(2 * per_type)]
    for k in range(0, len(body), 2):
        first, second = body[k], body[k + 1]
        assert first[1] == second[1] and first[2] != second[2]
    for qid, kind, _ in body:
        assert (out / "MMVP_VLM" / "MLLM_VLM Images" / kind / f"{qid}.jpg").is_file()
    texts = [r[2] for r in body if r[1] == "Text"]
    assert all(t.count('"') == 2 for t in texts) and b'""' in raw  # RFC-4180 doubled quotes round-trip


def test_mmvp_vlm_spatial_statements_follow_geometry():
    for index in range(3):
        for spec in sc.build_vlm_pair(SEED, "Spatial", index):
            a, b = spec.scene.objects
            assert sc.derive_relation("A", spec.scene.objects) == spec.scene.relation
            assert spec.statement == sc.phrase_for(a.name, spec.scene.relation, b.name)
    counts = sc.build_vlm_pair(SEED, "Quantity", 0)
    assert sorted(int(s.variant) for s in counts)[1] - sorted(int(s.variant) for s in counts)[0] == 1
    with pytest.raises(ValueError, match="unknown MMVP-VLM category"):
        sc.build_vlm_pair(SEED, "Texts", 0)


# ---------------------------------------------------------------- LLaVA split


def test_llava_split_record_schema(out):
    pretrain = json.loads((out / "llava" / "synthetic_558k.json").read_text("utf-8"))
    mix = json.loads((out / "llava" / "synthetic_mix665k.json").read_text("utf-8"))
    assert len(pretrain) == 4 * PAIRS and len(mix) == 4 * PAIRS + PAIRS // 2
    ids = [r["id"] for r in pretrain + mix]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) for i in ids)
    for record in pretrain + mix:
        turns = record["conversations"]
        assert set(record) <= {"id", "image", "conversations"}
        assert len(turns) % 2 == 0 and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(set(t) == {"from", "value"} for t in turns)
        n_tags = sum(t["value"].count("<image>") for t in turns)
        if "image" in record:
            assert n_tags == 1 and "<image>" in turns[0]["value"]
            assert (
                not record["image"].startswith("/") and (out / "llava" / "images" / record["image"]).is_file()
            )
        else:
            assert n_tags == 0
    assert all(len(r["conversations"]) == 2 and "image" in r for r in pretrain)
    assert sum("image" not in r for r in mix) == PAIRS // 2  # text-only samples
    answers = [t["value"] for r in pretrain + mix for t in r["conversations"] if t["from"] == "gpt"]
    assert any("to the left" in a for a in answers) and any("to the right" in a for a in answers)
    assert any("on the left" in a for a in answers)  # the NegCLIP swap keys have something to swap


# ---------------------------------------------------------------- summary and arguments


def test_summary(out):
    on_disk = json.loads((out / "SYNTH.json").read_text("utf-8"))
    assert on_disk["seed"] == SEED and on_disk["pairs"] == PAIRS and on_disk["version"] >= 1
    assert "out_dir" not in on_disk and on_disk["roots"]["mmvp_vlm"] == "MMVP_VLM"
    assert on_disk["counts"]["whatsup_controlled_a"] == on_disk["counts"]["whatsup_controlled_b"] == 4 * PAIRS
    assert on_disk["counts"]["mmvp_vlm_pairs"] == 9 * mmvp_vlm_pairs_per_type(PAIRS)
    for rel, data in tree_bytes(out).items():  # no absolute path anywhere
        if not rel.endswith((".jpg", ".jpeg")):
            assert str(out).encode() not in data and str(out.parent).encode() not in data, rel


def test_summary_object(tmp_path):
    summary = generate(tmp_path / "s", seed=1, pairs=1)
    assert isinstance(summary, SynthSummary)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.seed = 2
    as_dict = summary.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict and as_dict["out_dir"] == str(tmp_path / "s")
    assert summary.root("whatsup_controlled_b") == tmp_path / "s" / "whatsup"
    assert summary.counts["mmvp_vlm_pairs"] == 9 and summary.counts["llava_mix_text_only"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": 0, "pairs": 0}, "pairs must be"),
        ({"seed": 0, "pairs": -3}, "pairs must be"),
        ({"seed": 0, "pairs": True}, "pairs must be"),
        ({"seed": 0, "pairs": 2.0}, "pairs must be"),
        ({"seed": 0, "pairs": MAX_PAIRS + 1}, "pairs must be"),
        ({"seed": -1, "pairs": 1}, "seed must be"),
        ({"seed": "3", "pairs": 1}, "seed must be"),
        ({"seed": False, "pairs": 1}, "seed must be"),
    ],
)
def test_argument_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()  # validated before anything is written


def test_out_dir_guards(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        generate(a_file, seed=0, pairs=1)
    target = tmp_path / "t"
    generate(target, seed=0, pairs=1)
    before = tree_bytes(target)
    with pytest.raises(ValueError, match="overwrite=True"):
        generate(target, seed=0, pairs=1)
    generate(target, seed=0, pairs=2, overwrite=True)
    generate(target, seed=0, pairs=1, overwrite=True)  # stale files of the 2-pair tree are gone
    assert tree_bytes(target) == before
    foreign = tmp_path / "foreign"
    (foreign / "whatsup").mkdir(parents=True)
    with pytest.raises(ValueError, match="not written by this generator"):
        generate(foreign, seed=0, pairs=1, overwrite=True)
    assert (foreign / "whatsup").is_dir()


# ---------------------------------------------------------------- the real adapters on the output


def test_real_adapters_load_the_output(out):
    for name in ("whatsup_controlled_a", "whatsup_controlled_b"):
        manifest = registry.resolve("benchmarks", name)(out / "whatsup")
        assert len(manifest) == PAIRS * 4
        assert len({item.pair_key for item in manifest.items}) == PAIRS
        assert all(item.two_way[0] == 0 and len(item.texts) == 4 for item in manifest.items)
    manifest = registry.resolve("benchmarks", "mmvp_vlm")(out / "MMVP_VLM")
    assert len(manifest) == 9 * mmvp_vlm_pairs_per_type(PAIRS)


def test_mmvp_vlm_full_size_passes_strict_sizes(tmp_path):
    tree = TreeWriter(tmp_path)
    write_mmvp_vlm(tree, "MMVP_VLM", seed=SEED, pairs_per_type=15)  # the published 9 x 15 pairs
    manifest = registry.resolve("benchmarks", "mmvp_vlm")(tmp_path / "MMVP_VLM", strict_sizes=True)
    assert len(manifest) == 135 and manifest.warnings == ()
