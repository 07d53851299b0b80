"""CPU-seconds per process kind of a command: where a Ray run (or a test) spends its CPU.

Runs the command and samples /proc every 0.2 s (psutil): every process that started after this script did (the
command, its descendants, and what they start through Ray's raylet, which is not their child) is recorded with its
latest title and its user + system CPU time. Ray renames its worker processes (``ray::RayTrainWorker``,
``ray::MapBatches(decode_rows)``); a worker back in the pool shows ``ray::IDLE`` and keeps the name of its last
task only while it runs it, so the kind is the first ``ray::`` name other than IDLE seen. A process that lived less
than a sampling interval is missed, and CPU used between the last sample and the exit is not counted: the totals are
lower bounds. Other processes started on the machine meanwhile are counted too: run it on a quiet machine.

    .venv/bin/python benchmarks/process_cpu.py [--out FILE.json] [--top N] -- COMMAND [ARGS...]

Prints the wall time, the total, and the top kinds (CPU-seconds, count); --out writes every process with its start
(seconds after this script started; the kernel's start times are good to about a second), the titles it showed,
and a timeline of its CPU-seconds (a point a second): enough to see which kinds kept the cores busy when.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

INTERVAL_S = 0.2


def kind_of(title: str) -> str:
    if title.startswith("ray::"):
        return title.split()[0]
    words = title.split()
    return " ".join(Path(w).name if i == 0 else w for i, w in enumerate(words[:3]))[:80]


class Sampler:
    def __init__(self) -> None:
        self.before = set(psutil.pids())
        self.me = os.getpid()
        self.t0 = time.time()
        self.seen: dict[tuple[int, float], dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(INTERVAL_S)

    def sample(self) -> None:
        for process in psutil.process_iter(["pid", "create_time", "cmdline", "cpu_times"]):
            info = process.info
            if info["pid"] in self.before or info["pid"] == self.me or info["cpu_times"] is None:
                continue
            entry = self.seen.setdefault((info["pid"], info["create_time"]), {
                "pid": info["pid"], "title": "", "cpu_s": 0.0, "start_s": round(max(0.0, info["create_time"] - self.t0), 1),
                "titles": [], "timeline": []})
            title = " ".join(info["cmdline"] or [])
            named = entry["title"].startswith("ray::") and not entry["title"].startswith("ray::IDLE")
            if title and not named:
                entry["title"] = title
            if title and title not in entry["titles"]:
                entry["titles"].append(title)
            times = info["cpu_times"]
            cpu = max(entry["cpu_s"], times.user + times.system)
            now = round(time.time() - self.t0, 1)
            # (seconds since the start, CPU-seconds so far): at most one point a second, and only when it moved
            if cpu > entry["cpu_s"] and (not entry["timeline"] or now - entry["timeline"][-1][0] >= 1.0):
                entry["timeline"].append((now, round(cpu, 2)))
            entry["cpu_s"] = cpu

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def summarize(entries: list[dict]) -> list[dict]:
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for entry in entries:
        kind = kinds[kind_of(entry["title"])]
        kind[0] += 1
        kind[1] += entry["cpu_s"]
    return [{"kind": k, "processes": int(n), "cpu_s": round(c, 1)}
            for k, (n, c) in sorted(kinds.items(), key=lambda item: -item[1][1])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write every process and the per-kind totals as JSON")
    parser.add_argument("--top", type=int, default=15, help="kinds to print (default 15)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    with Sampler() as sampler:
        start = time.perf_counter()
        rc = subprocess.run(command).returncode
        wall = time.perf_counter() - start
        time.sleep(1.0)  # the last processes' exits
    entries = sorted(sampler.seen.values(), key=lambda e: -e["cpu_s"])
    kinds = summarize(entries)
    total = sum(e["cpu_s"] for e in entries)
    print(f"[process_cpu] rc {rc}, wall {wall:.1f} s, {total:.1f} CPU-s in {len(entries)} processes", file=sys.stderr)
    for kind in kinds[: args.top]:
        print(f"[process_cpu] {kind['cpu_s']:8.1f} CPU-s {kind['processes']:4d} x {kind['kind']}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "rc": rc, "wall_s": round(wall, 2),
                                              "cpu_s": round(total, 1), "kinds": kinds, "processes": entries},
                                             indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
