"""The study world (perceive_ray.data.synthetic.study): web alt-text without positions, LLaVA data with relations,
held-out What'sUp sets; deterministic, read by the project's own LLaVA reader and What'sUp adapters.

Truth is recomputed here: scenes are rebuilt from the pure functions and their relations derived from the boxes
(``derive_relation``); the held-out rule is re-implemented; texts are parsed back into objects and relations.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from perceive_ray import registry
from perceive_ray.data.llava_data import (
    LlavaSource,
    load_llava_source,
    load_llava_sources,
    make_hard_negative,
)
from perceive_ray.data.scores import scores_table
from perceive_ray.data.synthetic import scenes as sc
from perceive_ray.data.synthetic import study
from perceive_ray.data.synthetic.render import encode_jpeg, render_scene
from perceive_ray.data.synthetic.study import (
    SCALES,
    STUDY_FILE,
    StudyScale,
    ensure_study,
    generate_study,
    study_roots,
    study_sources,
    training_scene,
)
from perceive_ray.data.synthetic.writers import WHATSUP_FILES
from perceive_ray.metrics.compute import compute_metrics

SEED = 7
SMALL = StudyScale(web_images=24, llava_images=16, eval_pairs=3)
FORBIDDEN = {"on", "under", "left", "right", "front", "behind", "above", "below", "top", "bottom", "beside", "near",
             "next", "over", "in"}
COLOUR = "|".join(sc.COLOURS)
SHAPE = "|".join((*sc.SHAPES_2D, *sc.SHAPES_3D))
NAME = rf"(?:{COLOUR}) (?:{SHAPE})"
PHRASE_TO_RELATION = {phrase: relation for relation, phrase in sc.RELATION_PHRASES.items()}
PHRASE = "|".join(sorted(PHRASE_TO_RELATION, key=len, reverse=True))
CAPTION_RE = re.compile(rf"^an? (?P<s>{NAME}) (?P<p>{PHRASE}) an? (?P<o>{NAME})$")
QUESTION_RES = {
    "vqascore": re.compile(rf'^Does this figure show "A (?P<s>{NAME}) (?P<p>{PHRASE}) a (?P<o>{NAME})"\? '
                           r"Please answer yes or no\.$"),
    "is_the": re.compile(rf"^Is the (?P<s>{NAME}) (?P<p>{PHRASE}) the (?P<o>{NAME})\? Answer yes or no\.$"),
    "is_there": re.compile(rf"^Is there an? (?P<s>{NAME}) (?P<p>{PHRASE}) an? (?P<o>{NAME}) in the image\? "
                           r"Please answer yes or no\.$"),
    "is_it_true": re.compile(rf"^Is it true that the (?P<s>{NAME}) is (?P<p>{PHRASE}) the (?P<o>{NAME})\? "
                             r"Please answer yes or no\.$"),
}
OPPOSITE_WORD = {"on": "under", "under": "on", "left": "right", "right": "left", "front": "behind", "behind": "front"}
WHERE_RE = re.compile(rf"^Where is the (?P<s>{NAME}) relative to the (?P<o>{NAME})\?$")
ANSWER_RE = re.compile(rf"^The (?P<s>{NAME}) is (?P<p>{PHRASE}) the (?P<o>{NAME})\.$")


def held_out(seed: int, kind: str, names: tuple[str, str]) -> bool:
    """The held-out rule, re-implemented from the spec: names are "colour shape"."""
    key = "|".join(sorted(n.replace(" ", "-") for n in names))
    return sc.make_rng(seed, "study", "holdout", kind, key).random() < 0.25


def relation_of(scene: sc.Scene, subject: str, other: str) -> str:
    """The relation of the object named ``subject`` to the one named ``other``, derived from the boxes."""
    by_name = {obj.name: obj for obj in scene.objects}
    assert set(by_name) == {subject, other}, (scene, subject, other)
    return sc.derive_relation(scene.kind, (by_name[subject], by_name[other]))


def load(path: Path):
    return json.loads(path.read_text("utf-8"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "world"
    summary = generate_study(root, seed=SEED, scale="quick")
    return root, summary


@pytest.fixture(scope="module")
def files(world):
    roots = study_roots(world[0])
    return {name: load(roots[name]) for name in ("web_json", "captions_json", "instruct_json")}


# ---------------------------------------------------------------- determinism and the summary


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    first = generate_study(tmp_path / "one", seed=SEED, scale=SMALL)
    second = generate_study(tmp_path / "two", seed=SEED, scale=SMALL)
    other = generate_study(tmp_path / "three", seed=SEED + 1, scale=SMALL)
    assert first.tree_sha256 == second.tree_sha256 != other.tree_sha256
    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert one == two
    three = tree_bytes(tmp_path / "three")
    assert one.keys() != three.keys() or any(one[k] != three[k] for k in one)
    assert str(tmp_path) not in one[STUDY_FILE].decode()  # no absolute path on disk
    on_disk = json.loads(one[STUDY_FILE])
    assert on_disk["generator"] == "perceive_ray.data.synthetic.study" and on_disk["version"] == study.STUDY_VERSION
    assert on_disk["seed"] == SEED and on_disk["scale"] == "custom-24-16-3"
    assert on_disk["tree_sha256"] == first.tree_sha256
    assert on_disk["held_out_pairs"] == first.held_out_pairs and set(on_disk["held_out_pairs"]) == {"A", "B"}


def test_summary_counts(world):
    root, summary = world
    quick = SCALES["quick"]
    assert summary.scale == "quick" and summary.seed == SEED and not summary.reused
    counts = summary.counts
    assert counts["web_558k"] == quick.web_images
    assert counts["captions_558k"] == counts["instruct_665k"] == quick.llava_images
    assert counts["whatsup_controlled_a"] == counts["whatsup_controlled_b"] == 4 * quick.eval_pairs
    assert counts["images"] == quick.web_images + quick.llava_images + 8 * quick.eval_pairs
    assert counts["images"] == sum(1 for p in root.rglob("*") if p.suffix in (".jpg", ".jpeg"))
    assert summary.path("whatsup_root") == (root / "whatsup").absolute()


# ---------------------------------------------------------------- web alt-text


def test_web_captions_never_state_a_position_and_name_both_objects(world, files):
    root = study_roots(world[0])["web_image_root"]
    first_is_obj1 = first_is_leftmost = lr = 0
    templates = Counter()
    for i, record in enumerate(files["web_json"]):
        assert set(record) == {"id", "image", "conversations"} and record["image"] == f"web/{i:06d}.jpg"
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
        caption = gpt["value"]
        tokens = caption.lower().split()
        assert not set(tokens) & FORBIDDEN, caption
        assert not {t.strip(".,:;!?") for t in tokens} & FORBIDDEN, caption
        scene = training_scene(SEED, "web", i)
        named = re.findall(NAME, caption)
        assert sorted(named) == sorted(o.name for o in scene.objects), (caption, scene)
        first_is_obj1 += named[0] == scene.objects[0].name
        if scene.relation in ("left", "right"):
            lr += 1
            leftmost = scene.objects[0 if scene.relation == "left" else 1].name
            first_is_leftmost += named[0] == leftmost
        templates[re.sub(NAME, "X", caption)] += 1
        if i % 40 == 0:  # the rebuilt scene is what the file shows
            assert (root / record["image"]).read_bytes() == encode_jpeg(render_scene(scene))
    n = len(files["web_json"])
    assert 0.4 < first_is_obj1 / n < 0.6  # the order of the names says nothing about the layout
    assert 0.35 < first_is_leftmost / lr < 0.65
    assert len(templates) >= 8
    assert any(t.startswith(("two ", "2 ")) for t in templates)  # sometimes a count


def test_orange_is_allowed_but_in_and_on_are_not():
    assert study.check_alt_text("an orange circle and a red square")
    for bad in ("a red circle on a blue square", "a red circle in a blue square", "two shapes: left red, blue"):
        with pytest.raises(AssertionError):
            study.check_alt_text(bad)


# ---------------------------------------------------------------- LLaVA captions and instructions


def test_llava_captions_state_the_derived_relation(world, files):
    root = study_roots(world[0])["llava_image_root"]
    seen = set()
    for i, record in enumerate(files["captions_json"]):
        assert set(record) == {"id", "image", "conversations"} and record["image"] == f"llava/{i:06d}.jpg"
        caption = record["conversations"][1]["value"]
        match = CAPTION_RE.match(caption)
        assert match, caption
        assert len(re.findall(rf"\b(?:{PHRASE})\b", caption)) == 1, caption
        scene = training_scene(SEED, "llava", i)
        assert (match["s"], match["o"]) == tuple(o.name for o in scene.objects)
        relation = PHRASE_TO_RELATION[match["p"]]
        assert relation == sc.derive_relation(scene.kind, scene.objects)
        seen.add((scene.kind, relation))
        if relation in ("left", "right"):
            negative = make_hard_negative(caption)
            assert negative and negative != caption and CAPTION_RE.match(negative)
        if i % 40 == 0:
            assert (root / record["image"]).read_bytes() == encode_jpeg(render_scene(scene))
    assert seen == {(kind, r) for kind in "AB" for r in sc.KIND_RELATIONS[kind]}
    assert {("A", "left"), ("A", "right"), ("B", "left"), ("B", "right")} <= seen


def test_instruct_answers_follow_the_geometry(files):
    captions, instruct = files["captions_json"], files["instruct_json"]
    assert [r["image"] for r in instruct] == [r["image"] for r in captions]
    answers, templates, swapped = Counter(), Counter(), 0
    for i, record in enumerate(instruct):
        assert set(record) == {"id", "image", "conversations"} and record["id"] == f"study-instruct-{i:06d}"
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        scene = training_scene(SEED, "llava", i)
        asked_rounds = set()
        for human, gpt in zip(turns[0:4:2], turns[1:4:2], strict=True):
            question = human["value"].removeprefix("<image>\n")
            found = [(name, m) for name, pattern in QUESTION_RES.items() if (m := pattern.match(question))]
            assert len(found) == 1, question
            template, match = found[0]
            asked = PHRASE_TO_RELATION[match["p"]]
            true = relation_of(scene, match["s"], match["o"])
            assert gpt["value"] == ("Yes" if asked == true else "No"), (question, scene)
            if gpt["value"] == "No":
                assert asked == sc.OPPOSITE[true]
            if template == "vqascore":
                assert question == f'Does this figure show "{sc.caption_for(match["s"], asked, match["o"])}"? ' \
                                   "Please answer yes or no."
            asked_rounds.add((match["s"], gpt["value"]))
            answers[gpt["value"]] += 1
            templates[template] += 1
            swapped += match["s"] == scene.objects[1].name
        # one object order, asked once with the true relation and once with the opposite
        assert {a for _, a in asked_rounds} == {"Yes", "No"} and len({s for s, _ in asked_rounds}) == 1
        where, answer = WHERE_RE.match(turns[4]["value"]), ANSWER_RE.match(turns[5]["value"])
        assert where and answer and (where["s"], where["o"]) == (answer["s"], answer["o"])
        assert PHRASE_TO_RELATION[answer["p"]] == relation_of(scene, where["s"], where["o"])
    n = 2 * len(instruct)
    assert set(templates) == set(QUESTION_RES) and answers["Yes"] == answers["No"] == n // 2
    assert 0.35 < swapped / n < 0.65


def test_the_project_llava_reader_accepts_the_files(world):
    roots = study_roots(world[0])
    web = load_llava_source(roots["web_json"], roots["web_image_root"], source_name="web", fmt="pretrain")
    caps = load_llava_source(roots["captions_json"], roots["llava_image_root"], source_name="cap", fmt="pretrain")
    mix = load_llava_source(roots["instruct_json"], roots["llava_image_root"], source_name="ins", fmt="mix")
    quick = SCALES["quick"]
    assert len(web) == quick.web_images and len(caps) == len(mix) == quick.llava_images
    assert all(s.image and os.path.isfile(s.image) for s in (*web, *caps, *mix))
    assert [s.image for s in caps] == [s.image for s in mix]
    assert all(len(s.human_turns) == len(s.gpt_turns) == 3 for s in mix)
    loaded = load_llava_sources([LlavaSource(**entry) for entry in study_sources(world[0]).values()])
    assert loaded.counts == {
        "study_web": {"rows": quick.web_images, "kept": quick.web_images, "text_only_dropped": 0},
        "study_captions": {"rows": quick.llava_images, "kept": quick.llava_images, "text_only_dropped": 0},
        "study_instruct": {"rows": quick.llava_images, "kept": quick.llava_images, "text_only_dropped": 0},
    }


# ---------------------------------------------------------------- held-out What'sUp


def test_training_images_never_show_a_held_out_pair_and_whatsup_only_does(world, files):
    root = study_roots(world[0])["whatsup_root"]
    train = set()
    for split, records in (("web", files["web_json"]), ("llava", files["captions_json"])):
        for i in range(len(records)):
            scene = training_scene(SEED, split, i)
            names = tuple(o.name for o in scene.objects)
            a, b = scene.objects
            assert a.colour != b.colour and a.shape != b.shape
            assert not held_out(SEED, scene.kind, names), (split, i, names)
            train.add((scene.kind, frozenset(names)))
    evaluated = set()
    for kind, (annotation, folder) in WHATSUP_FILES.items():
        for record in load(root / annotation):
            assert set(record) == {"image_path", "caption_options"}
            name = record["image_path"].removeprefix(f"data/{folder}/")
            tokens = name.removesuffix(".jpeg").split("_")
            names = (tokens[0].replace("-", " "), tokens[-1].replace("-", " "))
            assert held_out(SEED, kind, names), name
            evaluated.add((kind, frozenset(names)))
    assert evaluated and not evaluated & train
    assert {k for k, _ in evaluated} == {"A", "B"}


@pytest.mark.parametrize("name,kind", [("whatsup_controlled_a", "A"), ("whatsup_controlled_b", "B")])
def test_whatsup_adapters_read_the_held_out_sets(world, name, kind):
    root, summary = world
    manifest = registry.resolve("benchmarks", name)(root / "whatsup")
    quick = SCALES["quick"]
    assert manifest.benchmark == name and len(manifest) == 4 * quick.eval_pairs
    assert len({item.pair_key for item in manifest.items}) == quick.eval_pairs
    scenes = {s.filename: s for scenes in study.eval_sets(SEED, kind, quick.eval_pairs) for s in scenes}
    ids, images, texts, scores = [], [], [], []
    for item in manifest.items:
        scene = scenes[f"{item.item_id}.jpeg"]
        assert item.meta["relation"] == scene.relation == sc.derive_relation(kind, scene.objects)
        gold = item.meta["gold_word"]
        true, opposite = item.two_way  # PROTOCOLS §2.1: the true caption and the one with the opposite word
        assert true == 0 and item.texts[0] == scene.caption
        assert set(item.texts[opposite].split()) & sc.RELATION_WORDS == {OPPOSITE_WORD[gold]}
        for t in range(len(item.texts)):
            ids.append(item.item_id)
            images.append(0)
            texts.append(t)
            scores.append(1.0 if t == 0 else 0.0)
    report = compute_metrics(manifest, scores_table(ids, images, texts, scores))
    assert report.metrics and all(v == 1.0 for v in report.metrics.values())


# ---------------------------------------------------------------- ensure_study and arguments


def test_ensure_study_reuses_regenerates_ours_and_refuses_foreign(tmp_path):
    out = tmp_path / "tree"
    made = ensure_study(out, seed=SEED, scale=SMALL)
    assert not made.reused
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = ensure_study(out, seed=SEED, scale=SMALL)
    assert again.reused and again.tree_sha256 == made.tree_sha256 and again.counts == made.counts
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    with pytest.raises(ValueError, match="overwrite"):
        generate_study(out, seed=SEED, scale=SMALL)
    next(iter((out / "whatsup" / "controlled_clevr").iterdir())).unlink()  # incomplete: regenerated, same bytes
    repaired = ensure_study(out, seed=SEED, scale=SMALL)
    assert not repaired.reused and repaired.tree_sha256 == made.tree_sha256
    reseeded = ensure_study(out, seed=SEED + 1, scale=SMALL)  # another seed: ours, so replaced
    assert not reseeded.reused and reseeded.seed == SEED + 1 and reseeded.tree_sha256 != made.tree_sha256

    foreign = tmp_path / "foreign"
    (foreign / "web").mkdir(parents=True)
    (foreign / "web" / "mine.txt").write_text("not ours")
    with pytest.raises(ValueError, match="not written by"):
        ensure_study(foreign, seed=SEED, scale=SMALL)
    assert (foreign / "web" / "mine.txt").read_text() == "not ours"
    (foreign / STUDY_FILE).write_text(json.dumps({"generator": "someone else"}))
    with pytest.raises(ValueError, match="not a STUDY.json written by"):
        ensure_study(foreign, seed=SEED, scale=SMALL)
    assert (foreign / "web" / "mine.txt").is_file()


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": "1"}, "seed"),
        ({"seed": 1, "scale": "huge"}, "scale"),
        ({"seed": 1, "scale": {"web_images": 1}}, "scale"),
        ({"seed": 1, "scale": StudyScale(1, 8, 10**6)}, "eval_pairs"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(tmp_path, kwargs, word):
    for function in (generate_study, ensure_study):
        with pytest.raises(ValueError, match=word):
            function(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("web_images", 0), ("llava_images", 7), ("eval_pairs", 1.5)])
def test_bad_scale_fields(field, value):
    sizes = {"web_images": 1, "llava_images": 8, "eval_pairs": 1, field: value}
    with pytest.raises(ValueError, match=f"scale.{field}"):
        StudyScale(**sizes)
