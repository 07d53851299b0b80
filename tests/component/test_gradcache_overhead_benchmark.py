"""benchmarks/gradcache_overhead.py runs end to end with --quick (tiny LLaVA, one process, no Ray): the GradCache
gradient check passes inside the script, and the headline lines have their fixed format."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gradcache_overhead.py"
LAST_LINE = re.compile(r"^gradcache_vs_plain=(\d+\.\d{3})$")
CS4_LINE = re.compile(r"^gradcache_vs_plain_cs4=(\d+\.\d{3})$")


@pytest.mark.slow  # ~20 s on 2 cores: a tiny LLaVA written, 1 warm-up + 3 timed rounds of 3 arms
def test_quick_run_prints_the_ratio_lines(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    report = tmp_path / "gradcache.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "work"), "--json",
                           str(report)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) > 0
    cs4 = [m for m in map(CS4_LINE.match, lines) if m]
    assert len(cs4) == 1 and float(cs4[0].group(1)) > 0, lines[-3:]
    data = json.loads(report.read_text())
    tiny = data["timings"]["tiny"]
    assert tiny["gradient_check"]["ok"]  # GradCache gradients = the one-chunk step's (dropout 0, same weights)
    assert set(tiny["runs"]) == {"plain", "gc_cs1", "gc_cs4"}
    assert [tiny["runs"][arm][0]["chunks"] for arm in ("plain", "gc_cs1", "gc_cs4")] == [1, 8, 2]
    # one AdamW step per training step in every arm: warm-up (1 round) + 3 timed rounds, 3 arms each
    assert tiny["optimizer_steps"] == 4 * 3
    assert data["gradcache_vs_plain"] == pytest.approx(float(match.group(1)), abs=1e-3)
