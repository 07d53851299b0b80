"""SugarCrepe adapter (7 subset files over COCO val2017) and its accuracy metric."""

from __future__ import annotations

import json

import pytest

from perceive_ray import registry
from perceive_ray.data.benchmarks.sugarcrepe import SUBSETS, load_sugarcrepe
from perceive_ray.data.manifest import Item, Manifest, ManifestError
from perceive_ray.metrics.base import MetricError
from perceive_ray.metrics.scores import build_score_grids, scores_table
from perceive_ray.metrics.sugarcrepe import compute_sugarcrepe
from tests.fixtures.pairs_files import SUGARCREPE_SIZES, write_image, write_sugarcrepe


def grids_for(manifest: Manifest, by_id: dict[str, tuple[float, float]]):
    """Grids from {item_id: (S[0][pos], S[0][neg])}."""
    ids, imgs, txts, vals = [], [], [], []
    for item_id, (pos, neg) in by_id.items():
        ids += [item_id, item_id]
        imgs += [0, 0]
        txts += [0, 1]
        vals += [pos, neg]
    return build_score_grids(manifest, scores_table(ids, imgs, txts, vals))


def item(item_id: str, subset: str) -> Item:
    return Item(item_id=item_id, images=("val2017/x.jpg",), texts=("pos", "neg"), subset=subset)


def test_subset_order_and_published_sizes():
    assert SUBSETS == (
        "add_obj",
        "add_att",
        "replace_obj",
        "replace_att",
        "replace_rel",
        "swap_obj",
        "swap_att",
    )
    assert sum(SUGARCREPE_SIZES.values()) == 7512


def test_load_small(tmp_path):
    manifest = load_sugarcrepe(write_sugarcrepe(tmp_path))
    assert [i.item_id for i in manifest.items[:3]] == ["add_obj/0", "add_obj/1", "add_att/0"]
    first = manifest.items[0]
    assert first.images == ("val2017/000000397133.jpg",)
    assert first.texts == ("add_obj positive 0", "add_obj negative 0") and first.subset == "add_obj"
    assert set(manifest.source_hashes) == {f"sugar_crepe/{s}.json" for s in SUBSETS}
    assert (
        len(manifest.warnings) == 7
        and manifest.warnings[0] == "sugarcrepe add_obj items: 2 found, published size is 2062"
    )
    with pytest.raises(ManifestError, match="strict-sizes"):
        load_sugarcrepe(tmp_path, strict_sizes=True)


def test_load_upstream_data_folder(tmp_path):
    manifest = load_sugarcrepe(write_sugarcrepe(tmp_path, annotation_dir="data"))
    assert len(manifest) == 14 and "data/swap_att.json" in manifest.source_hashes


def test_full_size_denominators(tmp_path):
    manifest = load_sugarcrepe(write_sugarcrepe(tmp_path, SUGARCREPE_SIZES, n_images=40), strict_sizes=True)
    assert len(manifest) == 7512 and manifest.warnings == ()
    # Every second item right: positive 1.0 vs negative 0.0, else reversed.
    grids = grids_for(
        manifest,
        {it.item_id: ((1.0, 0.0) if n % 2 == 0 else (0.0, 1.0)) for n, it in enumerate(manifest.items)},
    )
    report = compute_sugarcrepe(manifest, grids)
    assert report.counts["acc/total"] == 7512 and report.counts["acc/correct"] == 3756
    for subset, size in SUGARCREPE_SIZES.items():
        assert report.counts[f"{subset}/acc/total"] == size
    assert report.chance["acc"] == 0.5 and set(report.chance) == set(report.metrics)
    assert registry.resolve_metric("sugarcrepe") is compute_sugarcrepe


@pytest.mark.parametrize(("policy", "expected_correct"), [("strict", 2), ("argmax_first", 3)])
def test_metric_hand_cases_with_tie(policy, expected_correct):
    items = [
        item("add_obj/0", "add_obj"),
        item("add_obj/1", "add_obj"),
        item("swap_att/0", "swap_att"),
        item("swap_att/1", "swap_att"),
    ]
    manifest = Manifest("sugarcrepe", "/nonexistent", tuple(items))
    scores = {
        "add_obj/0": (0.7, 0.2),
        "add_obj/1": (0.4, 0.4),
        "swap_att/0": (0.3, 0.31),
        "swap_att/1": (2.0, -1.0),
    }
    report = compute_sugarcrepe(manifest, grids_for(manifest, scores), tie_policy=policy)
    assert report.counts["acc/correct"] == expected_correct and report.counts["acc/total"] == 4
    assert report.metrics["add_obj/acc"] == (1.0 if policy == "argmax_first" else 0.5)
    assert report.metrics["swap_att/acc"] == 0.5
    assert report.counts["ties"] == 1 and report.tie_policy == policy
    with pytest.raises(MetricError, match="MMVP only"):
        compute_sugarcrepe(manifest, grids_for(manifest, scores), tie_policy="mmvp_reference")


def test_malformed(tmp_path):
    root = write_sugarcrepe(tmp_path / "missing_file")
    (root / "sugar_crepe" / "swap_att.json").unlink()
    with pytest.raises(ManifestError, match=r"expected 'sugar_crepe/swap_att\.json'"):
        load_sugarcrepe(root)

    root = write_sugarcrepe(tmp_path / "missing_image")
    (root / "val2017" / "000000397134.jpg").unlink()
    with pytest.raises(
        ManifestError, match=r"add_obj\.json: key '1': image 'val2017/000000397134\.jpg' not found"
    ):
        load_sugarcrepe(root)

    root = write_sugarcrepe(tmp_path / "escape")
    write_image(root / "outside.jpg")
    path = root / "sugar_crepe" / "replace_rel.json"
    data = json.loads(path.read_text())
    data["1"]["filename"] = "../outside.jpg"
    path.write_text(json.dumps(data))
    with pytest.raises(
        ManifestError, match=r"replace_rel\.json: key '1': image path '\.\./outside\.jpg' escapes val2017/"
    ):
        load_sugarcrepe(root)

    root = write_sugarcrepe(tmp_path / "field")
    path = root / "sugar_crepe" / "add_att.json"
    data = json.loads(path.read_text())
    del data["0"]["negative_caption"]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"add_att\.json: key '0': expected an object with filename"):
        load_sugarcrepe(root)

    root = write_sugarcrepe(tmp_path / "array")
    (root / "sugar_crepe" / "add_obj.json").write_text("[]")
    with pytest.raises(ManifestError, match=r"add_obj\.json: expected a JSON object"):
        load_sugarcrepe(root)

    (tmp_path / "no_annotations").mkdir()
    with pytest.raises(ManifestError, match="'sugar_crepe', 'data'"):
        load_sugarcrepe(tmp_path / "no_annotations")
