"""MMVP / MMVP-VLM adapters and metric: layouts, exact texts, ties, errata, denominators, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from perceive_ray.data.benchmarks.mmvp import CATEGORY_NAMES, CATEGORY_ORDER, load_mmvp, load_mmvp_vlm
from perceive_ray.data.manifest import Item, Manifest, ManifestError
from perceive_ray.metrics.base import MetricError
from perceive_ray.metrics.mmvp import compute_mmvp
from perceive_ray.metrics.scores import build_score_grids, scores_table
from tests.fixtures.mmvp_files import (
    LLAVA_HEADER,
    STATEMENTS_HEADER,
    VLM_TYPES,
    mmvp_statement,
    vlm_rows,
    write_csv,
    write_image,
    write_mmvp,
    write_mmvp_vlm,
)


def size_warnings(manifest: Manifest) -> list[str]:
    return [w for w in manifest.warnings if "published size" in w]


def diagonal_grids(manifest: Manifest, flip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Every pair right (diagonal high) except item ids in ``flip`` (anti-diagonal high: both texts wrong)."""
    right = np.array([[0.9, 0.1], [0.2, 0.8]])
    return {it.item_id: (right[::-1] if it.item_id in flip else right) for it in manifest.items}


# ---------------------------------------------------------------- MMVP adapter


def test_mmvp_full_size_items_texts_and_meta(tmp_path):
    manifest = load_mmvp(write_mmvp(tmp_path / "mmvp"))
    assert manifest.benchmark == "mmvp"
    assert len(manifest) == 150
    assert size_warnings(manifest) == [] and manifest.warnings == ()
    assert set(manifest.source_hashes) == {"Questions.csv", "Questions-clip.csv"}
    items = manifest.by_id()
    assert [it.item_id for it in manifest.items] == [str(k) for k in range(1, 151)]
    first = items["1"]
    assert first.images == ("MMVP Images/1.jpg", "MMVP Images/2.jpg")
    assert first.texts == ("a photo of statement 1", "a photo of statement 2")
    assert first.group == ""
    # RFC-4180: the file holds "key ""Z"" on the keyboard".
    assert items["5"].texts == ('a photo of key "Z" on the keyboard', 'a photo of no key "Z" on the keyboard')
    assert items["139"].texts == ('a photo of "SUGAR"', 'a photo of "UGA"')
    # Statement 249 ends with a space; nothing is stripped.
    assert items["125"].texts[0] == "a photo of strawberries on the very top of the cake "
    assert items["125"].meta["statements"][0].endswith("cake ")
    meta = items["50"].meta
    assert meta["question_ids"] == [99, 100] and meta["rows"] == [99, 100]
    assert meta["statements"] == ["elephant with long tusks", "elephant with short tusks"]
    assert meta["questions"] == ["Question 50, as asked?"] * 2
    assert meta["options"] == ["(a) Yes 99 (b) No 99", "(a) Yes 100 (b) No 100"]
    assert meta["answers"] == ["(a)", "(b)"] and meta["types"] == ["Unknown", "Unknown"]


def test_mmvp_raw_file_bytes_quotes_and_trailing_space(tmp_path):
    root = tmp_path / "mmvp"
    (root / "MMVP_Images").mkdir(parents=True)
    for q in range(1, 5):
        write_image(root / "MMVP_Images" / f"{q}.jpg")
    (root / "Questions-clip.csv").write_bytes(
        b'Question ID,Type,Statement\r\n1,Unknown,"key ""Z"" on the keyboard"\r\n'
        b'2,Unknown,"no key ""Z"" on the keyboard"\r\n3,Unknown,strawberries on the very top of the cake \r\n'
        b'4,Unknown," cream, leading space"\r\n'
    )
    (root / "Questions.csv").write_bytes(
        b"Index,Question,Options,Correct Answer\n1,Q?,(a) A (b) B,(a)\n2,Q?,(a) A (b) B,(b)\n"
        b'3,"Is it, or?", (a) X (b) Y,(a)\n4,"Is it, or?", (a) X (b) Y,(b)\n'
    )
    manifest = load_mmvp(root)
    assert len(manifest) == 2
    assert manifest.items[0].texts == (
        'a photo of key "Z" on the keyboard',
        'a photo of no key "Z" on the keyboard',
    )
    assert manifest.items[1].texts == (
        "a photo of strawberries on the very top of the cake ",
        "a photo of  cream, leading space",
    )
    assert manifest.items[1].images == ("MMVP_Images/3.jpg", "MMVP_Images/4.jpg")
    assert manifest.items[1].meta["questions"] == ["Is it, or?", "Is it, or?"]
    assert manifest.items[1].meta["options"] == [" (a) X (b) Y", " (a) X (b) Y"]
    # A 2-pair file is a subset: size warnings, or an error under strict sizes.
    assert len(size_warnings(manifest)) == 2
    with pytest.raises(ManifestError, match=r"Questions-clip\.csv rows: 4 found, published size is 300"):
        load_mmvp(root, strict_sizes=True)


