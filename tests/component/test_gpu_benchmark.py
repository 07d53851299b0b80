"""benchmarks/gpu_whatsup.py runs end to end on a CPU with the tiny shape, and skips cleanly without CUDA."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_whatsup.py"
LAST_LINE = re.compile(r"^gpu_whatsup_ab_s=(\S+) shared_vs_naive=(\S+) gpu_busy=(\S+)$")


def run_script(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ADDRESS": "",
                   **(env or {})}
    environment.pop("RAY_ADDRESS")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=SCRIPT.parents[1])


def check_last_line(stdout: str) -> tuple[float, float, float]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    seconds, ratio, busy = (float(v) for v in match.groups())
    assert seconds > 0 and ratio > 0 and math.isnan(busy)  # no GPU sampling on the CPU
    return seconds, ratio, busy


def test_without_cuda_prints_one_line_and_exits_0():
    done = run_script(env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], done.stdout


def test_tiny_shape_on_cpu_in_process(tmp_path):
    done = run_script("--shape", "tiny", "--device", "cpu", "--pairs", "2", "--executor", "local",
                      "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    check_last_line(done.stdout)
    assert "max |score shared - score naive| over all rows" in done.stdout


@pytest.mark.slow
@pytest.mark.benchmark_script  # its own Ray (~40 s): make test-benchmarks; the in-process test above stays in make test
def test_tiny_shape_on_cpu_through_ray(tmp_path):
    done = run_script("--shape", "tiny", "--device", "cpu", "--pairs", "2", "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    check_last_line(done.stdout)
    assert "model_loads 1" in done.stdout
