"""A `perceive-ray eval` killed with SIGKILL mid-run, then resumed, equals an uninterrupted run row for row."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from perceive_ray.data.synthetic import generate
from perceive_ray.models.clip import save_tiny_clip

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def eval_command(workdir: Path, run_id: str) -> list[str]:
    whatsup = workdir / "synth" / "whatsup"
    return [sys.executable, "-m", "perceive_ray", "eval", str(REPO / "experiments" / "eval" / "clip_whatsup.yaml"),
            "--smoke", "--no-track", "--run-id", run_id,
            f"benchmarks=[{{name: whatsup_controlled_a, root: '{whatsup}'}}]", f"model.source={workdir / 'clip'}",
            f"output_dir={workdir / 'runs'}", "scorer.batch_size=2", "resources.num_cpus_per_actor=0.5"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    generate(tmp_path / "synth", seed=4, pairs=8)  # 32 images -> 16 shards of 2 rows
    save_tiny_clip(tmp_path / "clip")
    env = os.environ | {"RAY_DISABLE_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    shards = tmp_path / "runs" / "killed" / "whatsup_controlled_a" / "shards"
    process = subprocess.Popen(eval_command(tmp_path, "killed"), cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list(shards.glob("part-*.parquet"))) < 3:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shards appeared"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the run and the local Ray it started (its own session)
        process.wait()
    written = len(list(shards.glob("part-*.parquet")))
    assert not (shards.parent / "scores.parquet").exists(), "the run finished before the kill"

    resumed = subprocess.run(eval_command(tmp_path, "killed"), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "image rows already scored" in resumed.stderr
    fresh = subprocess.run(eval_command(tmp_path, "fresh"), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    def rows(run_id: str) -> list[dict]:
        path = tmp_path / "runs" / run_id / "whatsup_controlled_a" / "scores.parquet"
        return pq.read_table(path).select(["item_id", "image_index", "text_index", "score"]).to_pylist()

    assert len(rows("killed")) == 32 * 4
    assert rows("killed") == rows("fresh")  # same batch size: identical, row for row, no duplicates
    assert written < 16
