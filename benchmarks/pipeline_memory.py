"""Peak memory of the Ray Data evaluation pipeline at N and 10N items: does it stream, or grow with the data?

What it measures
    Peak resident memory of everything one ``run_eval`` brings up -- the driver plus every process of the local Ray
    instance it owns (GCS, raylet, agents, decode workers, the scorer actor) -- for a What'sUp-shaped benchmark of N
    items and of 10N items (default COCO-QA one-object shape: 1 image x 2 captions per item, 640 x 480 JPEGs, so a
    decoded row is ~0.9 MB and any per-item materialisation of images would show at once).

How
    The parent process writes the two dataset roots (the writers of ``prefix_tokens.py``; sizes beyond the published
    2,247 items are accepted by the adapter with a size warning) and a random-init open_clip model (the library's
    sized builder via ``harness.py``), then runs each size in a FRESH child process
    (``--child``: ``ray.init(address="local")`` + ``run_eval`` + ``ray.shutdown``) so that neither run inherits
    the other's heap or warm workers. While the child runs, the parent samples the child's whole process tree
    (``psutil.Process(child).children(recursive=True)``: Ray's processes started by that child only, never another
    Ray on the machine) every ``--interval`` seconds and records the summed RSS and the summed PSS (proportional set
    size: shared pages -- torch libraries, the plasma store's shared memory -- divided among the processes that map
    them, so it does not double count). A process whose command line equals its parent's is a fork that has not
    exec'd yet (``subprocess`` from the driver, e.g. ``git rev-parse`` for the run record): its RSS is the parent's
    copy-on-write pages, so it is left out of the sums and counted in the ``forks`` column. The child marks its
    phases in a file, so the idle footprint after
    ``ray.init`` (baseline) is reported apart from the peak during ``run_eval``.

    Ray placement is the repository default (``ray.init`` with the host's CPUs; actor CPUs and torch threads
    automatic; ``resources.object_store_mb`` default) unless ``--ray-cpus`` / ``--actor-cpus`` /
    ``--object-store-mb`` say otherwise.

Output: per size the peak summed RSS and PSS, the baseline, the increment over the baseline, and the largest
processes at the peak; as the LAST line ``growth=X growth_over_baseline=Y``: X = peak summed RSS at 10N / at N; Y =
(peak - idle Ray baseline) at 10N / (peak - baseline) at N, i.e. the growth of what the evaluation itself adds (the
PSS ratio is printed on the line before). ``--quick``: N = 40. Usage::

    .venv/bin/python benchmarks/pipeline_memory.py [--quick] [--n 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    MODEL_DEFAULTS,
    add_model_args,
    describe_model,
    experiment,
    resolve_model_args,
    save_model,
    start_ray,
)
from prefix_tokens import BENCHMARK, CONTROLLED, SUBSETS, seed_everything, write_whatsup  # noqa: E402

MB = 1024 * 1024
# Memory does not need a slow model, only one slower than decoding (so that the pipeline has to hold work back).
MEMORY_MODEL_DEFAULTS = {
    "clip": {"width": 384, "layers": 2, "image_size": 224, "patch_size": 16, "text_width": 256, "text_layers": 2},
    "vqascore": MODEL_DEFAULTS["vqascore"],
}


def sizes_for(subset: str, items: int) -> dict[str, dict[str, Any]]:
    """A skeleton of ``items`` items (QA shape) or ``items`` images (Controlled shape: items // 4 object pairs)."""
    if subset in CONTROLLED:
        return {subset: {"pairs": max(1, items // 4)}}
    return {subset: {"groups": {"lr": items - items // 2, "tb": items // 2}}}


def role_of(proc, child_pid: int) -> str:
    """driver | a Ray worker's process title (ray::IDLE, ray::MapWorker(...), ...) | the Ray daemon's name."""
    if proc.pid == child_pid:
        return "driver"
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except Exception:  # noqa: BLE001 - the process may be gone
        return "?"
    title = cmd[0] if cmd else name
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0][:48]  # ray::IDLE, ray::MapWorker(MapBatches(ScoringActor)), ...
    joined = " ".join(cmd)
    if "default_worker.py" in joined:
        return "ray::(worker starting)"
    binary = Path(title).name
    if binary in ("raylet", "gcs_server"):
        return binary
    for key in ("dashboard", "runtime_env", "log_monitor", "monitor.py"):
        if key in joined:
            return key
    return binary or name


def rss_split(pid: int) -> tuple[int, int, int]:
    """(RssAnon, RssFile, RssShmem) bytes from /proc/<pid>/status (Linux); zeros elsewhere."""
    values = {"RssAnon:": 0, "RssFile:": 0, "RssShmem:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in values:
                values[parts[0]] = int(parts[1]) * 1024
    except OSError:
        pass
    return values["RssAnon:"], values["RssFile:"], values["RssShmem:"]


def sample_tree(child: subprocess.Popen, phase_file: Path, interval: float, pss: bool) -> dict[str, Any]:
    """Poll the child's process tree until it exits; return peaks per phase and the breakdown at the peak."""
    import psutil

    root = psutil.Process(child.pid)
    peak = {"rss": 0, "pss": 0}
    baseline = {"rss": 0, "pss": 0}
    at_peak: list[tuple[str, int, int]] = []
    split_at_peak = {"anon": 0, "file": 0, "shmem": 0}
    role_peak: dict[str, int] = {}  # per role, the largest summed RSS seen in one sample
    max_procs = samples = forks_skipped = 0
    while child.poll() is None:
        phase = phase_file.read_text().strip() if phase_file.exists() else "start"
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        rows = []
        cmdlines: dict[int, list[str]] = {}
        for proc in procs:
            try:
                cmdlines[proc.pid] = proc.cmdline()
            except psutil.Error:
                continue
        for proc in procs:
            cmd = cmdlines.get(proc.pid)
            if cmd is None:  # exited while we looked
                continue
            try:
                if proc.pid != child.pid and cmd == cmdlines.get(proc.ppid()):
                    # A fork that has not exec'd yet (subprocess.run from the driver, a Ray worker spawning a
                    # helper): its RSS is its parent's pages, shared copy-on-write; summing it would count them twice.
                    forks_skipped += 1
                    continue
                if pss:
                    info = proc.memory_full_info()
                    rows.append((proc, info.rss, info.pss))
                else:
                    rows.append((proc, proc.memory_info().rss, 0))
            except psutil.Error:
                continue
        rss, pss_sum = sum(r[1] for r in rows), sum(r[2] for r in rows)
        by_role: dict[str, int] = {}
        for proc, r, _ in rows:  # classified every sample: a worker's title changes with what it runs
            role = role_of(proc, child.pid)
            by_role[role] = by_role.get(role, 0) + r
        for role, r in by_role.items():
            role_peak[role] = max(role_peak.get(role, 0), r)
        samples += 1
        max_procs = max(max_procs, len(rows))
        if phase == "ray_ready":
            baseline = {"rss": max(baseline["rss"], rss), "pss": max(baseline["pss"], pss_sum)}
        if rss > peak["rss"]:
            at_peak = [(role_of(p, child.pid), r, s) for p, r, s in rows]
            splits = [rss_split(p.pid) for p, _, _ in rows]
            split_at_peak = {name: sum(x[i] for x in splits) for i, name in enumerate(("anon", "file", "shmem"))}
        peak = {"rss": max(peak["rss"], rss), "pss": max(peak["pss"], pss_sum)}
        time.sleep(interval)
    at_peak.sort(key=lambda r: -r[1])
    return {"peak_rss": peak["rss"], "peak_pss": peak["pss"], "baseline_rss": baseline["rss"],
            "baseline_pss": baseline["pss"], "samples": samples, "max_processes": max_procs,
            "forks_skipped": forks_skipped,
            "at_peak": [{"role": role, "rss_mb": round(r / MB, 1), "pss_mb": round(s / MB, 1)}
                        for role, r, s in at_peak],
            "split_at_peak_mb": {k: round(v / MB, 1) for k, v in split_at_peak.items()},
            "role_peak_rss_mb": {role: round(r / MB, 1)
                                 for role, r in sorted(role_peak.items(), key=lambda kv: -kv[1])}}


class PlasmaPoller:
    """Polls the object store's usage (Ray's own memory summary) from a thread inside the child: the peak MiB of
    objects held in plasma -- decoded image blocks waiting for the scorer, mostly."""

    PATTERN = re.compile(r"Plasma memory usage (\d+) MiB")

    def __init__(self, interval: float):
        self.peak_mib = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray._private.internal_api import memory_summary

        while not self._stop.is_set():
            try:
                if m := self.PATTERN.search(memory_summary(stats_only=True)):
                    self.peak_mib = max(self.peak_mib, int(m.group(1)))
            except Exception:  # noqa: BLE001 - a diagnostic must never fail the run
                pass
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_child(args: argparse.Namespace) -> int:
    """One run_eval on a fresh local Ray; phases go to ``--phase-file``, timings to ``--result``."""
    import ray

    from perceive_ray.run.inference import run_eval

    phase = Path(args.phase_file)
    phase.write_text("ray_init")
    init_s = start_ray(args.ray_cpus)
    time.sleep(args.settle)  # let the idle footprint (prestarted workers) settle: that is the baseline
    phase.write_text("ray_ready")
    time.sleep(args.settle)
    config = experiment(data=Path(args.data), benchmarks=[args.benchmark], model_dir=Path(args.model_dir),
                        out=Path(args.out), batch_size=args.batch_size, actor_cpus=args.actor_cpus, seed=args.seed,
                        scorer=args.scorer, object_store_mb=args.object_store_mb)
    phase.write_text("eval")
    plasma = PlasmaPoller(args.interval * 2.5)
    start = time.perf_counter()
    try:
        results = run_eval(config, run_id="memory", track=False)
    finally:
        plasma.stop()
    wall = time.perf_counter() - start
    phase.write_text("shutdown")
    ray.shutdown()
    shards = sum(1 for _ in results[0].scores_path.parent.glob("shards/part-*.parquet"))
    Path(args.result).write_text(json.dumps({"init_s": init_s, "run_eval_s": wall, "shards": shards,
                                             "rows_scored": results[0].rows_scored_now,
                                             "plasma_peak_mb": plasma.peak_mib}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 40")
    parser.add_argument("--n", type=int, default=None, help="items of the small run (default 300; quick 40)")
    parser.add_argument("--factor", type=int, default=10, help="the large run has factor x N items")
    parser.add_argument("--subset", default="coco_one", choices=SUBSETS, help="What'sUp shape of the items")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: ray.init's, the host's cores)")
    parser.add_argument("--actor-cpus", type=float, default=None,
                        help="num_cpus of the scorer actor (default: the repository's automatic share)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--no-pss", action="store_true", help="sample RSS only (cheaper)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle after ray.init (baseline window)")
    parser.add_argument("--image-px", default="640x480")
    parser.add_argument("--object-store-mb", type=int, default=None,
                        help="resources.object_store_mb of the evaluation (Ray Data's object-store budget); "
                             "default: the repository default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    add_model_args(parser, defaults=MEMORY_MODEL_DEFAULTS)
    # child mode (internal)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--benchmark", "--model-dir", "--out", "--phase-file", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--scorer", default="clip", choices=("clip", "vqascore"), help="scorer of the model")
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)

    seed_everything(args.seed)
    n = args.n or (40 if args.quick else 300)
    image_px = tuple(int(v) for v in args.image_px.lower().split("x"))
    stamp = datetime.now(timezone.utc)
    results = {}
    with tempfile.TemporaryDirectory(prefix="memory_") as tmp:
        work = args.workdir or Path(tmp)
        sizes_model = resolve_model_args(args, args.scorer)
        model_dir = save_model(work / f"{args.scorer}_model", args.scorer, sizes_model, seed=args.seed)
        for items in (n, n * args.factor):
            data = write_whatsup(work / f"data_{items}", seed=args.seed, subsets=(args.subset,),
                                 image_size=image_px, sizes=sizes_for(args.subset, items), pool=32)
            phase, result = work / f"phase_{items}", work / f"result_{items}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", str(data),
                   "--benchmark", BENCHMARK[args.subset], "--model-dir", str(model_dir),
                   "--out", str(work / f"runs_{items}"), "--phase-file", str(phase), "--result", str(result),
                   "--batch-size", str(args.batch_size), "--settle", str(args.settle), "--seed", str(args.seed),
                   "--scorer", args.scorer]
            for flag, value in (("--ray-cpus", args.ray_cpus), ("--actor-cpus", args.actor_cpus),
                                ("--object-store-mb", args.object_store_mb)):
                if value is not None:
                    cmd += [flag, str(value)]
            log = work / f"child_{items}.log"
            print(f"running {items} items (log {log}) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            with open(log, "w") as out:
                child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
                memory = sample_tree(child, phase, args.interval, pss=not args.no_pss)
                code = child.wait()
            if code != 0:
                print(log.read_text()[-4000:], file=sys.stderr)
                raise SystemExit(f"child run with {items} items failed (exit {code})")
            results[items] = {**memory, **json.loads(result.read_text()), "wall_s": time.perf_counter() - start,
                              "rows": items if args.subset not in CONTROLLED else 4 * max(1, items // 4)}

    print(f"Peak memory of run_eval (driver + its local Ray's processes), {describe_model(args.scorer, sizes_model)}, "
          f"{args.subset} shape, {image_px[0]}x{image_px[1]} JPEGs, batch {args.batch_size}, "
          f"Ray CPUs {args.ray_cpus or 'default'} (actor {args.actor_cpus or 'auto'}), sample every "
          f"{args.interval:g} s, resources.object_store_mb "
          f"{args.object_store_mb if args.object_store_mb else 'default'}; "
          f"{stamp:%Y-%m-%d %H:%M} UTC; host {os.cpu_count()} cores")
    print(f"{'items':>7}{'run_eval s':>11}{'peak RSS MB':>13}{'peak PSS MB':>13}{'base RSS':>10}{'base PSS':>10}"
          f"{'+RSS':>8}{'+PSS':>8}{'plasma MB':>11}{'procs':>7}{'samples':>9}{'forks':>7}")
    for items, r in results.items():
        print(f"{items:>7}{r['run_eval_s']:>11.1f}{r['peak_rss'] / MB:>13.0f}{r['peak_pss'] / MB:>13.0f}"
              f"{r['baseline_rss'] / MB:>10.0f}{r['baseline_pss'] / MB:>10.0f}"
              f"{(r['peak_rss'] - r['baseline_rss']) / MB:>8.0f}{(r['peak_pss'] - r['baseline_pss']) / MB:>8.0f}"
              f"{r['plasma_peak_mb']:>11}{r['max_processes']:>7}{r['samples']:>9}{r['forks_skipped']:>7}")
    for items, r in results.items():
        top = ", ".join(f"{p['role']} {p['rss_mb']:.0f}/{p['pss_mb']:.0f}" for p in r["at_peak"][:5])
        print(f"  {items} items: largest processes at the peak, RSS/PSS MB: {top}")
        roles = ", ".join(f"{role} {mb:.0f}" for role, mb in list(r["role_peak_rss_mb"].items())[:6])
        print(f"  {items} items: peak summed RSS per role, MB: {roles}")
        split = r["split_at_peak_mb"]
        print(f"  {items} items: summed RSS at the peak = anon {split['anon']:.0f} + file {split['file']:.0f} + "
              f"shmem {split['shmem']:.0f} MB (shmem: object-store pages, counted once per process mapping them)")
    small, large = results[n], results[n * args.factor]
    pss_growth = large["peak_pss"] / small["peak_pss"] if small["peak_pss"] else float("nan")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "date": stamp.isoformat(),
                                         "results": {str(k): v for k, v in results.items()}}, indent=2))
    driver = large["role_peak_rss_mb"].get("driver", 0) / max(small["role_peak_rss_mb"].get("driver", 0), 1e-9)
    over = ((large["peak_rss"] - large["baseline_rss"]) / (small["peak_rss"] - small["baseline_rss"])
            if small["peak_rss"] > small["baseline_rss"] else float("nan"))
    over_pss = ((large["peak_pss"] - large["baseline_pss"]) / (small["peak_pss"] - small["baseline_pss"])
                if small["peak_pss"] > small["baseline_pss"] else float("nan"))
    print(f"pss_growth={pss_growth:.3f} pss_growth_over_baseline={over_pss:.3f} driver_rss_growth={driver:.3f}")
    print(f"growth={large['peak_rss'] / small['peak_rss']:.3f} growth_over_baseline={over:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
