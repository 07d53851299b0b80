"""Synthetic benchmark, every registry benchmark: real adapters load it, oracles score 1.0, texts match pixels.

Truth is recomputed here from the decoded image files (object extents recovered by palette colour) and, for
shape words only, from the generator's scene specs; never from the manifest's gold index or the file order.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceive_ray import registry
from perceive_ray.data.synthetic import (
    GENERATOR_VERSION,
    ROOTS,
    generate,
    image_specs,
)
from perceive_ray.data.synthetic import scenes as sc
from perceive_ray.data.synthetic.render import encode_jpeg, encode_png, render_spec
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.metrics.scores import scores_table

SEED, PAIRS = 11, 2
BENCHMARKS = registry.names("benchmarks")
QA_FILES = {
    "whatsup_coco_one": ("coco_qa_one_obj.json", "val2017/{:012d}.jpg"),
    "whatsup_coco_two": ("coco_qa_two_obj.json", "val2017/{:012d}.jpg"),
    "whatsup_vg_one": ("vg_qa_one_obj.json", "vg_images/{}.jpg"),
    "whatsup_vg_two": ("vg_qa_two_obj.json", "vg_images/{}.jpg"),
}
QA_WORDS = {"left", "right", "top", "bottom", "above", "below", "front", "behind"}
OPPOSITE_WORDS = {"left": "right", "top": "bottom", "above": "below", "front": "behind"}
OPPOSITE_WORDS.update({v: k for k, v in OPPOSITE_WORDS.items()})
PAIR_BENCHMARKS = ("winoground", "eqben_mini", "naturalbench", "coco_cf")

# ---------------------------------------------------------------- reading texts and pixels

COLOUR = "|".join(sc.COLOURS)
SHAPE = "|".join((*sc.SHAPES_2D, *sc.SHAPES_3D))
RELATIONS = {
    "to the left of": "left",
    "to the right of": "right",
    "on": "on",
    "above": "on",
    "under": "under",
    "below": "under",
    "in front of": "front",
    "to the front of": "front",
    "behind": "behind",
    "to the behind of": "behind",
}
REL = "|".join(sorted(RELATIONS, key=len, reverse=True))


def _np(name: str) -> str:
    return rf"(?:an?|the) (?:(?P<{name}c>{COLOUR}) )?(?P<{name}s>{SHAPE})"


ONE_RE = re.compile(rf"^{_np('a')} on the (?P<pos>left|right|top|bottom)$")
TWO_RE = re.compile(rf"^{_np('a')} (?P<rel>{REL}) {_np('b')}(?: and {_np('x')})?$")


def parse(text: str) -> dict:
    """Every caption shape the generator writes -> noun phrases (colour or None, shape) + relation/position."""
    t = text.strip().lower().removesuffix(".")
    t = t.removeprefix("a photo of ")
    t = re.sub(r"^(the \S+ \S+) is ", r"\1 ", t)  # NaturalBench: "The red circle is to the left of the ..."
    if m := ONE_RE.match(t):
        return {"nps": [(m["ac"], m["as"])], "position": m["pos"]}
    m = TWO_RE.match(t)
    assert m, f"unparsed caption {text!r}"
    nps = [(m["ac"], m["as"]), (m["bc"], m["bs"])] + ([(m["xc"], m["xs"])] if m["xs"] else [])
    return {"nps": nps, "relation": RELATIONS[m["rel"]]}


def decode(path: Path) -> np.ndarray:
    """The image file as a map of palette-colour indices (see ``classify``)."""
    stat = path.stat()
    return _decode(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _decode(path: str, mtime_ns: int, size: int) -> np.ndarray:
    with Image.open(path) as image:
        return classify(np.asarray(image.convert("RGB")).astype(np.int32))


PALETTE = list(sc.COLOURS)


def _shade(rgb, factor):  # as render.py shades solids: < 1 towards black, > 1 towards white
    if factor <= 1.0:
        return [round(c * factor) for c in rgb]
    return [round(c + (255 - c) * (factor - 1.0)) for c in rgb]


# Every pixel is classified by its nearest reference colour. An object's colour counts in its flat tone and in
# the darker tone of a cube's side face (so a solid's extent spans its whole width); lit faces, highlights,
# wall and table are references too, so they absorb their own pixels. The floor, its seams and the contact
# shadows of the depth scenes are labelled FLOOR: a floor seen in perspective is the cue that makes front/behind
# readable, as a table seen from the side makes on/under readable.
FLOOR, NOTHING = -2, -1
FLOOR_RGB = (168, 168, 174)
_REFERENCES = [(PALETTE.index(c), _shade(v, f)) for c, v in sc.COLOURS.items() for f in (1.0, 0.7)]
_REFERENCES += [(NOTHING, _shade(v, f)) for v in sc.COLOURS.values() for f in (1.35, 1.45)]
_REFERENCES += [(NOTHING, list(rgb)) for rgb in ((236, 232, 222), (196, 170, 135), (214, 214, 220), (246, 246, 246))]
_REFERENCES += [(FLOOR, _shade(FLOOR_RGB, f)) for f in (1.0, 0.92, 0.75)]
REFERENCE_RGB = np.array([rgb for _, rgb in _REFERENCES], dtype=np.int32)
REFERENCE_LABEL = np.array([label for label, _ in _REFERENCES])
TOLERANCE = 45  # sum of |channel - reference| still read as that reference after JPEG coding
MIN_PIXELS = 10
FLOOR_PIXELS = 400  # a depth scene shows at least this much floor


def classify(pixels: np.ndarray) -> np.ndarray:
    """Per pixel: index into PALETTE of the object colour it shows, FLOOR, or NOTHING."""
    distance = np.abs(pixels[:, :, None, :] - REFERENCE_RGB[None, None]).sum(-1)
    return np.where(distance.min(-1) <= TOLERANCE, REFERENCE_LABEL[distance.argmin(-1)], NOTHING)


def extent(labels: np.ndarray, colour: str) -> tuple[int, int, int, int] | None:
    """(x_min, x_max, y_min, y_max) of the pixels read as one palette colour, None if it is absent."""
    mask = labels == PALETTE.index(colour)
    # Keep pixels with at least 3 of their 8 neighbours in the same colour: a 1-px line of JPEG blur along another
    # object's edge goes, a shape's tips and corners stay.
    padded = np.pad(mask, 1).astype(np.int32)
    h, w = mask.shape
    neighbours = sum(padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    core = mask & (neighbours - 1 >= 3)
    if core.sum() < MIN_PIXELS:
        return None
    ys, xs = np.nonzero(core)
    return int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())


def relation_in_pixels(relation: str, a, b, *, floor: bool) -> bool:
    """Strict reading of extents a, b = (x0, x1, y0, y1).

    left/right: disjoint in x and side by side (see ``beside``). Side view (no floor): on/under =
    stacked, overlapping in x with a's bottom at b's top. Floor in perspective: front/behind = base lower by more
    than 2 px (the depth scenes put the near object's base 16 px lower).
    """
    ax0, ax1, ay0, ay1 = a
    bx0, bx1, by0, by1 = b
    x_overlap = ax0 <= bx1 and bx0 <= ax1
    # side by side: on a floor both bases on one line; in a side view, overlapping rows (a star's lower tips
    # stop short of its box, so bases need not agree there)
    beside = abs(ay1 - by1) <= 4 if floor else (ay0 <= by1 and by0 <= ay1)
    return {
        "left": ax1 < bx0 and beside,
        "right": bx1 < ax0 and beside,
        "on": not floor and x_overlap and ay1 <= by0 + 1,
        "under": not floor and x_overlap and by1 <= ay0 + 1,
        "front": floor and ay1 > by1 + 2,
        "behind": floor and by1 > ay1 + 2,
    }[relation]


def holds(labels: np.ndarray, text: str, objects: list[tuple[str, str]] | None = None) -> bool:
    """Whether ``text`` is true of the image: colours, relations from pixel labels; shape words from ``objects``.

    ``objects`` = the scene's (colour, shape) list; without it every noun phrase must name its colour.
    """
    claim = parse(text)
    colours = []
    for colour, shape in claim["nps"]:
        if objects is not None:
            matches = [c for c, s in objects if s == shape and colour in (None, c)]
            if len(matches) != 1:
                return False  # no such object (wrong colour or shape), or an ambiguous phrase
            colour = matches[0]
        assert colour is not None, text
        colours.append(colour)
    boxes = [extent(labels, c) for c in colours]
    if any(b is None for b in boxes) or len(set(colours)) != len(colours):
        return False
    if "position" in claim:
        x0, x1, y0, y1 = boxes[0]
        half = sc.CANVAS / 2
        return {"left": x1 < half, "right": x0 > half, "top": y1 < half, "bottom": y0 > half}[claim["position"]]
    floor = int((labels == FLOOR).sum()) >= FLOOR_PIXELS
    return relation_in_pixels(claim["relation"], boxes[0], boxes[1], floor=floor)


# ---------------------------------------------------------------- fixtures


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_all") / "data"
    generate(root, seed=SEED, pairs=PAIRS)
    return root


@pytest.fixture(scope="module")
def specs() -> dict:
    return image_specs(SEED, PAIRS)


@pytest.fixture(scope="module")
def manifests(out) -> dict:
    return {name: registry.resolve("benchmarks", name)(out / ROOTS[name]) for name in BENCHMARKS}


def scene_objects(spec) -> list[tuple[str, str]]:
    return [(o.colour, o.shape) for o in spec.objects]


def image_truth(out: Path, specs: dict, name: str, rel: str, text: str) -> bool:
    """Truth of ``text`` for image ``rel`` (relative to the benchmark root), from pixels (+ spec shapes)."""
    path = f"{ROOTS[name]}/{rel}"
    spec = specs.get(path)
    if isinstance(spec, sc.VlmSpec):  # MMVP / MMVP-VLM: the statement its spec was drawn with
        statement = text.removeprefix("a photo of ")
        if spec.motif == "scene":  # spatial pairs: the geometry decides, as for every other scene
            return holds(decode(out / path), statement, scene_objects(spec.scene))
        return statement == spec.statement
    return holds(decode(out / path), text, scene_objects(spec) if spec is not None else None)


def oracle_table(out, specs, name, manifest, *, invert: bool = False):
    ids, images, texts, scores = [], [], [], []
    for item in manifest.items:
        for i, rel in enumerate(item.images):
            for t, text in enumerate(item.texts):
                truth = image_truth(out, specs, name, rel, text)
                ids.append(item.item_id)
                images.append(i)
                texts.append(t)
                scores.append(float(truth != invert))
    return scores_table(ids, images, texts, scores)


# ---------------------------------------------------------------- roots and adapters


def test_roots_cover_every_registry_benchmark():
    assert set(ROOTS) == set(BENCHMARKS) | {"llava"}
    assert {ROOTS[n] for n in BENCHMARKS if n.startswith("whatsup")} == {"whatsup"}
    assert ROOTS["mmvp"] == "MMVP" and ROOTS["mmvp_vlm"] == "MMVP_VLM"
    assert {ROOTS[n] for n in (*PAIR_BENCHMARKS, "sugarcrepe", "seetrue")} == {"t2v"}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_adapter_loads_the_synthetic_root(manifests, name):
    manifest = manifests[name]
    assert manifest.benchmark == name
    assert len(manifest) >= (2 if name == "mmvp" else 4)


def test_minimum_sizes_at_one_pair(tmp_path):
    out = tmp_path / "one"
    summary = generate(out, seed=SEED, pairs=1)
    for name in BENCHMARKS:
        manifest = registry.resolve("benchmarks", name)(out / ROOTS[name])
        assert len(manifest) >= (2 if name == "mmvp" else 4), name
    sugarcrepe = registry.resolve("benchmarks", "sugarcrepe")(out / "t2v")
    assert min(Counter(i.subset for i in sugarcrepe.items).values()) >= 2
    assert len({i.subset for i in sugarcrepe.items}) == 7
    seetrue = registry.resolve("benchmarks", "seetrue")(out / "t2v")
    by_source = {}
    for item in seetrue.items:
        by_source.setdefault(item.subset, set()).add(item.label)
    assert len(by_source) >= 2 and all(labels == {0, 1} for labels in by_source.values())
    assert summary.counts["mmvp_pairs"] >= 2 and summary.version == GENERATOR_VERSION


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("name", BENCHMARKS)
def test_oracle_scores_perfectly_and_its_inverse_scores_zero(out, specs, manifests, name):
    manifest = manifests[name]
    report = compute_metrics(manifest, oracle_table(out, specs, name, manifest))
    assert report.metrics, name
    assert report.counts["ties"] == 0
    assert {k: v for k, v in report.metrics.items() if v != 1.0} == {}
    if name == "seetrue":
        sources = {item.subset for item in manifest.items}
        assert {f"{s}/roc_auc" for s in sources} == set(report.metrics)
    inverse = compute_metrics(manifest, oracle_table(out, specs, name, manifest, invert=True))
    assert {k: v for k, v in inverse.metrics.items() if v != 0.0} == {}


def test_planned_images_are_rendered_from_their_specs(out, specs):
    """The specs the oracles read shapes from are exactly what produced each file's bytes."""
    assert specs and all((out / rel).is_file() for rel in specs)
    for rel, spec in specs.items():
        encode = encode_png if rel.endswith(".png") else encode_jpeg
        assert (out / rel).read_bytes() == encode(render_spec(spec)), rel


# ---------------------------------------------------------------- relations are in the pixels


@pytest.mark.parametrize("name", list(QA_FILES))
def test_qa_files_true_caption_is_in_the_pixels(out, name):
    annotation, pattern = QA_FILES[name]
    rows = json.loads((out / "whatsup" / annotation).read_text("utf-8"))
    ids = Counter(row[0] for row in rows)
    assert max(ids.values()) >= 2  # images recur, as in the real files
    gold_words = set()
    for image_id, true, false in rows:
        assert isinstance(image_id, int) and true.startswith("A photo of a ") and false.startswith("A photo of a ")
        found = [w for w in true.split() if w in QA_WORDS]
        assert len(found) == 1, true
        gold_words.add(found[0])
        labels = decode(out / "whatsup" / pattern.format(image_id))
        assert holds(labels, true) and not holds(labels, false), (image_id, true, false)
        opposite = [OPPOSITE_WORDS.get(w, w) if w == found[0] else w for w in true.split()]
        assert false.split() == opposite  # the false caption = the true one with the opposite word
    expected = {"left", "right", "top", "bottom"} if name.endswith("one") else {"left", "right"}
    assert expected <= gold_words
    if name == "whatsup_coco_two":
        assert {"above", "below"} & gold_words
    if name == "whatsup_vg_two":
        assert {"front", "behind"} & gold_words


@pytest.mark.parametrize("name", PAIR_BENCHMARKS)
def test_pair_items_contrast_in_the_pixels(out, manifests, name):
    relations = set()
    for item in manifests[name].items:
        labels = [decode(out / "t2v" / rel) for rel in item.images]
        for k in (0, 1):
            assert holds(labels[k], item.texts[k]), (item.item_id, k)
            assert not holds(labels[1 - k], item.texts[k]), (item.item_id, k)
            relations.add(parse(item.texts[k])["relation"])
        # the same two objects (same colours) in both images
        colours = [{c for c in sc.COLOURS if extent(lab, c) is not None} for lab in labels]
        assert colours[0] == colours[1] and len(colours[0]) == 2
    assert len(relations) >= 2


def test_eqben_uses_several_raw_subsets(manifests):
    raw = {item.meta["raw_subset"] for item in manifests["eqben_mini"].items}
    assert {"eqbensd", "eqbenkubric_loc"} <= raw
    assert {item.subset for item in manifests["eqben_mini"].items} == {"eqbensd", "eqbenk"}


def test_sugarcrepe_negatives_are_false_and_positives_true(out, specs, manifests):
    seen = Counter()
    for item in manifests["sugarcrepe"].items:
        spec = specs[f"t2v/{item.images[0]}"]
        labels = decode(out / "t2v" / item.images[0])
        positive, negative = item.texts
        assert holds(labels, positive, scene_objects(spec)), item.item_id
        assert not holds(labels, negative, scene_objects(spec)), item.item_id
        seen[item.subset] += 1
    assert set(seen) == {"add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att"}


def test_seetrue_labels_match_the_pixels(out, specs, manifests):
    for item in manifests["seetrue"].items:
        spec = specs[f"t2v/{item.images[0]}"]
        truth = holds(decode(out / "t2v" / item.images[0]), item.texts[0], scene_objects(spec))
        assert int(truth) == item.label, (item.item_id, item.texts[0])


# ---------------------------------------------------------------- MMVP layout


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))