def test_mmvp_manifest_roundtrips_through_parquet(tmp_path):
    manifest = load_mmvp(write_mmvp(tmp_path / "mmvp", n_pairs=3))
    back = Manifest.read_parquet(manifest.write_parquet(tmp_path / "m.parquet"))
    assert back.items == manifest.items and back.warnings == manifest.warnings


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"statements_header": "Question ID,Type,Statements"},
            r"Questions-clip\.csv: header .* does not match",
        ),
        ({"questions_header": "Index,Question,Options,Answer"}, r"Questions\.csv: header .* does not match"),
        (
            {"skip_images": [4]},
            r"Questions-clip\.csv: data row 4 \(Question ID 4\): image 'MMVP Images/4\.jpg' not",
        ),
        (
            {"statements": ["a", "b", "c"]},
            r"Questions-clip\.csv: data row 3 \(Question ID 3\): 3 data rows, an odd",
        ),
        (
            {"n_pairs": 2, "n_question_rows": 3},
            r"Questions\.csv: 3 data rows, but .*Questions-clip\.csv has 4",
        ),
        (
            {"statements": ["a", "", "c", "d"]},
            r"Questions-clip\.csv: data row 2 \(Question ID 2\): empty Statement",
        ),
    ],
)
def test_mmvp_malformed_inputs_name_file_and_row(tmp_path, kwargs, pattern):
    root = write_mmvp(tmp_path / "mmvp", **{"n_pairs": 2, **kwargs})
    with pytest.raises(ManifestError, match=pattern):
        load_mmvp(root)


def test_mmvp_missing_files_and_bad_ids(tmp_path):
    root = write_mmvp(tmp_path / "mmvp", n_pairs=2)
    (root / "Questions.csv").unlink()
    with pytest.raises(ManifestError, match=r"annotation file not found .*'Questions\.csv'"):
        load_mmvp(root)
    root = write_mmvp(tmp_path / "noimg", n_pairs=2)
    (root / "MMVP Images").rename(root / "images")
    with pytest.raises(ManifestError, match=r"image folder not found .*'MMVP Images', 'MMVP_Images'"):
        load_mmvp(root)
    root = write_mmvp(tmp_path / "dup", n_pairs=2)
    write_csv(
        root / "Questions-clip.csv",
        STATEMENTS_HEADER,
        [("1", "Unknown", "a"), ("2", "Unknown", "b"), ("3", "Unknown", "c"), ("1", "Unknown", "d")],
    )
    with pytest.raises(
        ManifestError, match=r"Questions-clip\.csv: data row 4: Question ID 1 repeats data row 1"
    ):
        load_mmvp(root)


def test_mmvp_image_paths_cannot_escape_root(tmp_path):
    root = write_mmvp(tmp_path / "mmvp", n_pairs=2)
    write_image(tmp_path / "outside.jpg")
    # A "../" id is rejected before any path is built.
    write_csv(
        root / "Questions-clip.csv",
        STATEMENTS_HEADER,
        [
            ("1", "Unknown", "a"),
            ("../../outside", "Unknown", "b"),
            ("3", "Unknown", "c"),
            ("4", "Unknown", "d"),
        ],
    )
    with pytest.raises(
        ManifestError, match=r"Questions-clip\.csv: data row 2: Question ID '\.\./\.\./outside' is not"
    ):
        load_mmvp(root)
    # A symlinked image (the user's own arrangement) is followed: the guard only polices the references.
    root = write_mmvp(tmp_path / "link", n_pairs=2)
    (root / "MMVP Images" / "3.jpg").unlink()
    (root / "MMVP Images" / "3.jpg").symlink_to(tmp_path / "outside.jpg")
    assert load_mmvp(root).items[1].images[0] == "MMVP Images/3.jpg"


