"""Wall time and peak memory of `perceive-ray demo` (what `make demo` runs), as a user runs it.

Runs the demo as a subprocess and samples, every 0.5 s, the summed resident memory (RSS) of every process of the
run: the demo driver and all its descendants (Ray's GCS, raylet, workers, Train workers, Data actors). Shared pages
are counted once per process, so the sum over-states the true footprint: it is an upper bound. Also records the
machine's used memory (total - available) at the same instants, minus what was used before the demo started.

The machine's busy CPU-seconds over the run (user + nice + system + irq + softirq, all cores; steal and iowait
excluded) are recorded too, and, before the run, the host's speed: the CPU time of a fresh ``import torch``
(median of three, user + system of the child). On a 2-core VM the same run took 224-534 busy CPU-seconds on
different days; the probe says which kind of day a wall time came from (benchmarks/RESULTS.md §8).

    .venv/bin/python benchmarks/demo_resources.py [--quick] [--seed N] [--workdir DIR] [--out FILE.json]

The demo's own summary (table, verdicts) lands in <workdir>/demo_summary.json as usual.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


def import_torch_cpu_seconds(repeats: int = 3) -> float:
    """Median CPU time (user + system, from the child's rusage) of ``python -c "import torch"`` in a fresh process:
    the host's speed at the kind of work that dominates the demo (process start-up and imports)."""
    samples = []
    for _ in range(repeats):
        child = subprocess.Popen([sys.executable, "-c", "import torch"])
        _, _, usage = os.wait4(child.pid, 0)
        child.returncode = 0  # reaped by wait4
        samples.append(usage.ru_utime + usage.ru_stime)
    return round(sorted(samples)[len(samples) // 2], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--out", help="write the measurement as JSON here")
    args = parser.parse_args(argv)
    probe = import_torch_cpu_seconds()
    baseline = psutil.virtual_memory()
    used_before = baseline.total - baseline.available
    command = [sys.executable, "-m", "perceive_ray", "demo", "--workdir", args.workdir, "--seed", str(args.seed)]
    if args.quick:
        command.append("--quick")
    started, busy_before = time.perf_counter(), busy_cpu_seconds()
    process = subprocess.Popen(command)
    root = psutil.Process(process.pid)
    peak = {"tree_rss": 0, "machine_used_delta": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["tree_rss"] = max(peak["tree_rss"], tree_rss(root))
            memory = psutil.virtual_memory()
            peak["machine_used_delta"] = max(peak["machine_used_delta"], memory.total - memory.available - used_before)
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    busy = busy_cpu_seconds() - busy_before
    result = {"command": " ".join(command), "returncode": code, "wall_s": round(wall, 1),
              "peak_tree_rss_gb": round(peak["tree_rss"] / 1e9, 2),
              "peak_machine_used_delta_gb": round(peak["machine_used_delta"] / 1e9, 2),
              "busy_cpu_s": round(busy, 1), "host_probe_import_torch_cpu_s": probe,
              "cpus": psutil.cpu_count(), "machine_memory_gb": round(baseline.total / 1e9, 1)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