def test_mmvp_files(out, specs, manifests):
    questions = read_csv(out / "MMVP" / "Questions.csv")
    statements = read_csv(out / "MMVP" / "Questions-clip.csv")
    assert questions[0] == ["Index", "Question", "Options", "Correct Answer"]
    assert statements[0] == ["Question ID", "Type", "Statement"]
    questions, statements = questions[1:], statements[1:]
    assert len(questions) == len(statements) >= 4 and len(statements) % 2 == 0
    assert [r[0] for r in statements] == [str(q) for q in range(1, len(statements) + 1)]
    assert {r[1] for r in statements} == {"Unknown"}
    for k in range(0, len(questions), 2):
        first, second = questions[k], questions[k + 1]
        assert first[1:3] == second[1:3] and {first[3], second[3]} == {"(a)", "(b)"}
        options = re.fullmatch(r"\(a\) (.+) \(b\) (.+)", first[2]).groups()
        for row, statement in ((first, statements[k]), (second, statements[k + 1])):
            spec = specs[f"MMVP/MMVP Images/{statement[0]}.jpg"]
            assert statement[2] == spec.statement  # statement q describes image q
            words = set(statement[2].replace('"', " ").split())
            chosen = options[0] if row[3] == "(a)" else options[1]
            if spec.category == "Presence":
                assert chosen == ("No" if "no" in words else "Yes")
            else:
                assert set(chosen.lower().replace('"', " ").split()) <= words, (chosen, statement)
    raw = (out / "MMVP" / "Questions.csv").read_bytes()
    if any(spec.category == "Text" for rel, spec in specs.items() if rel.startswith("MMVP/")):
        assert b'""' in raw  # the Text pairs' quoted letters are RFC-4180 quoted
    assert len({r[2] for r in statements}) == len(statements)
    vlm_statements = {r[2] for r in read_csv(out / "MMVP_VLM" / "Questions.csv")[1:]}
    assert len(vlm_statements & {r[2] for r in statements}) < len(statements)  # MMVP draws its own pairs