def test_mmvp_index_and_parity_mismatch_warn(tmp_path):
    root = write_mmvp(tmp_path / "mmvp", n_pairs=2)
    write_csv(
        root / "Questions-clip.csv",
        STATEMENTS_HEADER,
        [("2", "Unknown", "a"), ("1", "Unknown", "b"), ("3", "Unknown", "c"), ("4", "Unknown", "d")],
    )
    manifest = load_mmvp(root)
    # Positional ground truth; the images follow the ids.
    assert manifest.items[0].images == ("MMVP Images/2.jpg", "MMVP Images/1.jpg")
    assert any("data row 1 has Index '1'" in w and "Question ID 2" in w for w in manifest.warnings)
    assert any("data rows 1/2 carry Question IDs 2/1" in w for w in manifest.warnings)


# ---------------------------------------------------------------- MMVP-VLM adapter


@pytest.mark.parametrize("folder", ["MLLM_VLM Images", "MLLM_VLM_Images", "MMVP_VLM_Images"])
def test_mmvp_vlm_full_size_and_folder_variants(tmp_path, folder):
    manifest = load_mmvp_vlm(write_mmvp_vlm(tmp_path / "vlm", image_dir=folder))
    assert manifest.benchmark == "mmvp_vlm"
    assert len(manifest) == 135
    assert size_warnings(manifest) == []
    # Only the upstream lndex quirk (positions 225/226 carry 277/278) is reported.
    assert len(manifest.warnings) == 2
    assert "data row 225 carries lndex '277'" in manifest.warnings[0]
    assert "data row 226 carries lndex '278'" in manifest.warnings[1]
    assert set(manifest.source_hashes) == {"Questions.csv", "Questions-llava.csv"}
    groups = [it.group for it in manifest.items]
    assert groups == [slug for slug in CATEGORY_ORDER for _ in range(15)]
    item = manifest.by_id()["91"]  # pair 91 = first pair of block 6 (Structural Character)
    assert item.images == (f"{folder}/Structural Character/181.jpg", f"{folder}/Structural Character/182.jpg")
    assert item.texts == (
        "a photo of structural character first statement 181",
        "a photo of structural character second statement 182",
    )
    assert item.meta["category"] == "structural_character"
    assert item.meta["category_name"] == "Structural Characteristics"
    assert item.meta["type"] == "Structural Character"
    assert item.meta["question_ids"] == [181, 182]
    assert item.meta["questions"] == ["Is it pair 91?"] * 2
    assert item.meta["answers"] == ["(a)", "(b)"]
    assert manifest.by_id()["113"].meta["llava_indices"] == ["277", "278"]  # data rows 225/226
    assert manifest.by_id()["12"].meta["options"] == [" (a) Basket (b) Ground"] * 2  # leading space kept
    assert CATEGORY_NAMES["camera_perspective"] == "Viewpoint and Perspective"


def test_mmvp_vlm_without_llava_file_and_small_subset(tmp_path):
    rows = vlm_rows(pairs_per_type=1, types=("Color", "Text"))
    manifest = load_mmvp_vlm(write_mmvp_vlm(tmp_path / "vlm", rows=rows, llava=False))
    assert len(manifest) == 2 and [it.group for it in manifest.items] == ["color", "text"]
    assert "questions" not in manifest.items[0].meta
    assert len(size_warnings(manifest)) == 2 and len(manifest.warnings) == 2
    with pytest.raises(
        ManifestError, match=r"Questions\.csv rows: 4 found, published size is 270 \(--strict-sizes\)"
    ):
        load_mmvp_vlm(tmp_path / "vlm", strict_sizes=True)


def _vlm_rows_with(
    changes: dict[int, tuple[str, str, str]], pairs_per_type: int = 1
) -> list[tuple[str, str, str]]:
    rows = vlm_rows(pairs_per_type=pairs_per_type)
    for index, row in changes.items():
        rows[index] = row
    return rows


