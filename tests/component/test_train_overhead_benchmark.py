"""benchmarks/train_overhead.py runs end to end with --quick: its own local Ray (through run_train, in a child process)
and the plain loop; the headline lines have their fixed format. The unlocked run (checkpoint size only: the same Ray
arm with lock_image false) is left out here to keep the suite short (--arms ray,plain); its ratio is then nan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_overhead.py"
LAST_LINE = re.compile(r"^ray_vs_plain=\d+\.\d{3}$")
CHECKPOINT_LINE = re.compile(r"^checkpoint_lock_vs_full=nan$")


@pytest.mark.slow  # ~2 min on 2 cores: one Ray Train run (its own Ray) and the plain loop
@pytest.mark.benchmark_script  # make test-benchmarks (left out of make test for time)
def test_quick_run_prints_the_ratio_lines(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)  # the script's children start their own local Ray, never join another one
    report = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "work"), "--json",
                           str(report), "--arms", "ray,plain"], capture_output=True, text=True, timeout=900, env=env,
                          cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert LAST_LINE.match(lines[-1]), lines[-1]
    checkpoint = [m for m in map(CHECKPOINT_LINE.match, lines) if m]
    assert len(checkpoint) == 1, lines[-3:]
    data = json.loads(report.read_text())
    runs = data["runs"]
    assert set(runs) == {"ray_z2", "plain"}
    # the two arms did the same work: same samples, same initial weights, same loss at every step
    ray, plain = runs["ray_z2"][0], runs["plain"][0]
    ray_losses, plain_losses = dict(ray["losses"]), dict(plain["losses"])
    assert sorted(ray_losses) == sorted(plain_losses) == list(range(1, 7))
    assert all(abs(ray_losses[s] - plain_losses[s]) < 1e-4 for s in ray_losses)
    assert ray["steady"]["steps_per_s"] > 0 and plain["steady"]["steps_per_s"] > 0
    assert ray["checkpoint"]["bytes"] > 0
