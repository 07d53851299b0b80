"""benchmarks/process_cpu.py: the CPU-seconds of the processes a command starts, by kind, and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BURN = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"


def test_counts_the_cpu_of_the_command_and_its_children_and_keeps_its_exit_code(tmp_path):
    child = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN!r}, 'child'])\n{BURN}sys.exit(3)\n"
    out = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/process_cpu.py"), "--out", str(out), "--",
                           sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    result = json.loads(out.read_text())
    assert result["rc"] == 3 and result["wall_s"] >= 1.2
    burners = [p for p in result["processes"] if p["title"].startswith(sys.executable)]
    assert len(burners) == 2 and all(p["cpu_s"] >= 0.5 for p in burners)  # the command and its child
    for p in burners:  # when each started, and its CPU-seconds over time (rising, within the run)
        assert 0 <= p["start_s"] <= result["wall_s"] + 1 and p["timeline"] and p["titles"] == [p["title"]]
        times, cpus = zip(*p["timeline"], strict=True)
        assert list(times) == sorted(times) and list(cpus) == sorted(cpus) and cpus[-1] <= p["cpu_s"]
    assert result["cpu_s"] >= 1.0 and sum(k["processes"] for k in result["kinds"]) == len(result["processes"])
    assert "[process_cpu] rc 3" in done.stderr