@pytest.mark.parametrize(
    ("rows", "kwargs", "pattern"),
    [
        (
            _vlm_rows_with({2: ("3", "Shape", "x"), 3: ("4", "Shape", "y")}),
            {},
            r"Questions\.csv: data row 3 \(Question ID 3\): unknown Type 'Shape'",
        ),
        (
            _vlm_rows_with({3: ("4", "Color", "y")}),
            {},
            r"Questions\.csv: data row 4 \(Question ID 4\): Type 'Color' differs from 'Presence' of data "
            r"row 3",
        ),
        (
            vlm_rows(pairs_per_type=1)[:-1],
            {},
            r"Questions\.csv: data row 17 \(Question ID 17\): 17 data rows, an odd number",
        ),
        (
            vlm_rows(pairs_per_type=1),
            {"skip_images": ["6"]},
            r"Questions\.csv: data row 6 \(Question ID 6\): image 'MLLM_VLM Images/State/6\.jpg' not found",
        ),
        (
            vlm_rows(pairs_per_type=1),
            {"statements_header": "Question ID,Category,Statement"},
            r"Questions\.csv: header .* does not match",
        ),
        (
            vlm_rows(pairs_per_type=1),
            {"llava_header": "Index,Question,Options,Correct Answer"},
            r"Questions-llava\.csv: header .* does not match",
        ),
        (
            _vlm_rows_with({1: ("../../x", "Orientation", "y")}),
            {},
            r"Questions\.csv: data row 2: Question ID '\.\./\.\./x' is not a decimal integer",
        ),
        # Full size, but pairs 1 and 16 trade Types: the row-block rule (pair // 15) disagrees with Type.
        (
            _vlm_rows_with(
                {
                    0: ("1", "Presence", "a"),
                    1: ("2", "Presence", "b"),
                    30: ("31", "Orientation", "c"),
                    31: ("32", "Orientation", "d"),
                },
                pairs_per_type=15,
            ),
            {},
            r"Questions\.csv: data row 1 \(Question ID 1\): Type 'Presence' .* row-block rule, which puts "
            r"pair 1 in 'orientation'",
        ),
    ],
)
def test_mmvp_vlm_malformed_inputs_name_file_and_row(tmp_path, rows, kwargs, pattern):
    root = write_mmvp_vlm(tmp_path / "vlm", rows=rows, **kwargs)
    with pytest.raises(ManifestError, match=pattern):
        load_mmvp_vlm(root)


def test_mmvp_vlm_llava_row_count_must_match(tmp_path):
    root = write_mmvp_vlm(tmp_path / "vlm", rows=vlm_rows(pairs_per_type=1))
    write_csv(root / "Questions-llava.csv", LLAVA_HEADER, [("1", "Q?", "(a) A (b) B", "(a)")])
    with pytest.raises(
        ManifestError, match=r"Questions-llava\.csv: 1 data rows, but .*Questions\.csv has 18"
    ):
        load_mmvp_vlm(root)


def test_mmvp_vlm_row_block_rule_skipped_for_smaller_files(tmp_path):
    rows = vlm_rows(pairs_per_type=1, types=tuple(reversed(VLM_TYPES)))
    manifest = load_mmvp_vlm(write_mmvp_vlm(tmp_path / "vlm", rows=rows))
    assert [it.group for it in manifest.items] == list(reversed(CATEGORY_ORDER))


# ---------------------------------------------------------------- metric


def hand_manifest(benchmark: str = "mmvp") -> Manifest:
    items = tuple(
        Item(
            item_id=str(k),
            images=(f"{2 * k - 1}.jpg", f"{2 * k}.jpg"),
            texts=("a photo of x", "a photo of y"),
            group="color" if benchmark == "mmvp_vlm" else "",
            meta={"question_ids": [2 * k - 1, 2 * k]},
        )
        for k in range(1, 6)
    )
    return Manifest(benchmark, "/data", items)


# S[image][text]. Pair 1 clean; 2 ties on t0; 3 ties on t1; 4 ties on t1 with t0 wrong; 5 all equal.
HAND_GRIDS = {
    "1": [[0.9, 0.1], [0.2, 0.8]],
    "2": [[0.5, 0.3], [0.5, 0.7]],
    "3": [[0.9, 0.4], [0.1, 0.4]],
    "4": [[0.2, 0.6], [0.7, 0.6]],
    "5": [[0.3, 0.3], [0.3, 0.3]],
}


