"""`perceive-ray model tiny` + `perceive-ray score --smoke` on the real experiment files (one process, tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from perceive_ray.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_score_clip_experiment_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the smoke block's relative paths (synth/, runs/tiny/clip) resolve here
    assert main(["data", "synth", "--out", "synth", "--seed", "0", "--pairs", "3"]) == 0
    assert main(["model", "tiny", "clip", "--out", "runs/tiny/clip"]) == 0
    capsys.readouterr()
    experiment = REPO / "experiments" / "eval" / "clip_whatsup.yaml"
    assert main(["score", str(experiment), "--smoke", "--out", "out", "scorer.batch_size=3"]) == 0
    printed = capsys.readouterr().out
    assert "2way/set_acc" in printed and "6.25%" in printed
    for benchmark in ("whatsup_controlled_a", "whatsup_controlled_b"):
        scores = pq.read_table(tmp_path / "out" / benchmark / "scores.parquet")
        assert scores.num_rows == 8 * 4  # smoke limit: 8 items x 4 captions
        metrics = json.loads((tmp_path / "out" / benchmark / "metrics.json").read_text())
        assert metrics["items_scored"] == 8 and metrics["items_in_benchmark"] == 12
        assert metrics["counts"]["4way/individual_acc/total"] == 8
        assert 0.0 <= metrics["metrics"]["2way/individual_acc"] <= 1.0
    config = (tmp_path / "out" / "config.yaml").read_text()
    assert "batch_size: 3" in config and "runs/tiny/clip" in config


def test_score_fails_before_loading_on_bad_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    experiment = REPO / "experiments" / "eval" / "clip_whatsup.yaml"
    assert main(["model", "tiny", "clip", "--out", "runs/tiny/clip"]) == 0
    # A dataset root that does not exist: the dataset check fails before the model loads, naming the root.
    assert main(["score", str(experiment), "--smoke", "benchmarks.0.root=nowhere/whatsup"]) == 2
    err = capsys.readouterr().err
    assert "nowhere/whatsup" in err and "is not a directory" in err
    assert not (tmp_path / "runs" / "clip_vit_l14_336_whatsup").exists()
