"""Winoground-family adapters (Winoground, EqBen_Mini, NaturalBench, COCO-CF) and their 2x2 metric."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perceive_ray import registry
from perceive_ray.data.benchmarks.winoground import (
    load_coco_cf,
    load_eqben_mini,
    load_naturalbench,
    load_winoground,
)
from perceive_ray.data.manifest import Item, Manifest, ManifestError
from perceive_ray.metrics.base import MetricError
from perceive_ray.metrics.scores import build_score_grids, scores_table
from perceive_ray.metrics.winoground import compute_pair_outcome, compute_winoground_family
from tests.fixtures.pairs_files import (
    pair_captions,
    write_coco_cf,
    write_eqben_mini,
    write_image,
    write_naturalbench,
    write_winoground,
)


def grids_for(manifest: Manifest, by_id: dict[str, list[list[float]]]):
    """Score grids from {item_id: [[s(c0,i0), s(c1,i0)], [s(c0,i1), s(c1,i1)]]} (rows = images)."""
    ids, imgs, txts, vals = [], [], [], []
    for item_id, grid in by_id.items():
        for i, row in enumerate(grid):
            for t, value in enumerate(row):
                ids.append(item_id), imgs.append(i), txts.append(t), vals.append(value)
    return build_score_grids(manifest, scores_table(ids, imgs, txts, vals))


def pair_manifest(benchmark: str, items: list[Item]) -> Manifest:
    return Manifest(benchmark, "/nonexistent", tuple(items))


def plain_item(item_id: str, **kw) -> Item:
    return Item(item_id=item_id, images=("a.png", "b.png"), texts=("c0", "c1"), **kw)


# --- metric: hand-computed 2x2 cases (grid[image][text], s(c, i) = grid[i][c]) ------------------------------
CASES = {
    "A": [[0.9, 0.1], [0.2, 0.8]],  # everything right
    "B": [[0.5, 0.5], [0.2, 0.8]],  # tie s(c0,i0) == s(c1,i0): the index-0 comparison of image 0
    "C": [
        [0.9, 0.1],
        [0.3, 0.3],
    ],  # tie s(c0,i1) == s(c1,i1): correct is index 1 -> wrong under both policies
    "D": [[0.1, 0.9], [0.8, 0.2]],  # everything wrong
    "E": [[0.9, 0.8], [0.95, 0.99]],  # text right, image wrong (caption 0 prefers image 1)
    "F": [[0.5, 0.6], [0.1, 0.7]],  # image right, text wrong (image 0 prefers caption 1)
}
# (text, image, group, individual halves) per case and policy.
EXPECTED = {
    "strict": {
        "A": (1, 1, 1, 2),
        "B": (0, 1, 0, 1),
        "C": (0, 1, 0, 1),
        "D": (0, 0, 0, 0),
        "E": (1, 0, 0, 2),
        "F": (0, 1, 0, 1),
    },
    "argmax_first": {
        "A": (1, 1, 1, 2),
        "B": (1, 1, 1, 2),
        "C": (0, 1, 0, 1),
        "D": (0, 0, 0, 0),
        "E": (1, 0, 0, 2),
        "F": (0, 1, 0, 1),
    },
}


@pytest.mark.parametrize("policy", ["strict", "argmax_first"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pair_outcome_hand_cases(case, policy):
    out = compute_pair_outcome(np.array(CASES[case]), policy)
    text, image, group, halves = EXPECTED[policy][case]
    assert (out["text"], out["image"], out["group"], out["text0"] + out["text1"]) == (
        text,
        image,
        group,
        halves,
    )
    assert out["ties"] == (1 if case in "BC" else 0)


@pytest.mark.parametrize(
    ("policy", "text", "image", "group", "individual"),
    [("strict", 2, 4, 1, 7), ("argmax_first", 3, 4, 2, 8)],
)
def test_family_metric_totals(policy, text, image, group, individual):
    manifest = pair_manifest("naturalbench", [plain_item(c) for c in CASES])
    report = compute_winoground_family(manifest, grids_for(manifest, CASES), tie_policy=policy)
    assert report.metrics["text_score"] == pytest.approx(text / 6)
    assert report.metrics["image_score"] == pytest.approx(image / 6)
    assert report.metrics["group_score"] == pytest.approx(group / 6)
    assert report.metrics["individual_acc"] == pytest.approx(individual / 12)
    assert (
        report.counts["individual_acc/total"] == 12 and report.counts["individual_acc/correct"] == individual
    )
    assert report.counts["text_score/total"] == 6
    assert report.counts["ties"] == 2 and report.counts["tied_comparisons"] == 2
    assert report.chance == {
        "text_score": 0.25,
        "image_score": 0.25,
        "group_score": pytest.approx(1 / 6),
        "individual_acc": 0.5,
    }
    assert report.tie_policy == policy and set(report.metrics) == set(report.chance)


def test_policy_checks():
    manifest = pair_manifest("coco_cf", [plain_item("0")])
    grids = grids_for(manifest, {"0": CASES["A"]})
    with pytest.raises(MetricError, match="MMVP only"):
        compute_winoground_family(manifest, grids, tie_policy="mmvp_reference")
    with pytest.raises(MetricError, match="unknown tie_policy"):
        compute_winoground_family(manifest, grids, tie_policy="lenient")
    # label_errata is accepted and recorded; it changes nothing here.
    assert compute_winoground_family(manifest, grids, label_errata="corrected").metrics["group_score"] == 1.0


def test_winoground_breakdowns():
    items = [
        plain_item("0", tags=(), meta={"num_main_preds": 1, "collapsed_tag": "Object"}),
        plain_item(
            "1", tags=("Visually Difficult",), meta={"num_main_preds": 2, "collapsed_tag": "Relation"}
        ),
        plain_item(
            "2",
            tags=("Visually Difficult", "Non Minimal"),
            meta={"num_main_preds": 1, "collapsed_tag": "Relation"},
        ),
    ]
    manifest = pair_manifest("winoground", items)
    report = compute_winoground_family(
        manifest, grids_for(manifest, {"0": CASES["A"], "1": CASES["D"], "2": CASES["E"]})
    )
    m, c = report.metrics, report.counts
    assert m["text_score"] == pytest.approx(2 / 3) and m["group_score"] == pytest.approx(1 / 3)
    assert m["num_main_preds_1/text_score"] == 1.0 and c["num_main_preds_1/text_score/total"] == 2
    assert m["num_main_preds_1/group_score"] == 0.5
    assert m["num_main_preds_2/text_score"] == 0.0 and c["num_main_preds_2/individual_acc/total"] == 2
    assert m["tag/object/group_score"] == 1.0 and c["tag/object/text_score/total"] == 1
    assert m["tag/relation/text_score"] == 0.5 and c["tag/relation/text_score/total"] == 2
    assert m["tag/no_tag/group_score"] == 1.0 and c["tag/no_tag/group_score/total"] == 1
    assert (
        m["tag/visually_difficult/individual_acc"] == 0.5
        and c["tag/visually_difficult/individual_acc/total"] == 4
    )
    assert m["tag/non_minimal/image_score"] == 0.0 and c["tag/non_minimal/image_score/total"] == 1
    assert not any(k.startswith("eqben") for k in m)


def test_winoground_tag_slug_clash_and_missing_meta():
    clash = [plain_item("0", tags=("object",), meta={"num_main_preds": 1, "collapsed_tag": "Object"})]
    manifest = pair_manifest("winoground", clash)
    with pytest.raises(MetricError, match="tag/<slug>"):
        compute_winoground_family(manifest, grids_for(manifest, {"0": CASES["A"]}))
    manifest = pair_manifest("winoground", [plain_item("0")])
    with pytest.raises(MetricError, match="num_main_preds"):
        compute_winoground_family(manifest, grids_for(manifest, {"0": CASES["A"]}))


def test_eqben_subset_breakdown(tmp_path):
    manifest = load_eqben_mini(write_eqben_mini(tmp_path))
    assert [i.subset for i in manifest.items] == [
        "eqbensd",
        "eqbenk",
        "eqbenk",
        "eqbenk",
        "eqbengebc",
        "eqbenag",
        "eqbenyoucook2",
    ]
    assert [i.meta["raw_subset"] for i in manifest.items][1:4] == [
        "eqbenkubric_cnt",
        "eqbenkubric_loc",
        "eqbenkubric_attr",
    ]
    scores = {str(k): CASES["A" if k in (1, 2) else "D"] for k in range(7)}
    report = compute_winoground_family(manifest, grids_for(manifest, scores))
    assert (
        report.metrics["eqbenk/text_score"] == pytest.approx(2 / 3)
        and report.counts["eqbenk/text_score/total"] == 3
    )
    assert report.metrics["eqbensd/group_score"] == 0.0 and report.counts["eqbensd/group_score/total"] == 1
    assert {k.split("/")[0] for k in report.metrics if "/" in k} == {
        "eqbensd",
        "eqbenk",
        "eqbengebc",
        "eqbenag",
        "eqbenyoucook2",
    }


# --- adapters -----------------------------------------------------------------------------------------------
def test_load_winoground_items(tmp_path):
    write_winoground(
        tmp_path, 4, why_hard=[[], ["Unusual Text"], ["Visually Difficult", "Complex Reasoning"], []]
    )
    manifest = load_winoground(tmp_path)
    first = manifest.items[0]
    assert first.item_id == "0"
    assert first.images == ("winoground/images/ex_0_img_0.png", "winoground/images/ex_0_img_1.png")
    assert first.texts == pair_captions(0)  # quotes, comma and trailing space kept byte-exact
    assert first.meta == {"num_main_preds": 1, "collapsed_tag": "Object"}
    assert [i.tags for i in manifest.items] == [
        (),
        ("Unusual Text",),
        ("Visually Difficult", "Complex Reasoning"),
        (),
    ]
    assert set(manifest.source_hashes) == {
        "winoground/metadata.csv",
        "winoground/examples.jsonl",
        "winoground/why_winoground_hard.json",
    }
    assert manifest.warnings == ("winoground items: 4 found, published size is 400",)
    with pytest.raises(ManifestError, match="strict-sizes"):
        load_winoground(tmp_path, strict_sizes=True)


def test_winoground_full_size_denominators(tmp_path):
    manifest = load_winoground(write_winoground(tmp_path, 400), strict_sizes=True)
    assert len(manifest) == 400 and manifest.warnings == ()
    assert manifest.items[-1].item_id == "399"
    rng = np.random.default_rng(0)
    grids = grids_for(manifest, {i.item_id: rng.random((2, 2)).tolist() for i in manifest.items})
    report = compute_winoground_family(manifest, grids)
    counts = report.counts
    assert counts["text_score/total"] == counts["image_score/total"] == counts["group_score/total"] == 400
    assert counts["individual_acc/total"] == 800
    assert counts["num_main_preds_1/text_score/total"] + counts["num_main_preds_2/text_score/total"] == 400
    assert sum(counts[f"tag/{t}/text_score/total"] for t in ("object", "relation", "both")) == 400
    assert counts["tag/no_tag/text_score/total"] == 134  # ids 0, 3, ..., 399 have an empty why-hard list
    # The registry resolves the same function for all four benchmarks.
    assert registry.resolve_metric("winoground") is compute_winoground_family


def rewrite_csv_line(path, line_no, new_line):
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line_no] = new_line
    path.write_text("\n".join(lines), encoding="utf-8")


def test_winoground_malformed(tmp_path):
    base = write_winoground(tmp_path / "bad_header", 3) / "winoground"
    rewrite_csv_line(base / "metadata.csv", 0, "id,image_0,image_1,caption_0,caption1")
    with pytest.raises(ManifestError, match=r"metadata\.csv: header .* lacks column\(s\) \['caption_1'\]"):
        load_winoground(tmp_path / "bad_header")

    base = write_winoground(tmp_path / "bad_id", 3) / "winoground"
    rewrite_csv_line(base / "metadata.csv", 3, "5,images/ex_2_img_0.png,images/ex_2_img_1.png,x,y")
    with pytest.raises(ManifestError, match=r"metadata\.csv: row 2: id '5' must equal the row position 2"):
        load_winoground(tmp_path / "bad_id")

    base = write_winoground(tmp_path / "missing_image", 3) / "winoground"
    (base / "images" / "ex_1_img_1.png").unlink()
    with pytest.raises(
        ManifestError, match=r"metadata\.csv: row 1 \(image_1\): image .*ex_1_img_1\.png.* not found"
    ):
        load_winoground(tmp_path / "missing_image")

    base = write_winoground(tmp_path / "escape", 3) / "winoground"
    write_image(tmp_path / "escape" / "outside.png")  # exists, but outside winoground/
    rewrite_csv_line(base / "metadata.csv", 2, "1,../outside.png,images/ex_1_img_1.png,x,y")
    with pytest.raises(
        ManifestError,
        match=r"metadata\.csv: row 1 \(image_0\): image path '\.\./outside\.png' "
        r"escapes winoground/",
    ):
        load_winoground(tmp_path / "escape")

    base = write_winoground(tmp_path / "preds", 3, num_main_preds=[1, 3, 1]) / "winoground"
    with pytest.raises(ManifestError, match=r"examples\.jsonl: row 1: id 1: num_main_preds must be 1 or 2"):
        load_winoground(tmp_path / "preds")

    base = write_winoground(tmp_path / "hard", 3) / "winoground"
    (base / "why_winoground_hard.json").write_text(json.dumps({"0": [], "1": []}))
    with pytest.raises(
        ManifestError, match=r"why_winoground_hard\.json: no key '2' \(.*metadata\.csv: row 2\)"
    ):
        load_winoground(tmp_path / "hard")

    base = write_winoground(tmp_path / "extra", 3) / "winoground"
    (base / "why_winoground_hard.json").write_text(
        json.dumps({"0": [], "1": [], "2": [], "7": ["Unusual Text"]})
    )
    with pytest.raises(ManifestError, match=r"why_winoground_hard\.json: id\(s\) \[7\] have no row"):
        load_winoground(tmp_path / "extra")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"winoground/metadata\.csv"):
        load_winoground(tmp_path / "empty")


def test_load_eqben_mini_and_malformed(tmp_path):
    manifest = load_eqben_mini(write_eqben_mini(tmp_path / "ok"))
    assert manifest.items[0].images == (
        "eqben_vllm/images/eqbensd/item_0_0.png",
        "eqben_vllm/images/eqbensd/item_0_1.png",
    )
    assert manifest.items[6].images[0].endswith(".npy") and manifest.items[0].texts == pair_captions(0)
    assert manifest.warnings == ()

    write_eqben_mini(tmp_path / "unknown", ["eqbensd", "eqbenxyz"])
    with pytest.raises(
        ManifestError, match=r"all_select\.json: row 1: image0 'eqbenxyz/.*known EqBen subset"
    ):
        load_eqben_mini(tmp_path / "unknown")

    root = write_eqben_mini(tmp_path / "field", ["eqbensd", "eqbenag"])
    path = root / "eqben_vllm" / "all_select.json"
    records = json.loads(path.read_text())
    del records[1]["caption1"]
    path.write_text(json.dumps(records))
    with pytest.raises(ManifestError, match=r"all_select\.json: row 1: missing field\(s\) caption1"):
        load_eqben_mini(root)


def test_load_naturalbench_and_index_check(tmp_path):
    manifest = load_naturalbench(write_naturalbench(tmp_path / "ok", 3))
    assert [i.item_id for i in manifest.items] == ["0", "1", "2"]
    assert manifest.items[2].images == (
        "NaturalBench-Retrieval/images/2_0.jpg",
        "NaturalBench-Retrieval/images/2_1.jpg",
    )

    root = write_naturalbench(tmp_path / "bad", 3)
    path = root / "NaturalBench-Retrieval" / "metadata.json"
    records = json.loads(path.read_text())
    records[1]["index"], records[2]["index"] = 2, 1
    path.write_text(json.dumps(records))
    with pytest.raises(ManifestError, match=r"metadata\.json: row 1: index 2 must equal the row position 1"):
        load_naturalbench(root)


def test_load_coco_cf_layouts(tmp_path):
    manifest = load_coco_cf(write_coco_cf(tmp_path / "ref", 3))
    assert manifest.items[1].images == (
        "COCOCounterfactuals/images/COCO_val2014_000000000001_0.jpg",
        "COCOCounterfactuals/images/COCO_val2014_000000000001_1.jpg",
    )
    assert manifest.warnings == ("coco_cf items: 3 found, published size is 17409",)
    hf = load_coco_cf(write_coco_cf(tmp_path / "hf", 2, image_dir="images"))
    assert hf.items[0].images[0] == "images/COCO_val2014_000000000000_0.jpg"

    root = write_coco_cf(tmp_path / "missing", 2)
    (root / "COCOCounterfactuals" / "images" / "COCO_val2014_000000000001_0.jpg").unlink()
    with pytest.raises(
        ManifestError, match=r"cococounterfactuals\.jsonl: row 1 \(image_0\): image .* not found"
    ):
        load_coco_cf(root)