@pytest.mark.parametrize(
    ("policy", "individual", "pairs"),
    [
        # strict: ties are wrong. t-correct per pair: 2, 1, 1, 0, 0; pairs: 1.
        ("strict", 4, 1),
        # argmax_first: a tie picks i0 (right for t0, wrong for t1): 2, 2, 1, 0, 1; pairs 1, 2.
        ("argmax_first", 6, 2),
        # mmvp_reference: a tie picks i1 (wrong for t0, right for t1): 2, 1, 2, 1, 1; pairs 1, 3.
        ("mmvp_reference", 7, 2),
    ],
)
def test_tie_policies_on_hand_computed_grids(policy, individual, pairs):
    manifest = hand_manifest()
    ids, images, texts, scores = [], [], [], []
    for iid, grid in HAND_GRIDS.items():
        for i in range(2):
            for t in range(2):
                ids.append(iid), images.append(i), texts.append(t), scores.append(grid[i][t])
    grids = build_score_grids(manifest, scores_table(ids, images, texts, scores))
    report = compute_mmvp(manifest, grids, tie_policy=policy)
    assert report.metrics == {"pair_acc": pairs / 5, "individual_acc": individual / 10}
    assert report.chance == {"pair_acc": 0.25, "individual_acc": 0.5}
    assert (
        report.counts["individual_acc/correct"] == individual and report.counts["individual_acc/total"] == 10
    )
    assert report.counts["pair_acc/correct"] == pairs and report.counts["pair_acc/total"] == 5
    assert report.counts["ties"] == 5 and report.counts["errata_pairs"] == 0
    assert report.tie_policy == policy


def test_mmvp_vlm_hand_grids_add_category_keys():
    report = compute_mmvp(hand_manifest("mmvp_vlm"), HAND_GRIDS, tie_policy="mmvp_reference")
    assert report.metrics == {
        "pair_acc": 0.4,
        "individual_acc": 0.7,
        "color/pair_acc": 0.4,
        "color/individual_acc": 0.7,
    }
    assert report.chance["color/pair_acc"] == 0.25 and report.chance["color/individual_acc"] == 0.5


# ---------------------------------------------------------------- mmvp_reference: the reference's float32 softmax


def near_tie_grids(base: float, relative_gaps=(0.0, 1e-9, 1e-7, 1e-3)) -> dict[str, np.ndarray]:
    """2x2 grids S[image][text] around ``base``: each text's gold image above, below or equal to the other one by
    each relative gap, on t0 and t1, with the other text clean or also near a tie."""
    grids = {}
    for gap in relative_gaps:
        for sign in (1.0, -1.0):
            for other in (0.5, gap):
                hi, lo = base * (1 + sign * gap), base
                other_hi, other_lo = base * (1 + other), base
                grids[str(len(grids) + 1)] = np.array([[hi, other_lo], [lo, other_hi]])  # t0: i0 vs i1
                grids[str(len(grids) + 1)] = np.array([[other_hi, lo], [other_lo, hi]])  # t1: i1 vs i0
    return grids


def reference_decisions(grid: np.ndarray, logit_scale: float) -> tuple[list[int], list[float]]:
    """The reference's eval_MMVP written out: logits_per_text = float32(scale * S)^T (text x image), a torch
    softmax over the images, then predict image 0 iff P(image 0) > 0.5. Returns (predicted image, P) per text."""
    import torch

    logits_per_text = torch.tensor(np.float32(logit_scale * np.asarray(grid, dtype=np.float64).T))
    probs = logits_per_text.softmax(dim=-1)  # (text, image), float32 on the CPU
    assert probs.dtype == torch.float32
    p0 = [float(probs[t][0]) for t in range(2)]
    return [0 if p > 0.5 else 1 for p in p0], p0


