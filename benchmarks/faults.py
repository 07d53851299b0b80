"""Fault suite: every scenario is compared with an uninterrupted run, row for row.

Scenarios (each a real `perceive-ray` process in its own session, so leftovers are found by session id):
  driver SIGKILLed at start / mid-benchmark / between benchmarks / during final logging, then resumed (eval, Ray);
  one scoring actor killed mid-run (eval, 2 actors); the tracking server killed mid-run (score, exit 3, then
  `perceive-ray track`); two writers started together on one run id; a corrupt, a zero-byte and a renamed image.
For each: rows lost (expected but absent), duplicated (a key twice in scores.parquet), mismatched (|Δscore| > 1e-5
against the uninterrupted in-process run) and processes of the run left behind. Last line:
`faults: N scenarios, lost=L duplicated=D mismatched=M`.

    .venv/bin/python benchmarks/faults.py [--workdir DIR] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perceive_ray.data.catalog import load_benchmark  # noqa: E402
from perceive_ray.data.synthetic import generate  # noqa: E402
from perceive_ray.models.clip import save_tiny_clip  # noqa: E402
from tests.fixtures.mlflow_server import MlflowServer  # noqa: E402

EXPERIMENT = REPO / "experiments" / "eval" / "clip_whatsup.yaml"
BENCHMARKS = ("whatsup_controlled_a", "whatsup_controlled_b")
TOLERANCE = 1e-5  # scores of another batch composition differ at the 1e-7 level (fp32 reductions)


def overrides(work: Path, data: Path, *extra: str) -> list[str]:
    return [f"benchmarks=[{{name: whatsup_controlled_a, root: '{data}'}}, {{name: whatsup_controlled_b, root: '{data}'}}]",
            f"model.source={work / 'clip'}", "model.pretrained=null", f"output_dir={work / 'runs'}",
            "scorer.batch_size=2", "max_error_fraction=0.5", *extra]


def session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines() if line.strip()) if int(s) == sid]


def run(args: list[str], *, env: dict[str, str] | None = None, on_poll=None, timeout: float = 600) -> dict:
    """Run `perceive-ray ARGS` in a new session; ``on_poll()`` is called while it runs (to inject a fault).
    Returns the exit code, stderr tail and how many of the session's processes outlived the driver."""
    environ = os.environ | {"HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1"} | (env or {})
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen([sys.executable, "-m", "perceive_ray", *args], cwd=REPO, env=environ,
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if on_poll is not None:
                on_poll()
            time.sleep(0.02)
        if process.poll() is None:  # past the timeout
            process.kill()
        process.wait()
        time.sleep(3.0)  # give a dying run's helpers (Ray's reaper) time to go
        left = [pid for pid in session_pids(process.pid) if pid != process.pid]
        for pid in left:  # never leave them running: stop exactly this session's processes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return {"code": process.returncode, "stderr": tail, "leftover": len(left)}


def scores(run_dir: Path) -> dict[str, list[tuple]]:
    out = {}
    for bench in BENCHMARKS:
        path = run_dir / bench / "scores.parquet"
        table = pq.read_table(path).select(["item_id", "image_index", "text_index", "score"]) if path.is_file() else None
        out[bench] = [] if table is None else [tuple(r.values()) for r in table.to_pylist()]
    return out


def compare(reference: dict, got: dict, *, skip: set[tuple] = frozenset()) -> dict[str, float]:
    """Rows lost / duplicated / mismatched against the reference (``skip``: (bench, item, image) not expected)."""
    lost = duplicated = mismatched = 0
    worst = 0.0
    for bench, rows in reference.items():
        seen: dict[tuple, float] = {}
        for item, image, text, value in got.get(bench, []):
            key = (item, image, text)
            duplicated += key in seen
            seen[key] = value
        for item, image, text, value in rows:
            if (bench, item, image) in skip:
                continue
            if (item, image, text) not in seen:
                lost += 1
                continue
            delta = abs(seen[(item, image, text)] - value)
            worst = max(worst, delta)
            mismatched += delta > TOLERANCE
    return {"lost": lost, "duplicated": duplicated, "mismatched": mismatched, "max_delta": worst}


def shards(work: Path, run_id: str) -> int:
    return sum(len(list((work / "runs" / run_id / b / "shards").glob("part-*.parquet"))) for b in BENCHMARKS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    parser.add_argument("--pairs", type=int, default=6, help="object pairs per What'sUp subset (4 images each)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    data = work / "synth" / "whatsup"
    if not data.is_dir():
        generate(work / "synth", seed=args.seed, pairs=args.pairs)
    if not (work / "clip").is_dir():
        save_tiny_clip(work / "clip")
    blocks = 2 * 4 * args.pairs // 2  # image rows / batch size, both benchmarks

    results: list[tuple[str, dict]] = []

    def record(name: str, outcome: dict) -> None:
        results.append((name, outcome))
        print(f"{name:<34} " + " ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in outcome.items()), flush=True)

    base = overrides(work, data)
    reference_run = run(["score", str(EXPERIMENT), "--no-track", "--run-id", "reference", *base])
    assert reference_run["code"] == 0, reference_run["stderr"]
    reference = scores(work / "runs" / "reference")

    # Driver killed at seeded points of an eval (Ray), then resumed with the same run id.
    points = ["start", f"block:{rng.randint(2, blocks // 2 - 1)}", "between_benchmarks", "final_logging"]
    for point in points:
        run_id = f"kill_{point.replace(':', '_')}"
        killed = run(["eval", str(EXPERIMENT), "--no-track", "--run-id", run_id, *base],
                     env={"PERCEIVE_RAY_FAULT": point})
        resumed = run(["eval", str(EXPERIMENT), "--no-track", "--run-id", run_id, *base])
        outcome = compare(reference, scores(work / "runs" / run_id))
        outcome |= {"killed_code": killed["code"], "resume_code": resumed["code"],
                    "leftover": killed["leftover"] + resumed["leftover"]}
        record(f"driver killed at {point}", outcome)

    # One scoring actor dies mid-run (2 actors): the pipeline must finish without losing rows.
    marker = work / "actor_fault.marker"
    marker.unlink(missing_ok=True)
    actor = run(["eval", str(EXPERIMENT), "--no-track", "--run-id", "actor_killed", *base,
                 "resources.num_actors=2", "resources.num_cpus_per_actor=0.5"],
                env={"PERCEIVE_RAY_FAULT": f"actor:{marker}"})
    outcome = compare(reference, scores(work / "runs" / "actor_killed"))
    if actor["code"] != 0:  # the run may fail rather than retry: then a resume must complete it exactly
        again = run(["eval", str(EXPERIMENT), "--no-track", "--run-id", "actor_killed", *base])
        outcome = compare(reference, scores(work / "runs" / "actor_killed")) | {"resume_code": again["code"]}
    record("one actor killed", outcome | {"code": actor["code"], "fault_fired": marker.exists(),
                                          "leftover": actor["leftover"]})

    # The tracking server dies mid-run: scores finish, exit 3, `perceive-ray track` logs the run afterwards.
    server_dir = work / "mlflow"
    shutil.rmtree(server_dir, ignore_errors=True)
    server_dir.mkdir()
    server = MlflowServer(server_dir)
    uri = server.start()
    try:
        def outage() -> None:
            if server.context is not None and shards(work, "tracker_killed") >= 2:
                server.kill()

        tracked = run(["score", str(EXPERIMENT), "--run-id", "tracker_killed", *base, f"tracking.uri={uri}",
                       "tracking.experiment=faults", "scorer.batch_size=1"], on_poll=outage)
        outcome = compare(reference, scores(work / "runs" / "tracker_killed"))
        server.start()
        logged = run(["track", str(work / "runs" / "tracker_killed")])
        record("tracking server killed", outcome | {"code": tracked["code"], "track_code": logged["code"],
                                                    "leftover": tracked["leftover"]})
    finally:
        server.kill()

    # Two writers on one run id, started together: one is refused (exit 2), the other completes.
    environ = os.environ | {"HF_HUB_OFFLINE": "1"}
    pair = [subprocess.Popen([sys.executable, "-m", "perceive_ray", "score", str(EXPERIMENT), "--no-track",
                              "--run-id", "two_writers", *base], cwd=REPO, env=environ,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    codes = sorted(p.wait() for p in pair)
    errs = [p.stderr.read().decode() for p in pair]
    refused = any("one writer per run id" in e for e in errs)
    outcome = compare(reference, scores(work / "runs" / "two_writers"))
    # If the second started after the first finished it simply resumes a complete run (exit 0, nothing to do).
    record("two concurrent writers", outcome | {"codes": "/".join(map(str, codes)),
                                                "refused": refused or codes == [0, 0]})

    # Damaged images: the run records them as error rows; every other row equals the reference.
    manifest = load_benchmark("whatsup_controlled_a", data)
    for damage, victim in (("corrupt", 1), ("zero_byte", 2), ("renamed", 3)):
        copy = work / f"damaged_{damage}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(data, copy)
        item = manifest.items[victim]
        path = copy / item.images[0]
        if damage == "corrupt":
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
        elif damage == "zero_byte":
            path.write_bytes(b"")
        else:
            path.rename(path.with_name("renamed_" + path.name))
        result = run(["score", str(EXPERIMENT), "--no-track", "--run-id", f"damaged_{damage}",
                      *overrides(work, copy)])
        skip = {("whatsup_controlled_a", item.item_id, 0)}
        if damage == "renamed":  # a missing file is a dataset error: refused before any scoring (exit 2)
            outcome = {"lost": 0, "duplicated": 0, "mismatched": 0,
                       "refused_before_scoring": result["code"] == 2 and not (work / "runs" / "damaged_renamed"
                                                                               / "run_record.json").exists()}
        else:
            outcome = compare(reference, scores(work / "runs" / f"damaged_{damage}"), skip=skip)
            errors = work / "runs" / f"damaged_{damage}" / "whatsup_controlled_a" / "errors.parquet"
            outcome["error_rows"] = pq.read_table(errors).num_rows if errors.is_file() else 0
        record(f"{damage.replace('_', '-')} image", outcome | {"code": result["code"]})

    totals = {key: sum(int(o.get(key, 0)) for _, o in results) for key in ("lost", "duplicated", "mismatched")}
    leftovers = sum(int(o.get("leftover", 0)) for _, o in results)
    (work / "faults.json").write_text(json.dumps({name: o for name, o in results}, indent=2, default=str))
    print(f"leftover processes (killed by this script): {leftovers}")
    print(f"faults: {len(results)} scenarios, lost={totals['lost']} duplicated={totals['duplicated']} "
          f"mismatched={totals['mismatched']}")
    return 0 if not any(totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
