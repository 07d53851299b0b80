"""`perceive-ray train` from the command line: the LLaVA stage chain by run id, then the eval of train:<run id>; bad
input fails with exit 2 before any worker starts. (A training run's own MLflow run: tests/ray/test_training.py; a
killed training driver resumed to the uninterrupted run's weights: tests/e2e/test_sweep.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
ENV = os.environ | {"RAY_DISABLE_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "perceive_ray", *args]


def run(workdir: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    done = subprocess.run(cli(*args), cwd=workdir, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.mark.parametrize("override, message", [
    ("train.batch.global=7", "train.batch.global"),
    ("train.loss.kind=pacl", "train.loss.kind"),
    ("train.optim.lrr=1", "train.optim.lrr"),
    ("data.sources.0.path=missing.json", "missing.json"),
    ("resources.cpus_per_worker=64", "resources.cpus_per_worker"),  # checked against the started Ray's CPUs
])
def test_bad_input_exits_2_before_any_worker(tmp_path, override, message):
    done = subprocess.run(cli("train", str(REPO / "experiments/train/clip_negclip_lock.yaml"), "--smoke",
                              "--no-track", "--run-id", "bad", override), cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs/train/bad/ray").exists()  # no trainer started


def test_unreachable_tracking_server_exits_2_before_ray(tmp_path):
    from tests.fixtures.mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(cli("train", str(REPO / "experiments/train/clip_negclip_lock.yaml"), "--smoke", "--run-id",
                              "offline", f"tracking.uri={uri}", "tracking.timeout_s=2", "tracking.max_retries=0"),
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert uri in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs/train/offline/ray").exists()  # checked before Ray or any worker started


def test_llava_cls_stage1_then_stage2_then_vqascore_eval_chain_by_run_id(tmp_path):
    """PROTOCOLS §5.7 from the command line: stage 1 (assembled, cls) -> stage 2 (train:<stage 1>, LoRA, ZeRO-3) ->
    VQAScore eval of train:<stage 2> with one visual token."""
    for stage in ("projector", "lora"):
        run(tmp_path, "train", str(REPO / f"experiments/train/llava15_cls_{stage}.yaml"), "--smoke", "--no-track",
            "--run-id", f"llava15_cls_{stage}")
    export = tmp_path / "runs/train/llava15_cls_lora/export"
    config = json.loads((export / "config.json").read_text())
    assert config["mm_vision_select_feature"] == "cls" and config["image_seq_length"] == 1
    stage2 = (tmp_path / "runs/train/llava15_cls_lora/config.yaml").read_text()
    assert "runs/train/llava15_cls_projector/export" in stage2  # stage 2 started from stage 1 by run id
    eval_exp = str(REPO / "experiments/eval/llava15_lora_cls_whatsup.yaml")
    common = ["--smoke", "--no-track", "benchmarks=[{name: whatsup_controlled_a, root: synth/whatsup, limit: 4}]"]
    run(tmp_path, "eval", eval_exp, *common, "--run-id", "cls_trained", "model.source=train:llava15_cls_lora")
    table = pq.read_table(tmp_path / "runs/cls_trained/whatsup_controlled_a/scores.parquet")
    assert table.num_rows == 16 and all(0.0 <= s <= 1.0 for s in table.column("score").to_pylist())
    record = json.loads((tmp_path / "runs/cls_trained/run_record.json").read_text())
    assert "runs/train/llava15_cls_lora/export" in json.dumps(record)


def test_llava_sample_that_cannot_be_labelled_exits_2_naming_it(tmp_path):
    """A conversation whose labels cannot be built exactly (here: a 665K row with two <image> turns) is an error
    naming the file's row before any worker starts, never a silently all-masked row."""
    from perceive_ray.data.synthetic import ensure_generated

    ensure_generated(tmp_path / "synth", seed=0, pairs=4)
    rows = json.loads((tmp_path / "synth/llava/synthetic_mix665k.json").read_text())
    victim = next(i for i, r in enumerate(rows) if "image" in r and len(r["conversations"]) >= 4)
    rows[victim]["conversations"][2]["value"] += "\n<image>"
    (tmp_path / "bad_mix.json").write_text(json.dumps(rows))
    sources = (f"data.sources=[{{name: mix, path: {tmp_path / 'bad_mix.json'}, image_root: "
               f"{tmp_path / 'synth/llava/images'}, format: mix}}]")
    done = subprocess.run(cli("train", str(REPO / "experiments/train/llava15_patch_lora.yaml"), "--smoke", "--no-track",
                              "--run-id", "bad_labels", "model.source=runs/tiny/llava", sources),
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"row {victim}" in done.stderr and "bad_mix.json" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs/train/bad_labels/ray").exists()
