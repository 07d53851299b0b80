"""The in-process runner and scoring rows, with a planted scorer (its job here is to plant a known answer)."""

from __future__ import annotations

import numpy as np
import pytest

from perceive_ray.config import ConfigError
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.images import ImageError, load_rgb, scoring_rows
from perceive_ray.data.synthetic import generate
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.scoring.base import ScoreRows, iter_rows
from perceive_ray.scoring.local import run_local
from perceive_ray.scoring.options import ScorerOptions, parse_options


class PlantedScorer:
    """Scores the true caption (text 0) highest; records the batches it saw."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append(len(batch["item_id"]))
        out = ScoreRows()
        for row in iter_rows(batch):
            assert row["image"].dtype == np.uint8 and row["image"].shape[2] == 3
            for t, _ in enumerate(row["texts"]):
                out.add(row["item_id"], row["image_index"], t, 1.0 if t == 0 else 0.0, n_texts=len(row["texts"]))
        return out.to_batch()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=1, pairs=2)
    return out


def test_rows_keep_all_candidates_of_an_image(synth):
    manifest = load_benchmark("mmvp_vlm", synth / "MMVP_VLM")
    rows = scoring_rows(manifest, limit=3)
    assert len(rows) == 6  # 3 pairs x 2 images
    assert rows[0]["item_id"] == rows[1]["item_id"] == "1" and [r["image_index"] for r in rows[:2]] == [0, 1]
    assert rows[0]["texts"] == list(manifest.items[0].texts) and rows[0]["benchmark"] == "mmvp_vlm"


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_run_local_planted_scores_give_perfect_metrics(synth, batch_size):
    manifest = load_benchmark("whatsup_controlled_a", synth / "whatsup")
    scorer = PlantedScorer()
    result = run_local(manifest, scorer, batch_size=batch_size)
    assert result.scores.num_rows == len(manifest) * 4 and result.errors == []
    assert max(scorer.batches) <= batch_size and sum(scorer.batches) == len(manifest)
    assert "n_texts" in result.scores.column_names
    report = compute_metrics(manifest, result.scores)
    assert report.metrics["4way/set_acc"] == 1.0


def test_corrupt_image_fails_or_is_recorded(synth, tmp_path):
    import shutil

    root = tmp_path / "whatsup"
    shutil.copytree(synth / "whatsup", root)
    manifest = load_benchmark("whatsup_controlled_a", root)
    victim = manifest.items[2]
    (root / victim.images[0]).write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match=f"{victim.images[0]}: cannot decode image"):
        run_local(manifest, PlantedScorer(), batch_size=4)
    result = run_local(manifest, PlantedScorer(), batch_size=4, on_error="record")
    assert [e["item_id"] for e in result.errors] == [victim.item_id]
    assert victim.item_id not in set(result.scores.column("item_id").to_pylist())
    assert result.scores.num_rows == (len(manifest) - 1) * 4


def test_load_rgb_npy_is_bgr(tmp_path):
    frame = np.zeros((2, 3, 3), np.uint8)
    frame[..., 0] = 255  # blue channel in OpenCV's BGR order
    np.save(tmp_path / "f.npy", frame)
    assert load_rgb(tmp_path, "f.npy")[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(ImageError, match="image not found"):
        load_rgb(tmp_path, "none.jpg")


def test_parse_options_names_the_key():
    class Options(ScorerOptions):
        mode: str = "t2v"

    assert parse_options(Options, {"mode": "p_yes"}, scorer="x").mode == "p_yes"
    with pytest.raises(ConfigError, match="scorer.options.mod: unknown option"):
        parse_options(Options, {"mod": "p_yes"}, scorer="x")