# ---------------------------------------------------------------- determinism


def test_same_seed_same_tree_and_different_seed_differs(out, tmp_path):
    again = generate(tmp_path / "again", seed=SEED, pairs=PAIRS)
    assert again.tree_sha256 == json.loads((out / "SYNTH.json").read_text("utf-8"))["tree_sha256"]
    assert tree_bytes(tmp_path / "again") == tree_bytes(out)
    other = generate(tmp_path / "other", seed=SEED + 1, pairs=PAIRS)
    assert other.tree_sha256 != again.tree_sha256
    first, second = tree_bytes(out), tree_bytes(tmp_path / "other")
    for rel in (
        "whatsup/coco_qa_one_obj.json",
        "whatsup/coco_qa_two_obj.json",
        "whatsup/vg_qa_one_obj.json",
        "whatsup/vg_qa_two_obj.json",
        "MMVP/Questions-clip.csv",
        "t2v/winoground/metadata.csv",
        "t2v/eqben_vllm/all_select.json",
        "t2v/NaturalBench-Retrieval/metadata.json",
        "t2v/cococounterfactuals.jsonl",
        "t2v/sugar_crepe/swap_att.json",
        "t2v/SeeTRUE.csv",
    ):
        assert first[rel] != second[rel], rel
    for rel, data in first.items():  # no absolute path anywhere
        if not rel.endswith((".jpg", ".jpeg", ".png")):
            assert str(out).encode() not in data, rel