@pytest.mark.parametrize(
    ("logit_scale", "base"),
    [(100.0, 0.3), (100.0, 0.2999), (1.0, 1e-4), (1.0, 3e-3), (1.0, 0.25), (1.0, 0.9)],
)
def test_mmvp_reference_equals_the_float32_softmax_on_near_ties(logit_scale, base):
    grids = near_tie_grids(base)
    items = tuple(Item(k, (f"{k}a.jpg", f"{k}b.jpg"), ("x", "y"), meta={"question_ids": [1, 2]}) for k in grids)
    manifest = Manifest("mmvp", "/data", items)
    expected_texts = expected_pairs = expected_ties = 0
    for item in items:
        grid = grids[item.item_id]
        predicted, p0 = reference_decisions(grid, logit_scale)
        correct = [predicted[t] == t for t in (0, 1)]  # gold: t0 <-> i0, t1 <-> i1
        exact = [0 if grid[0][t] > grid[1][t] else 1 for t in (0, 1)]  # the float64 comparison
        ties = sum(predicted[t] != exact[t] or p0[t] == 0.5 for t in (0, 1))
        # every decision: one item at a time
        one = compute_mmvp(Manifest("mmvp", "/data", (item,)), grids, tie_policy="mmvp_reference",
                           logit_scale=logit_scale)
        assert one.counts["individual_acc/correct"] == sum(correct), (item.item_id, grid.tolist(), p0)
        assert one.counts["pair_acc/correct"] == int(all(correct)) and one.counts["ties"] == ties
        expected_texts += sum(correct)
        expected_pairs += int(all(correct))
        expected_ties += ties
    report = compute_mmvp(manifest, grids, tie_policy="mmvp_reference", logit_scale=logit_scale)
    assert report.counts["individual_acc/correct"] == expected_texts
    assert report.counts["pair_acc/correct"] == expected_pairs and report.counts["ties"] == expected_ties
    # The float32 rule is not the exact comparison: at least one near-tie flips, and it is counted as a tie.
    exact_report = compute_mmvp(manifest, grids, tie_policy="strict")
    assert report.counts["individual_acc/correct"] != exact_report.counts["individual_acc/correct"]
    assert report.counts["ties"] > exact_report.counts["ties"]


def test_mmvp_reference_float32_decision_differs_from_the_exact_comparison():
    """Hand-checked cases: gaps below float32 resolution of scale * score become ties that go to image 1."""
    grids = {  # t0 is decided between S[0][0] and S[1][0]; t1 is clean
        "1": np.array([[0.3 * (1 + 1e-9), 0.1], [0.3, 0.9]]),  # 30 +- 3e-8 < one float32 ulp (1.9e-6): tie
        "2": np.array([[0.3 * (1 + 1e-3), 0.1], [0.3, 0.9]]),  # resolved
        # scale 1: distinct float32 scores 1e-9 apart, but exp(-1e-9) rounds to 1 in float32, so P = 0.5 exactly
        "3": np.array([[1e-4 * (1 + 1e-5), 0.1], [1e-4, 0.9]]),
    }
    manifest = Manifest("mmvp", "/d", tuple(Item(k, ("a", "b"), ("x", "y")) for k in grids))
    cosine = compute_mmvp(Manifest("mmvp", "/d", manifest.items[:2]), grids, tie_policy="mmvp_reference",
                          logit_scale=100.0)
    assert cosine.counts["individual_acc/correct"] == 3 and cosine.counts["ties"] == 1  # item 1's t0 is lost
    probability = compute_mmvp(Manifest("mmvp", "/d", manifest.items[2:]), grids, tie_policy="mmvp_reference")
    assert reference_decisions(grids["3"], 1.0)[1][0] == 0.5
    assert probability.counts["individual_acc/correct"] == 1 and probability.counts["ties"] == 1
    # The same scores with the cosine factor are resolved (100 x 1e-9 = 1e-7: exp(-1e-7) < 1 in float32).
    scaled = compute_mmvp(Manifest("mmvp", "/d", manifest.items[2:]), grids, tie_policy="mmvp_reference",
                          logit_scale=100.0)
    assert scaled.counts["individual_acc/correct"] == 2 and scaled.counts["ties"] == 0
    assert compute_mmvp(manifest, grids).counts["individual_acc/correct"] == 6  # strict: the exact comparison
    with pytest.raises(MetricError, match="logit_scale"):
        compute_mmvp(manifest, grids, tie_policy="mmvp_reference", logit_scale=0.0)


