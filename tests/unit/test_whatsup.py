"""What'sUp adapters and metrics: real layouts, malformed variants, hand-computed metrics, full-size denominators."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perceive_ray.data.benchmarks import whatsup
from perceive_ray.data.manifest import Manifest, ManifestError
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.metrics.scores import ScoresError, scores_table
from tests.fixtures.whatsup_files import (
    controlled_records,
    numbered_pairs,
    qa_rows,
    write_controlled,
    write_qa,
)


def table_from(manifest: Manifest, score_fn) -> object:
    """Scores table with score_fn(item, image_index, text_index) for every cell of every item."""
    ids, imgs, txts, vals = [], [], [], []
    for item in manifest.items:
        for i in range(len(item.images)):
            for t in range(len(item.texts)):
                ids.append(item.item_id)
                imgs.append(i)
                txts.append(t)
                vals.append(score_fn(item, i, t))
    return scores_table(ids, imgs, txts, vals)


def true_wins(item, i, t):
    return 1.0 if t == 0 else 0.0


# ---------------------------------------------------------------- adapters


def test_controlled_a_real_layout(tmp_path):
    root = write_controlled(tmp_path, "a", [("mug", "plate"), ("beer-bottle", "armchair")])
    manifest = whatsup.load_controlled_a(root)
    assert manifest.benchmark == "whatsup_controlled_a"
    assert len(manifest) == 8
    item = manifest.by_id()["beer-bottle_on_armchair"]
    assert item.images == ("controlled_images/beer-bottle_on_armchair.jpeg",)
    assert item.texts[0] == "A beer bottle on a armchair"
    assert item.group == "ou" and item.pair_key == "beer-bottle/armchair"
    assert item.texts[item.two_way[1]] == "A beer bottle under a armchair"
    assert manifest.by_id()["mug_left_of_plate"].group == "lr"
    assert list(manifest.source_hashes) == ["controlled_images_dataset.json"]
    assert any("412" in w for w in manifest.warnings)  # published size differs: warning, not error


def test_controlled_b_in_front_key(tmp_path):
    root = write_controlled(tmp_path, "b", [("mug", "plate")])
    manifest = whatsup.load_controlled_b(root)
    item = manifest.by_id()["mug_in-front_of_plate"]
    assert item.group == "fb" and item.meta["gold_word"] == "front"
    assert item.texts[item.two_way[1]] == "A mug behind a plate"


def test_two_way_follows_file_order():
    captions = ["A mug to the left of a plate", "A mug on a plate", "A mug under a plate", "A mug to the right of a plate"]
    assert whatsup.compute_two_way(captions, "left", where="x") == (0, 3)
    with pytest.raises(ManifestError, match="exactly the relation word 'on'"):
        whatsup.compute_two_way(captions, "on", where="x")


def test_manifest_parquet_round_trip(tmp_path):
    manifest = whatsup.load_controlled_a(write_controlled(tmp_path / "d", "a", [("mug", "plate")]))
    path = manifest.write_parquet(tmp_path / "m.parquet")
    again = Manifest.read_parquet(path)
    assert again == manifest


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r[1].update(caption_options=r[1]["caption_options"][:3]), r"row 1: 'caption_options' must be a list of 4"),
        (lambda r: r[2].update(image_path="data/controlled_images/../../escape.jpeg"), r"row 2: .*not under controlled_images"),
        (lambda r: r[0].update(image_path="data/controlled_images/mug_beside_plate.jpeg"), r"row 0: relation key 'beside'"),
        (lambda r: r[3].update(caption_options=["A mug on a plate to the left", *r[3]["caption_options"][1:]]),
         r"row 3: true caption .* found \['left', 'on'\]"),
        (lambda r: r.pop(), r"object pair 'mug/plate' lacks image\(s\) for relation\(s\) under"),
        (lambda r: r.append(dict(r[0])), r"row 4: object pair 'mug/plate' has relation 'left' twice"),
        (lambda r: r.__setitem__(0, ["not", "an", "object"]), r"row 0: expected an object"),
    ],
)
def test_controlled_malformed(tmp_path, mutate, match):
    records = controlled_records("a", [("mug", "plate")])
    mutate(records)
    root = write_controlled(tmp_path, "a", [], records=[r for r in records if isinstance(r, dict)])
    if not all(isinstance(r, dict) for r in records):
        (root / "controlled_images_dataset.json").write_text(json.dumps(records))
    with pytest.raises(ManifestError, match=match) as info:
        whatsup.load_controlled_a(root)
    assert "controlled_images_dataset.json" in str(info.value)


def test_controlled_missing_image_and_file(tmp_path):
    root = write_controlled(tmp_path, "a", [("mug", "plate")], skip_images=("mug_on_plate.jpeg",))
    with pytest.raises(ManifestError, match=r"controlled_images_dataset.json: row 2: image 'controlled_images/mug_on_plate.jpeg' not found"):
        whatsup.load_controlled_a(root)
    with pytest.raises(ManifestError, match="controlled_clevr_dataset.json"):
        whatsup.load_controlled_b(root)


def test_controlled_strict_sizes(tmp_path):
    root = write_controlled(tmp_path, "a", [("mug", "plate")])
    with pytest.raises(ManifestError, match="published size is 412"):
        whatsup.load_controlled_a(root, strict_sizes=True)


def test_qa_layout_and_groups(tmp_path):
    rows = [[397133, "A photo of a dog on the left", "A photo of a dog on the right"],
            [37777, "A photo of a cup on the top", "A photo of a cup on the bottom"],
            [397133, "A photo of a cat on the bottom", "A photo of a cat on the top"]]
    manifest = whatsup.load_coco_one(write_qa(tmp_path, "coco_one", rows))
    assert [i.item_id for i in manifest.items] == ["0", "1", "2"]
    assert manifest.items[0].images == ("val2017/000000397133.jpg",)
    assert [i.group for i in manifest.items] == ["lr", "tb", "tb"]
    vg = whatsup.load_vg_two(write_qa(tmp_path / "vg", "vg_two", [[12, "A photo of a man to the behind of a car", "x"]]))
    assert vg.items[0].images == ("vg_images/12.jpg",) and vg.items[0].group == "fb"


@pytest.mark.parametrize(
    "row, match",
    [
        ([1, "A photo of a dog on the left above", "x"], r"row 0: true caption .* found \['above', 'left'\]"),
        ([1, "A photo of a dog", "x"], r"row 0: true caption .* found none"),
        (["1", "a", "b"], r"row 0: expected \[image_id:int"),
        ([1, "A photo of a dog on the left"], r"row 0: expected \[image_id:int"),
    ],
)
def test_qa_malformed(tmp_path, row, match):
    write_qa(tmp_path, "coco_two", [row])
    with pytest.raises(ManifestError, match=match) as info:
        whatsup.load_coco_two(tmp_path)
    assert "coco_qa_two_obj.json" in str(info.value)


def test_qa_missing_image(tmp_path):
    write_qa(tmp_path, "vg_one", [[5, "A photo of a dog on the left", "A photo of a dog on the right"]], skip_images=(5,))
    with pytest.raises(ManifestError, match=r"vg_qa_one_obj.json: row 0: image 'vg_images/5.jpg' not found"):
        whatsup.load_vg_one(tmp_path)


# ---------------------------------------------------------------- metrics, hand-computed


def small_a(tmp_path):
    return whatsup.load_controlled_a(write_controlled(tmp_path, "a", [("mug", "plate"), ("cup", "box")]))


def test_controlled_metrics_hand_computed(tmp_path):
    manifest = small_a(tmp_path)
    # Planted 4-way scores per image (true caption first after we map by text content).
    wrong_2way = {"mug_right_of_plate"}  # opposite beats true: wrong in 2-way and 4-way
    wrong_4way_only = {"cup_on_box"}  # a non-opposite distractor beats true: 2-way right, 4-way wrong

    def score(item, i, t):
        if t == 0:
            return 0.5
        if item.item_id in wrong_2way and t == item.two_way[1]:
            return 0.9
        if item.item_id in wrong_4way_only and t not in item.two_way:
            return 0.8
        return 0.1

    report = compute_metrics(manifest, table_from(manifest, score))
    m, c = report.metrics, report.counts
    # 2-way: 7/8 images; LR 3/4, OU 4/4; LR pairs: mug wrong, cup right -> 1/2; OU pairs 2/2; pair 3/4; set 1/2.
    assert m["2way/individual_acc"] == 7 / 8
    assert m["2way/lr/individual_acc"] == 3 / 4 and m["2way/ou/individual_acc"] == 1.0
    assert m["2way/lr/pair_acc"] == 1 / 2 and m["2way/ou/pair_acc"] == 1.0
    assert m["2way/pair_acc"] == 3 / 4 and m["2way/set_acc"] == 1 / 2
    # 4-way: additionally cup_on_box is wrong -> 6/8; OU pairs 1/2; pair 2/4; set 0/2.
    assert m["4way/individual_acc"] == 6 / 8 and m["4way/ou/pair_acc"] == 1 / 2
    assert m["4way/pair_acc"] == 2 / 4 and m["4way/set_acc"] == 0.0
    assert c["2way/pair_acc/total"] == 4 and c["2way/set_acc/total"] == 2 and c["ties"] == 0
    assert report.chance["2way/set_acc"] == 0.0625 and report.chance["4way/set_acc"] == 0.25**4
    assert report.chance["4way/pair_acc"] == 0.0625 and report.chance["2way/lr/individual_acc"] == 0.5
    assert "2way/fb/pair_acc" not in m


def test_controlled_ties(tmp_path):
    manifest = small_a(tmp_path)
    # All four captions tie: strict -> all wrong; argmax_first -> the true caption (index 0) wins.
    table = table_from(manifest, lambda item, i, t: 0.25)
    strict = compute_metrics(manifest, table)
    assert strict.metrics["2way/individual_acc"] == 0.0 and strict.counts["ties"] == 8
    assert strict.counts["2way/ties"] == 8 and strict.counts["4way/ties"] == 8
    first = compute_metrics(manifest, table, tie_policy="argmax_first")
    assert first.metrics["4way/set_acc"] == 1.0 and first.metrics["2way/pair_acc"] == 1.0
    with pytest.raises(ValueError, match="MMVP only"):
        compute_metrics(manifest, table, tie_policy="mmvp_reference")


def test_controlled_pillow_errata(tmp_path):
    manifest = whatsup.load_controlled_a(write_controlled(tmp_path, "a", [("pillow", "chair"), ("mug", "plate")]))
    table = table_from(manifest, true_wins)
    original = compute_metrics(manifest, table)
    corrected = compute_metrics(manifest, table, label_errata="corrected")
    assert original.metrics["2way/lr/pair_acc"] == 1.0
    # Under `corrected` the two pillow images take each other's relation: the file's true caption is now wrong.
    assert corrected.counts["errata_items"] == 2
    assert corrected.metrics["2way/lr/individual_acc"] == 2 / 4
    assert corrected.metrics["2way/lr/pair_acc"] == 1 / 2 and corrected.metrics["4way/set_acc"] == 1 / 2
    # And a model that prefers the opposite caption on exactly those images is fully right under `corrected`.
    flipped = table_from(manifest, lambda item, i, t: (1.0 if t == item.two_way[1] else 0.0)
                         if item.pair_key == "pillow/chair" and item.group == "lr" else true_wins(item, i, t))
    assert compute_metrics(manifest, flipped, label_errata="corrected").metrics["4way/set_acc"] == 1.0
    # Controlled B has no errata.
    b = whatsup.load_controlled_b(write_controlled(tmp_path / "b", "b", [("pillow", "chair")]))
    assert compute_metrics(b, table_from(b, true_wins), label_errata="corrected").counts["errata_items"] == 0


@pytest.mark.parametrize("subset, n_pairs, group", [("a", 103, "ou"), ("b", 102, "fb")])
def test_controlled_full_size_denominators(tmp_path, subset, n_pairs, group):
    root = write_controlled(tmp_path, subset, numbered_pairs(n_pairs))
    load = whatsup.load_controlled_a if subset == "a" else whatsup.load_controlled_b
    manifest = load(root, strict_sizes=True)
    assert manifest.warnings == ()
    n = 4 * n_pairs
    # Exactly one pair (the first) fails on its first LR image.
    first_left = "obj0_left_of_thing0"
    report = compute_metrics(manifest, table_from(manifest, lambda item, i, t: (
        0.0 if t == 0 else 1.0) if item.item_id == first_left else true_wins(item, i, t)))
    c, m = report.counts, report.metrics
    for protocol in ("2way", "4way"):
        assert c[f"{protocol}/individual_acc/total"] == n
        assert c[f"{protocol}/lr/individual_acc/total"] == n // 2
        assert c[f"{protocol}/{group}/individual_acc/total"] == n // 2
        assert c[f"{protocol}/lr/pair_acc/total"] == n_pairs
        assert c[f"{protocol}/{group}/pair_acc/total"] == n_pairs
        assert c[f"{protocol}/pair_acc/total"] == n // 2
        assert c[f"{protocol}/set_acc/total"] == n_pairs
        assert m[f"{protocol}/lr/pair_acc"] == (n_pairs - 1) / n_pairs
        assert m[f"{protocol}/set_acc"] == (n_pairs - 1) / n_pairs
        assert m[f"{protocol}/pair_acc"] == (n // 2 - 1) / (n // 2)


@pytest.mark.parametrize(
    "subset, loader, groups",
    [
        ("coco_one", whatsup.load_coco_one, {"lr": 1140, "tb": 1107}),
        ("coco_two", whatsup.load_coco_two, {"lr": 279, "ab": 161}),
        ("vg_one", whatsup.load_vg_one, {"lr": 768, "tb": 390, "fb": 2}),
        ("vg_two", whatsup.load_vg_two, {"lr": 264, "tb": 3, "fb": 24}),
    ],
)
def test_qa_full_size_denominators(tmp_path, subset, loader, groups):
    manifest = loader(write_qa(tmp_path, subset, qa_rows(subset, groups)), strict_sizes=True)
    assert manifest.warnings == ()
    # Every third item wrong, one exact tie (item "1") which is wrong under strict, right under argmax_first.
    def score(item, i, t):
        if item.item_id == "1":
            return 0.5
        wrong = int(item.item_id) % 3 == 0
        return float((t == 0) != wrong)

    report = compute_metrics(manifest, table_from(manifest, score))
    n = sum(groups.values())
    wrong = len(range(0, n, 3)) + 1
    assert report.counts["individual_acc/total"] == n
    assert report.metrics["individual_acc"] == (n - wrong) / n
    for group, size in groups.items():
        assert report.counts[f"{group}/individual_acc/total"] == size
    assert report.counts["ties"] == 1
    relaxed = compute_metrics(manifest, table_from(manifest, score), tie_policy="argmax_first")
    assert relaxed.metrics["individual_acc"] == (n - wrong + 1) / n


def test_qa_group_size_mismatch_warns(tmp_path):
    rows = qa_rows("coco_one", {"lr": 1141, "tb": 1106})
    manifest = whatsup.load_coco_one(write_qa(tmp_path, "coco_one", rows))
    assert any("group lr: 1141 found, published size is 1140" in w for w in manifest.warnings)


# ---------------------------------------------------------------- coverage and NaN


def test_scores_must_cover_every_item(tmp_path):
    manifest = small_a(tmp_path)
    table = table_from(manifest, true_wins)
    partial = table.slice(0, table.num_rows - 1)
    with pytest.raises(ScoresError, match="1 of 8 item\\(s\\) lack scores"):
        compute_metrics(manifest, partial)
    doubled = table.slice(0, 1)
    import pyarrow as pa

    with pytest.raises(ScoresError, match="duplicate score"):
        compute_metrics(manifest, pa.concat_tables([table, doubled]))
    nan = table_from(manifest, lambda item, i, t: np.nan if item.item_id == "mug_on_plate" else 1.0)
    with pytest.raises(ScoresError, match="NaN scores"):
        compute_metrics(manifest, nan)
    extra = pa.concat_tables([table, scores_table(["other"], [0], [0], [1.0])])
    assert compute_metrics(manifest, extra).counts["extra_score_rows"] == 1


@pytest.mark.parametrize("subset, group", [("a", "ou"), ("b", "fb")])
def test_grouped_metrics_count_complete_groups_only(tmp_path, subset, group):
    """A perfect scorer with one image missing (unreadable, so its item is not complete): 31/31 individual, the
    incomplete pair and set are left out of numerator and denominator and counted as excluded, never as wrong
    (pairs) or right (sets)."""
    root = write_controlled(tmp_path, subset, numbered_pairs(8))
    load = whatsup.load_controlled_a if subset == "a" else whatsup.load_controlled_b
    manifest = load(root)
    missing = "obj0_left_of_thing0"
    complete = manifest.restrict(item.item_id for item in manifest.items if item.item_id != missing)
    report = compute_metrics(complete, table_from(complete, true_wins))
    c, m = report.counts, report.metrics
    for protocol in ("2way", "4way"):
        assert (c[f"{protocol}/individual_acc/correct"], c[f"{protocol}/individual_acc/total"]) == (31, 31)
        assert (c[f"{protocol}/lr/pair_acc/correct"], c[f"{protocol}/lr/pair_acc/total"]) == (7, 7)
        assert c[f"{protocol}/lr/pair_acc/excluded"] == 1
        assert (c[f"{protocol}/{group}/pair_acc/correct"], c[f"{protocol}/{group}/pair_acc/total"]) == (8, 8)
        assert f"{protocol}/{group}/pair_acc/excluded" not in c
        assert (c[f"{protocol}/pair_acc/correct"], c[f"{protocol}/pair_acc/total"]) == (15, 15)
        assert c[f"{protocol}/pair_acc/excluded"] == 1
        assert (c[f"{protocol}/set_acc/correct"], c[f"{protocol}/set_acc/total"]) == (7, 7)
        assert c[f"{protocol}/set_acc/excluded"] == 1
        assert m[f"{protocol}/pair_acc"] == m[f"{protocol}/set_acc"] == 1.0