def test_overwrite_replaces_the_new_roots_too(tmp_path):
    target = tmp_path / "t"
    generate(target, seed=0, pairs=1)
    before = tree_bytes(target)
    generate(target, seed=0, pairs=5, overwrite=True)
    assert len(tree_bytes(target)) > len(before)
    generate(target, seed=0, pairs=1, overwrite=True)  # stale files of the larger tree are gone
    assert tree_bytes(target) == before
    foreign = tmp_path / "foreign"
    (foreign / "t2v").mkdir(parents=True)
    with pytest.raises(ValueError, match="not written by this generator"):
        generate(foreign, seed=0, pairs=1, overwrite=True)
    assert (foreign / "t2v").is_dir()


# ---------------------------------------------------------------- per-unit outcomes (outcomes.parquet)
# Every metric that is a mean of 0/1 outcomes gets exactly the units it averaged; their mean, count and correct sum
# are the metric's own value and counts. Reports resample them (bootstrap intervals, paired tests).

NO_UNITS = ("roc_auc",)  # keys that are not means of per-unit 0/1 outcomes


def random_scores(manifest, seed: int):
    rng = np.random.default_rng(seed)
    ids, images, texts, scores = [], [], [], []
    for item in manifest.items:
        for i, _ in enumerate(item.images):
            for t, _ in enumerate(item.texts):
                ids.append(item.item_id)
                images.append(i)
                texts.append(t)
                scores.append(float(rng.integers(0, 3)))  # ties happen too
    return scores_table(ids, images, texts, scores)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_outcomes_reproduce_every_mean_metric(manifests, name):
    manifest = manifests[name]
    report = compute_metrics(manifest, random_scores(manifest, seed=len(name)))
    table = report.outcomes_table().to_pandas()
    assert list(table.columns) == ["metric", "unit", "correct"] and str(table["correct"].dtype) == "int8"
    for key, value in report.metrics.items():
        rows = table[table["metric"] == key]
        if key.endswith(NO_UNITS):
            assert rows.empty, key
            continue
        assert len(rows) == report.counts[f"{key}/total"], key
        assert rows["correct"].sum() == report.counts[f"{key}/correct"], key
        assert rows["correct"].mean() == pytest.approx(value), key
        assert rows["unit"].is_unique, key  # one outcome per unit: pairs by pair id, halves by text index
    assert set(table["metric"]) <= set(report.metrics)


def test_whatsup_pair_units_are_shared_by_two_configurations(manifests):
    """The same unit ids come out of two different score sets: what a paired test matches on."""
    manifest = manifests["whatsup_controlled_a"]
    first = compute_metrics(manifest, random_scores(manifest, 1)).outcomes["2way/lr/pair_acc"]
    second = compute_metrics(manifest, random_scores(manifest, 2)).outcomes["2way/lr/pair_acc"]
    assert [u for u, _ in first] == [u for u, _ in second] and len(first) == 2