def test_compute_metrics_passes_the_logit_scale_only_to_mmvp_reference():
    from perceive_ray.metrics.compute import compute_metrics

    manifest = Manifest("mmvp", "/d", (Item("1", ("a", "b"), ("x", "y")), Item("2", ("c", "d"), ("z", "w"))))
    grids = {"1": [[1e-4 * (1 + 1e-5), 0.1], [1e-4, 0.9]], "2": [[0.9, 0.1], [0.2, 0.8]]}
    ids, images, texts, scores = [], [], [], []
    for iid, grid in grids.items():
        for i in range(2):
            for t in range(2):
                ids.append(iid), images.append(i), texts.append(t), scores.append(grid[i][t])
    table = scores_table(ids, images, texts, scores)
    by_scale = {scale: compute_metrics(manifest, table, tie_policy="mmvp_reference", mmvp_logit_scale=scale)
                for scale in (1.0, 100.0)}
    assert by_scale[1.0].counts["individual_acc/correct"] == 3 and by_scale[1.0].counts["ties"] == 1
    assert by_scale[100.0].counts["individual_acc/correct"] == 4 and by_scale[100.0].counts["ties"] == 0
    strict = compute_metrics(manifest, table, mmvp_logit_scale=100.0)  # ignored by the other policies
    assert strict.counts["individual_acc/correct"] == 4


def test_registry_mmvp_logit_scales_follow_the_reference_scripts():
    from perceive_ray import registry

    # eval_clip / eval_pacl / eval_llm2pacl multiply by 100; eval_vqa_score, eval_sparc and VLM2Vec/eval_llava15
    # softmax the raw scores; LLM2CLIP has no MMVP path in the reference ([U]: 100 like its other scripts).
    expected = {"clip_cosine": 100.0, "vqascore": 1.0, "vlm2vec": 1.0, "llm2clip": 100.0, "pacl": 100.0,
                "pacl_rope": 100.0, "sparc": 1.0, "sparc_rope": 1.0, "pacl_llm_text": 100.0}
    assert {name: registry.scorer(name).mmvp_logit_scale for name in expected} == expected


def test_errata_switch_on_full_size_mmvp(tmp_path):
    manifest = load_mmvp(write_mmvp(tmp_path / "mmvp"))
    # Planted: every pair right under the original labels except 50 and 140, which are right only if swapped.
    grids = diagonal_grids(manifest, flip=frozenset({"50", "140"}))
    original = compute_mmvp(manifest, grids)
    assert original.counts["pair_acc/correct"] == 148 and original.counts["pair_acc/total"] == 150
    assert original.counts["individual_acc/correct"] == 296 and original.counts["individual_acc/total"] == 300
    assert original.counts["errata_pairs"] == 0 and original.notes == []
    corrected = compute_mmvp(manifest, grids, label_errata="corrected")
    assert corrected.metrics == {"pair_acc": 1.0, "individual_acc": 1.0}
    assert corrected.counts["errata_pairs"] == 2
    assert corrected.label_errata == "corrected"
    assert "pair(s) 50, 140" in corrected.notes[0]
    # All-diagonal scores: the switch now costs exactly those two pairs.
    plain = diagonal_grids(manifest)
    assert compute_mmvp(manifest, plain).metrics["pair_acc"] == 1.0
    assert compute_mmvp(manifest, plain, label_errata="corrected").counts["pair_acc/correct"] == 148


def test_errata_with_ties_follow_the_swapped_ground_truth(tmp_path):
    manifest = load_mmvp(write_mmvp(tmp_path / "mmvp"))
    grids = diagonal_grids(manifest)
    grids["50"] = np.full((2, 2), 0.5)
    # mmvp_reference sends ties to i1: original t1 right; swapped, t0 (gold i1) right and t1 (gold i0) wrong.
    for errata in ("original", "corrected"):
        report = compute_mmvp(manifest, grids, tie_policy="mmvp_reference", label_errata=errata)
        assert report.counts["ties"] == 2
        assert report.counts["individual_acc/correct"] == (299 if errata == "original" else 297)
    # argmax_first sends ties to i0: swapped, t1 (gold i0) right.
    report = compute_mmvp(manifest, grids, tie_policy="argmax_first", label_errata="corrected")
    assert report.counts["individual_acc/correct"] == 297


