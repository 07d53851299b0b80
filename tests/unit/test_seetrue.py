"""SeeTRUE adapter, the rank-based ROC-AUC and the per-source SeeTRUE metric with NaN exclusion by item id."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from perceive_ray import registry
from perceive_ray.data.benchmarks.seetrue import load_seetrue
from perceive_ray.data.manifest import Item, Manifest, ManifestError
from perceive_ray.metrics.auc import compute_auc_counts, compute_roc_auc, compute_seetrue
from perceive_ray.metrics.base import MetricError
from perceive_ray.metrics.scores import build_score_grids, scores_table
from tests.fixtures.pairs_files import SEETRUE_HEADER, write_csv, write_image, write_seetrue


def seetrue_manifest(rows: list[tuple[int, str]]) -> Manifest:
    """Items '0'..'n-1' from (label, source) rows."""
    items = [
        Item(item_id=str(i), images=(f"images/{i}.jpg",), texts=(f"t{i}",), subset=src, label=label)
        for i, (label, src) in enumerate(rows)
    ]
    return Manifest("seetrue", "/nonexistent", tuple(items))


def grids_for(manifest: Manifest, scores: list[float]):
    ids = [it.item_id for it in manifest.items]
    return build_score_grids(manifest, scores_table(ids, [0] * len(ids), [0] * len(ids), scores))


def brute_force_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


# --- ROC-AUC ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scores", "labels", "expected", "ties"),
    [
        ([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0], 3 / 4, 0),  # pos {.9,.4} vs neg {.5,.1}: .4 loses to .5
        ([0.5, 0.7, 0.5, 0.2, 0.7], [1, 1, 0, 0, 0], 2 / 3, 2),  # W=3, T=2 over 6 pairs: (3 + 1) / 6
        ([1.0, 1.0, 1.0], [1, 0, 0], 0.5, 2),  # all tied
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0, 0),
        ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0, 0),
    ],
)
def test_auc_hand_values(scores, labels, expected, ties):
    counts = compute_auc_counts(scores, labels)
    assert counts.value == pytest.approx(expected) and counts.ties == ties
    assert compute_roc_auc(scores, labels) == pytest.approx(expected)


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 5, n).astype(float)  # few distinct values -> many ties
        labels = np.array([0, 1] + rng.integers(0, 2, n - 2).tolist())
        assert compute_roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auc_refuses_bad_input():
    with pytest.raises(MetricError, match="undefined"):
        compute_roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(MetricError, match="NaN"):
        compute_roc_auc([0.1, math.nan], [1, 0])
    with pytest.raises(MetricError, match="0 or 1"):
        compute_roc_auc([0.1, 0.2], [1, 2])


# --- metric -------------------------------------------------------------------------------------------------
def test_seetrue_per_source_auc_and_counts():
    rows = [(1, "A"), (1, "A"), (0, "A"), (0, "A"), (1, "B"), (0, "B"), (0, "B"), (1, "C"), (1, "C")]
    scores = [0.9, 0.4, 0.5, 0.1, 0.3, 0.3, 0.1, 0.2, 0.7]
    manifest = seetrue_manifest(rows)
    report = compute_seetrue(manifest, grids_for(manifest, scores))
    assert report.metrics == {
        "A/roc_auc": pytest.approx(3 / 4),
        "B/roc_auc": pytest.approx(3 / 4),
    }  # B: (1 + .5)/2
    assert report.chance == {"A/roc_auc": 0.5, "B/roc_auc": 0.5}
    c = report.counts
    assert (c["A/n"], c["A/n_pos"], c["A/n_neg"]) == (4, 2, 2)
    assert (c["B/n"], c["B/n_pos"], c["B/n_neg"]) == (3, 1, 2)
    assert (c["C/n"], c["C/n_pos"], c["C/n_neg"]) == (2, 2, 0)  # one class: counts only, no AUC
    assert c["B/roc_auc/correct"] == 3 and c["B/roc_auc/total"] == 4  # half-pairs: 2W + T over 2PN
    assert c["ties"] == 1 and c["nan_excluded"] == 0 and c["items"] == 9
    assert "C/roc_auc" not in report.metrics and any("seetrue C: no ROC-AUC" in n for n in report.notes)
    # tie_policy does not change an AUC but is recorded; mmvp_reference is refused.
    other = compute_seetrue(manifest, grids_for(manifest, scores), tie_policy="argmax_first")
    assert other.metrics == report.metrics and other.tie_policy == "argmax_first"
    with pytest.raises(MetricError, match="MMVP only"):
        compute_seetrue(manifest, grids_for(manifest, scores), tie_policy="mmvp_reference")
    assert registry.resolve_metric("seetrue") is compute_seetrue


def test_nan_excluded_by_item_id_keeps_alignment():
    rows = [(1, "A"), (0, "A"), (1, "A"), (0, "A"), (1, "A"), (0, "A"), (1, "B"), (0, "B")]
    scores = [0.9, 0.1, math.nan, 0.8, 0.7, 0.2, 0.6, 0.4]
    manifest = seetrue_manifest(rows)
    grids = grids_for(manifest, scores)
    assert grids.nan_items == ("2",)
    report = compute_seetrue(manifest, grids, max_nan_fraction=0.2)
    # A without item 2: pos {.9, .7} vs neg {.1, .8, .2} -> 5 of 6 pairs won. Compacting the scores and
    # indexing them with the original rows (the reference) would pair item 3's label with item 4's score and
    # so on.
    assert report.metrics["A/roc_auc"] == pytest.approx(5 / 6)
    assert report.metrics["B/roc_auc"] == 1.0
    c = report.counts
    assert (c["A/n"], c["A/n_pos"], c["A/n_neg"], c["A/nan_excluded"]) == (5, 2, 3, 1)
    assert c["B/nan_excluded"] == 0 and c["nan_excluded"] == 1
    misaligned = compute_roc_auc([0.9, 0.1, 0.8, 0.7, 0.2, 0.6], [1, 0, 1, 0, 1, 0])
    assert misaligned != pytest.approx(5 / 6)


def test_nan_fraction_limit():
    manifest = seetrue_manifest([(1, "A"), (0, "A"), (1, "A"), (0, "A")])
    grids = grids_for(manifest, [0.9, math.nan, 0.2, math.nan])
    with pytest.raises(MetricError, match=r"2 of 4 item\(s\) have NaN scores.*'1', '3'"):
        compute_seetrue(manifest, grids)  # default max_nan_fraction = 0.0
    with pytest.raises(MetricError, match="max_nan_fraction 0.25"):
        compute_seetrue(manifest, grids, max_nan_fraction=0.25)
    report = compute_seetrue(manifest, grids, max_nan_fraction=0.5)
    assert (
        "A/roc_auc" not in report.metrics and report.counts["A/n"] == 2 and report.counts["nan_excluded"] == 2
    )
    with pytest.raises(MetricError, match=r"in \[0, 1\]"):
        compute_seetrue(manifest, grids, max_nan_fraction=1.5)


# --- adapter ------------------------------------------------------------------------------------------------
def test_load_seetrue(tmp_path):
    manifest = load_seetrue(write_seetrue(tmp_path))
    assert [i.item_id for i in manifest.items] == ["0", "1", "2", "3"]
    second = manifest.items[1]
    assert second.images == ("images/SNLI-VE_1.jpg",) and second.texts == ('a cat, "sitting"',)
    assert (second.label, second.subset, second.meta) == (0, "SNLI-VE", {"original_dataset_id": "orig-1"})
    assert manifest.source_hashes.keys() == {"SeeTRUE.csv"} and manifest.warnings == ()
    ref = load_seetrue(write_seetrue(tmp_path / "reference", image_dir="seetrue/images"))
    assert ref.items[0].images == ("seetrue/images/SNLI-VE_0.jpg",)


def test_load_seetrue_malformed(tmp_path):
    root = write_seetrue(tmp_path / "label")
    write_csv(
        root / "SeeTRUE.csv",
        SEETRUE_HEADER,
        [("SNLI-VE_0.jpg", "x", "1", "o", "SNLI-VE"), ("SNLI-VE_1.jpg", "y", "2", "o", "SNLI-VE")],
    )
    with pytest.raises(ManifestError, match=r"SeeTRUE\.csv: row 1: label must be 0 or 1, got '2'"):
        load_seetrue(root)

    root = write_seetrue(tmp_path / "header")
    write_csv(root / "SeeTRUE.csv", ("image", "text", "label", "source"), [("SNLI-VE_0.jpg", "x", "1", "S")])
    with pytest.raises(
        ManifestError, match=r"SeeTRUE\.csv: header .* lacks column\(s\) \['dataset_source'\]"
    ):
        load_seetrue(root)

    root = write_seetrue(tmp_path / "missing")
    (root / "images" / "DrawBench_3.jpg").unlink()
    with pytest.raises(
        ManifestError, match=r"SeeTRUE\.csv: row 3: image 'images/DrawBench_3\.jpg' not found"
    ):
        load_seetrue(root)

    root = write_seetrue(tmp_path / "escape")
    write_image(root / "secret.jpg")
    write_csv(root / "SeeTRUE.csv", SEETRUE_HEADER, [("../secret.jpg", "x", "1", "o", "S")])
    with pytest.raises(
        ManifestError, match=r"SeeTRUE\.csv: row 0: image path '\.\./secret\.jpg' escapes images/"
    ):
        load_seetrue(root)

    root = write_seetrue(tmp_path / "row")
    (root / "SeeTRUE.csv").write_text(",".join(SEETRUE_HEADER) + "\nSNLI-VE_0.jpg,x,1,o\n", encoding="utf-8")
    with pytest.raises(
        ManifestError,
        match=r"SeeTRUE\.csv: row 0 \(line 2\): 4 fields, header has 5; no value for column\(s\) dataset_source",
    ):
        load_seetrue(root)