def test_errata_found_by_question_ids_in_a_subset():
    items = (
        Item("1", ("99.jpg", "100.jpg"), ("a", "b"), meta={"question_ids": [99, 100]}),
        Item("2", ("1.jpg", "2.jpg"), ("c", "d"), meta={"question_ids": [1, 2]}),
    )
    grids = {"1": np.array([[0.1, 0.9], [0.8, 0.2]]), "2": np.array([[0.9, 0.1], [0.2, 0.8]])}
    report = compute_mmvp(Manifest("mmvp", "/d", items), grids, label_errata="corrected")
    assert report.metrics["pair_acc"] == 1.0 and report.counts["errata_pairs"] == 1
    none = compute_mmvp(Manifest("mmvp", "/d", items[1:]), grids, label_errata="corrected")
    assert none.counts["errata_pairs"] == 0 and "no errata pair" in none.notes[0]


def test_full_size_mmvp_vlm_denominators_and_category_mean(tmp_path):
    manifest = load_mmvp_vlm(write_mmvp_vlm(tmp_path / "vlm"))
    rng = np.random.default_rng(0)
    grids = {it.item_id: rng.random((2, 2)) for it in manifest.items}
    report = compute_mmvp(manifest, grids)
    assert report.counts["pair_acc/total"] == 135 and report.counts["individual_acc/total"] == 270
    for slug in CATEGORY_ORDER:
        assert report.counts[f"{slug}/pair_acc/total"] == 15
        assert report.counts[f"{slug}/individual_acc/total"] == 30
        assert report.chance[f"{slug}/pair_acc"] == 0.25
    assert len(report.metrics) == 2 + 2 * 9
    per_category = [report.metrics[f"{slug}/pair_acc"] for slug in CATEGORY_ORDER]
    assert np.mean(per_category) == pytest.approx(report.metrics["pair_acc"])
    assert 0 < report.metrics["pair_acc"] < 1
    # MMVP-VLM has no errata: corrected is identical, with a note.
    corrected = compute_mmvp(manifest, grids, label_errata="corrected")
    assert corrected.metrics == report.metrics and corrected.counts["errata_pairs"] == 0
    assert "changes nothing for MMVP-VLM" in corrected.notes[0]


def test_planted_per_category_values(tmp_path):
    manifest = load_mmvp_vlm(write_mmvp_vlm(tmp_path / "vlm"))
    # Category c (0-based) gets its first c pairs wrong: pair accuracy (15 - c) / 15.
    flip = frozenset(it.item_id for k, it in enumerate(manifest.items) if k % 15 < k // 15)
    report = compute_mmvp(manifest, diagonal_grids(manifest, flip))
    for c, slug in enumerate(CATEGORY_ORDER):
        assert report.counts[f"{slug}/pair_acc/correct"] == 15 - c
        assert report.metrics[f"{slug}/individual_acc"] == (15 - c) / 15
    assert report.counts["pair_acc/correct"] == sum(15 - c for c in range(9)) == 99


def test_metric_rejects_bad_inputs():
    manifest = hand_manifest()
    with pytest.raises(MetricError, match="unknown tie_policy 'lenient'"):
        compute_mmvp(manifest, HAND_GRIDS, tie_policy="lenient")
    with pytest.raises(MetricError, match="unknown label_errata"):
        compute_mmvp(manifest, HAND_GRIDS, label_errata="fixed")
    with pytest.raises(MetricError, match="not 'winoground'"):
        compute_mmvp(Manifest("winoground", "/d", manifest.items), HAND_GRIDS)
    with pytest.raises(MetricError, match=r"item '1': score grid has shape \(1, 2\)"):
        compute_mmvp(manifest, {**HAND_GRIDS, "1": [[0.1, 0.2]]})
    with pytest.raises(MetricError, match="item '2': NaN"):
        compute_mmvp(manifest, {**HAND_GRIDS, "2": [[np.nan, 0.2], [0.1, 0.3]]})
    with pytest.raises(MetricError, match="no scores for item '5'"):
        compute_mmvp(manifest, {k: v for k, v in HAND_GRIDS.items() if k != "5"})


def test_registry_resolves_mmvp_entries():
    from perceive_ray import registry

    assert registry.resolve("benchmarks", "mmvp") is load_mmvp
    assert registry.resolve("benchmarks", "mmvp_vlm") is load_mmvp_vlm
    assert registry.resolve_metric("mmvp") is compute_mmvp
    assert registry.resolve_metric("mmvp_vlm") is compute_mmvp
    assert mmvp_statement(249).endswith(" ")
