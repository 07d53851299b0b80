"""Scoring throughput: the Ray Data eval vs the in-process batched loop vs the reference's own loop shape.

What it measures
    (item, image) rows per second for the SAME scorer on the SAME What'sUp data (default Controlled A + B at the
    published size, 820 images x 4 captions, 640 x 480 JPEGs), per scorer (``--scorers``, default both):

    ray   ``run_evaluation(config, RayDataExecutor())`` -- exactly what ``run_eval`` / ``perceive-ray eval`` runs --
          in a fresh process with no Ray running: it starts its own local Ray, ONE actor pool for both benchmarks
          (one model load), the repository's default CPU placement (actor CPUs and torch threads automatic), shards,
          metrics, run record, ``ray.shutdown``. The only addition is a wrapper that time-stamps the blocks the
          executor hands to the evaluation core.
    loop  ``perceive_ray.scoring.local.run_local`` per benchmark (decode a batch, score it; batches of
          ``--batch-size`` rows) after ``build_scorer``, in a fresh process (what ``perceive-ray score`` does for
          scoring); the scorer is wrapped to time-stamp its calls.
    seed  the reference's loop shape, one image at a time, on every ``1/--seed-fraction``-th row:
          clip      ``eval_clip.py`` of lst627/CLIP-Embeds: the image decoded and encoded ONCE at batch 1 with all
                    its K captions encoded together -> one scorer call per image with a one-row batch;
          vqascore  t2v_metrics (``eval_vqa_score.py``: ``llava_score(images=path, texts=options)``; its
                    ``load_images`` opens, pads and preprocesses the image once per (image, caption) pair and the
                    forward re-encodes it per pair) -> per pair: decode, then one call with that one pair to a
                    ``sharing=none`` scorer (the library's naive per-pair path). t2v_metrics batches the K pairs of
                    an image in one forward; on a CPU the batch does not change the work, so one pair per call.
          Model load and one warm-up call are excluded; nothing else differs from the loop's scorer.

    Figures (``X_vs_Y`` > 1 means X is faster)
      ray_vs_loop_steady  Ray's steady rate / the loop's steady rate. Steady = rows delivered after the first
                          block (Ray) or the first scorer call (loop) over the time from that first one to the last
                          one: process start, imports, ray.init, actor start, model load and the first batch fall
                          before it; the final metrics after it.
      ray_vs_loop_e2e     loop wall clock / Ray wall clock, each a whole fresh process from spawn to exit (start-up,
                          imports, model load, and for Ray ray.init, shards, metrics, shutdown included).
      <scorer>_loop_vs_seed  loop steady rate / seed rate.
      token_ratio F       naive / shared LM tokens, summed from the VQAScore scorer's own ``lm_tokens`` column on the
                          seed arm's rows (naive: the seed arm; shared: the loop's rows with the same keys): the
                          compute floor of vqascore_loop_vs_seed when LM work dominates.
    With several scorers, the last line's ray_vs_loop_* are the smaller (more conservative) of the scorers' values.

    Each arm runs in its own child process (``--child``), one after the other; ``--repeats N`` repeats the whole
    sequence and reports medians with (min-max). Around every child the script records the 1-minute load average
    and the cores used by processes outside its own tree ("foreign cores": other users' jobs; ~0 on a quiet host);
    ``--wait-quiet S`` waits up to S seconds before each child until the host's busy cores drop below
    ``--quiet-cores``; ``--max-foreign C`` re-runs an arm (at most ``--retries`` times) during which other processes
    used more than C cores, and keeps its quietest attempt (every attempt's foreign load is in the JSON).

Output: per-scorer tables, then as the LAST line
``ray_vs_loop_steady=X ray_vs_loop_e2e=Y vqascore_loop_vs_seed=Z clip_loop_vs_seed=W token_ratio=F``.
``--quick``: 8 object pairs per subset, batch 8. Usage::

    .venv/bin/python benchmarks/pipeline_throughput.py [--quick] [--scorers clip,vqascore] [--repeats 3]
        [--wait-quiet 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    SCORERS,
    ForeignLoad,
    StampedExecutor,
    StampedScorer,
    add_model_args,
    describe_model,
    experiment,
    first_to_last,
    host_load,
    resolve_model_args,
    save_model,
    wait_for_quiet,
)
from prefix_tokens import BENCHMARK, CONTROLLED, seed_everything, write_whatsup  # noqa: E402

ARMS = ("ray", "loop", "seed")
KEY = ("benchmark", "item_id", "image_index", "text_index")


# ---------------------------------------------------------------------------------------------------------------
# Child processes: one arm each; they write a JSON result and a Parquet score table.


def child_config(args: argparse.Namespace, *, sharing: str = "shared"):
    return experiment(data=Path(args.data), benchmarks=args.benchmarks.split(","), model_dir=Path(args.model_dir),
                      out=Path(args.out), batch_size=args.batch_size, seed=args.seed, scorer=args.scorer,
                      sharing=sharing, name=f"throughput_{args.scorer}", actor_cpus=args.actor_cpus)


def write_scores(path: Path, rows: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(rows), path)


def child_loop(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa

    from perceive_ray.data.catalog import load_benchmark
    from perceive_ray.scoring.local import build_scorer, run_local

    config = child_config(args)
    manifests = [load_benchmark(b.name, b.root, strict_sizes=False) for b in config.benchmarks]
    start = time.perf_counter()
    scorer = StampedScorer(build_scorer(config.model, config.scorer))
    load_s = time.perf_counter() - start
    tables = []
    start = time.perf_counter()
    for manifest in manifests:
        table = run_local(manifest, scorer, batch_size=config.scorer.batch_size).scores
        tables.append(table.append_column("benchmark", pa.array([manifest.benchmark] * table.num_rows)))
    run_s = time.perf_counter() - start
    scores = pa.concat_tables(tables, promote_options="default")
    write_scores(Path(args.scores), scores.to_pydict())
    return {"load_s": load_s, "run_s": run_s, "inside_scorer_s": scorer.inside_s, "pairs": scores.num_rows,
            "calls": len(scorer.stamps), "steady": first_to_last(scorer.stamps)}


def child_ray(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from perceive_ray.evaluation import run_evaluation
    from perceive_ray.run.inference import RayDataExecutor, quiet_ray_data

    os.environ.pop("RAY_ADDRESS", None)
    quiet_ray_data()  # as ``perceive-ray eval`` does
    config = child_config(args)
    executor = StampedExecutor(RayDataExecutor())
    start = time.perf_counter()
    results = run_evaluation(config, executor, run_id="ray", track=False)
    run_s = time.perf_counter() - start
    record = json.loads((config.output_dir / "ray" / "run_record.json").read_text())
    evaluation = record["evaluations"][-1]
    tables = []
    for result in results:
        table = pq.read_table(result.scores_path, columns=["item_id", "image_index", "text_index", "score"])
        tables.append(table.append_column("benchmark", pa.array([result.benchmark] * table.num_rows)))
    scores = pa.concat_tables(tables)
    write_scores(Path(args.scores), scores.to_pydict())
    return {"run_s": run_s, "pairs": scores.num_rows, "blocks": len(executor.stamps),
            "steady": first_to_last(executor.stamps), "first_block_s": executor.stamps[0][0] - start,
            "record_seconds": evaluation["seconds"], "model_loads": evaluation["model_loads"],
            "actors": evaluation["actors"]}


def seed_rows(manifest, fraction: float) -> list[dict[str, Any]]:
    """Every round(1/fraction)-th scoring row of a manifest (spread over the whole benchmark)."""
    from perceive_ray.data.images import scoring_rows

    step = max(1, round(1 / fraction))
    return scoring_rows(manifest)[::step]


def one_row_batch(row: dict[str, Any], image, texts: list[str]) -> dict[str, list]:
    context = {name: [row[name]] for name in ("benchmark", "item_id", "image_index", "subset", "group", "meta")}
    return {**context, "image": [image], "texts": [list(texts)]}


def child_seed(args: argparse.Namespace) -> dict[str, Any]:
    from perceive_ray.data.catalog import load_benchmark
    from perceive_ray.data.images import load_rgb
    from perceive_ray.scoring.local import build_scorer

    config = child_config(args, sharing="none")
    manifests = [load_benchmark(b.name, b.root, strict_sizes=False) for b in config.benchmarks]
    start = time.perf_counter()
    scorer = build_scorer(config.model, config.scorer)
    load_s = time.perf_counter() - start
    samples = [(m, row) for m in manifests for row in seed_rows(m, args.seed_fraction)]
    manifest, row = samples[0]  # warm-up, untimed: the loop's first batch is outside its steady time too
    warm_image = load_rgb(manifest.root, row["image_path"])
    scorer(one_row_batch(row, warm_image, row["texts"] if args.scorer == "clip" else row["texts"][:1]))
    out: dict[str, list] = {name: [] for name in (*KEY, "score", "lm_tokens")}
    start = time.perf_counter()
    for manifest, row in samples:
        if args.scorer == "clip":  # eval_clip.py: image decoded once, batch 1, its K captions encoded together
            image = load_rgb(manifest.root, row["image_path"])
            calls = [(list(range(len(row["texts"]))), scorer(one_row_batch(row, image, row["texts"])))]
        else:  # t2v_metrics: per (image, caption) the image is loaded, preprocessed and encoded again
            calls = [([k], scorer(one_row_batch(row, load_rgb(manifest.root, row["image_path"]), [text])))
                     for k, text in enumerate(row["texts"])]
        for ks, got in calls:
            for j, score in enumerate(got["score"]):
                out["benchmark"].append(manifest.benchmark)
                out["item_id"].append(row["item_id"])
                out["image_index"].append(row["image_index"])
                out["text_index"].append(ks[got["text_index"][j]])
                out["score"].append(score)
                out["lm_tokens"].append(int(got["lm_tokens"][j]) if "lm_tokens" in got else 0)
    seconds = time.perf_counter() - start
    write_scores(Path(args.scores), out)
    return {"load_s": load_s, "seconds": seconds, "rows": len(samples), "pairs": len(out["score"]),
            "rate": len(samples) / seconds}


def run_child(args: argparse.Namespace) -> int:
    import torch

    seed_everything(args.seed)
    result = {"ray": child_ray, "loop": child_loop, "seed": child_seed}[args.child](args)
    result["torch_threads_driver"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent: data, models, the children in turn, the summary.


def launch(args: argparse.Namespace, work: Path, *, arm: str, scorer: str, model_dir: Path, data: Path,
           benchmarks: list[str], tag: str) -> dict[str, Any]:
    """Run one arm; with ``--max-foreign``, re-run it (up to ``--retries`` times, after waiting for quiet) while
    other processes used more cores than that during it, and keep the attempt with the least foreign load."""
    attempts = []
    for attempt in range(1 + max(0, args.retries)):
        got = launch_once(args, work, arm=arm, scorer=scorer, model_dir=model_dir, data=data, benchmarks=benchmarks,
                          tag=f"{tag}_try{attempt}")
        attempts.append(got)
        if args.max_foreign is None or got["foreign_cores"] <= args.max_foreign:
            break
        print(f"  other processes used {got['foreign_cores']:.2f} cores during {scorer} {arm}: run again",
              file=sys.stderr)
    best = min(attempts, key=lambda r: r["foreign_cores"])
    return {**best, "attempts": len(attempts), "foreign_cores_attempts": [r["foreign_cores"] for r in attempts]}


def launch_once(args: argparse.Namespace, work: Path, *, arm: str, scorer: str, model_dir: Path, data: Path,
                benchmarks: list[str], tag: str) -> dict[str, Any]:
    waited = 0.0
    if args.wait_quiet > 0:
        waited, busy = wait_for_quiet(args.quiet_cores, args.wait_quiet)
        if waited > 5:
            print(f"  waited {waited:.0f} s for the host ({busy:.2f} cores busy now)", file=sys.stderr)
    out = work / f"runs_{tag}"
    result, scores, log = (work / f"{tag}.{suffix}" for suffix in ("json", "parquet", "log"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--scorer", scorer,
           "--data", str(data), "--benchmarks", ",".join(benchmarks), "--model-dir", str(model_dir),
           "--out", str(out), "--result", str(result), "--scores", str(scores),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--seed-fraction", str(args.seed_fraction)]
    if args.actor_cpus is not None:
        cmd += ["--actor-cpus", str(args.actor_cpus)]
    load_before = host_load()
    start = time.perf_counter()
    with open(log, "w") as sink, ForeignLoad() as foreign:
        code = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if code != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"{arm} child for {scorer} failed (exit {code}); log {log}")
    return {**json.loads(result.read_text()), "wall_s": wall, "load_before": load_before, "load_after": host_load(),
            "foreign_cores": foreign.cores(), "waited_s": waited, "scores_path": str(scores)}


def read_scores(path: str) -> dict[tuple, dict[str, Any]]:
    import pyarrow.parquet as pq

    return {tuple(r[k] for k in KEY): r for r in pq.read_table(path).to_pylist()}


def max_gap(reference: dict[tuple, dict], other: dict[tuple, dict], *, subset: bool) -> float:
    missing = [k for k in other if k not in reference]
    if missing or (not subset and len(other) != len(reference)):
        raise AssertionError(f"score tables differ in rows ({len(reference)} vs {len(other)}; {missing[:3]})")
    return max((abs(reference[k]["score"] - r["score"]) for k, r in other.items()), default=0.0)


def spread(values: list[float]) -> str:
    """median (min-max) of the finite values."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "nan"
    med = statistics.median(values)
    return f"{med:.3f}" if len(values) == 1 else f"{med:.3f} ({min(values):.3f}-{max(values):.3f})"


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def summarise_repeat(runs: dict[str, dict[str, Any]], texts_per_row: float) -> dict[str, float]:
    """Ratios of one repeat of one scorer (paired within the repeat)."""
    out: dict[str, float] = {}
    loop, ray, seed = runs.get("loop"), runs.get("ray"), runs.get("seed")
    if loop:
        out["loop_rows_per_s"] = loop["steady"]["rate"] / texts_per_row
        out["loop_wall_s"] = loop["wall_s"]
    if ray:
        out["ray_rows_per_s"] = ray["steady"]["rate"] / texts_per_row
        out["ray_wall_s"] = ray["wall_s"]
    if seed:
        out["seed_rows_per_s"] = seed["rate"]
    if loop and ray:
        out["ray_vs_loop_steady"] = out["ray_rows_per_s"] / out["loop_rows_per_s"]
        out["ray_vs_loop_e2e"] = loop["wall_s"] / ray["wall_s"]
        out["ray_fixed_s"] = ray["wall_s"] - ray["pairs"] / ray["steady"]["rate"]
    if loop and seed:
        out["loop_vs_seed"] = out["loop_rows_per_s"] / out["seed_rows_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 object pairs per Controlled subset, batch 8")
    parser.add_argument("--pairs", type=int, default=None,
                        help="object pairs per Controlled subset (default: the published 103 / 102; quick 8)")
    parser.add_argument("--scorers", default=",".join(SCORERS), help="comma-separated from clip,vqascore")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated from ray,loop,seed")
    parser.add_argument("--batch-size", type=int, default=None, help="scoring rows per batch (default 16; quick 8)")
    parser.add_argument("--seed-fraction", type=float, default=None,
                        help="the seed arm scores every round(1/f)-th row (default 0.2; quick 0.25)")
    parser.add_argument("--repeats", type=int, default=1, help="repeat everything; medians (min-max) are reported")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each child, wait up to this many seconds until other processes use fewer than "
                             "--quiet-cores cores (default: do not wait)")
    parser.add_argument("--quiet-cores", type=float, default=0.15)
    parser.add_argument("--max-foreign", type=float, default=None,
                        help="re-run an arm while other processes used more than this many cores during it "
                             "(default: never re-run)")
    parser.add_argument("--retries", type=int, default=2, help="at most this many re-runs per arm (--max-foreign)")
    parser.add_argument("--actor-cpus", type=float, default=None,
                        help="experiment: resources.num_cpus_per_actor of the Ray arm (default: the repository's "
                             "automatic share)")
    parser.add_argument("--image-px", default="640x480", help="JPEG size W x H")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    add_model_args(parser)
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--scorer", choices=SCORERS, help=argparse.SUPPRESS)
    for name in ("--data", "--benchmarks", "--model-dir", "--out", "--result", "--scores"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    args.seed_fraction = args.seed_fraction or (0.25 if args.quick else 0.2)
    if args.child:
        return run_child(args)

    scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if bad := [s for s in scorers if s not in SCORERS] + [a for a in arms if a not in ARMS]:
        parser.error(f"unknown scorers/arms {bad}")
    pairs = args.pairs or (8 if args.quick else None)
    sizes = {s: {"pairs": pairs} for s in CONTROLLED} if pairs else None
    image_px = tuple(int(v) for v in args.image_px.lower().split("x"))
    subsets = tuple(CONTROLLED)
    benchmarks = [BENCHMARK[s] for s in subsets]
    seed_everything(args.seed)
    stamp = datetime.now(timezone.utc)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, dict[str, Any]]]] = {s: [] for s in scorers}
    model_sizes = {s: resolve_model_args(args, s) for s in scorers}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = write_whatsup(work / "whatsup", seed=args.seed, subsets=subsets, image_size=image_px, sizes=sizes,
                             pool=32)
        model_dirs = {s: save_model(work / f"{s}_model", s, model_sizes[s], seed=args.seed) for s in scorers}
        for repeat in range(args.repeats):
            for scorer in scorers:
                got = {}
                for arm in arms:
                    print(f"[repeat {repeat + 1}/{args.repeats}] {scorer} {arm} ...", file=sys.stderr, flush=True)
                    got[arm] = launch(args, work, arm=arm, scorer=scorer, model_dir=model_dirs[scorer], data=data,
                                      benchmarks=benchmarks, tag=f"{scorer}_{arm}_{repeat}")
                    loads += [got[arm]["load_before"], got[arm]["load_after"]]
                # Agreement and token counts of this repeat, while the score files exist.
                if "loop" in got:
                    reference = read_scores(got["loop"]["scores_path"])
                    if "ray" in got:
                        got["ray"]["gap_vs_loop"] = max_gap(reference, read_scores(got["ray"]["scores_path"]),
                                                            subset=False)
                    if "seed" in got:
                        seed_scores = read_scores(got["seed"]["scores_path"])
                        got["seed"]["gap_vs_loop"] = max_gap(reference, seed_scores, subset=True)
                        if scorer == "vqascore":
                            shared = sum(int(reference[k]["lm_tokens"]) for k in seed_scores)
                            naive = sum(int(r["lm_tokens"]) for r in seed_scores.values())
                            got["seed"]["lm_tokens"] = {"naive": naive, "shared": shared, "ratio": naive / shared}
                runs[scorer].append(got)
        rows_total = sum(len(m) for m in (json.loads((data / CONTROLLED[s][0]).read_text()) for s in subsets))
    elapsed = time.perf_counter() - started
    foreign = [got[arm]["foreign_cores"] for s in scorers for got in runs[s] for arm in got]

    print(f"Scoring throughput on What'sUp {' + '.join(subsets)} ({rows_total} rows x 4 captions, "
          f"{image_px[0]}x{image_px[1]} JPEGs), batch {args.batch_size}, seed fraction {args.seed_fraction:g}, "
          f"repeats {args.repeats}, seed {args.seed}; {stamp:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s; host "
          f"{os.cpu_count()} cores, 1-min load around the children {min(loads):.2f}-{max(loads):.2f}; cores used by "
          f"other processes during the arms {min(foreign):.2f}-{max(foreign):.2f} (~0 on a quiet host)")
    summary: dict[str, dict[str, Any]] = {}
    for scorer in scorers:
        per_repeat = [summarise_repeat(got, 4.0) for got in runs[scorer]]
        keys = sorted({k for r in per_repeat for k in r})
        summary[scorer] = {k: [r.get(k, float("nan")) for r in per_repeat] for k in keys}
        s = summary[scorer]
        last = runs[scorer][-1]
        print(f"\n{describe_model(scorer, model_sizes[scorer])}")
        if "loop" in last:
            r = last["loop"]
            print(f"  loop  steady {spread(s['loop_rows_per_s'])} rows/s; wall {spread(s['loop_wall_s'])} s (process "
                  f"start to exit); last run: load {r['load_s']:.1f} s, run_local {r['run_s']:.1f} s of which "
                  f"{r['inside_scorer_s']:.1f} s inside the scorer, {r['calls']} calls")
        if "ray" in last:
            r = last["ray"]
            actors = "; ".join(f"pid {a['pid']} threads {a['threads']} load {a['load_seconds']:.1f} s"
                               for a in r["actors"])
            print(f"  ray   steady {spread(s['ray_rows_per_s'])} rows/s; wall {spread(s['ray_wall_s'])} s; fixed "
                  f"(wall - rows/steady) {spread(s['ray_fixed_s'])} s; last run: run_evaluation {r['run_s']:.1f} s, "
                  f"first block after {r['first_block_s']:.1f} s, {r['blocks']} blocks, model_loads "
                  f"{r['model_loads']} ({actors}); max |score - loop| {r.get('gap_vs_loop', float('nan')):.1e}")
        if "seed" in last:
            r = last["seed"]
            shape = ("one call per image, K captions together" if scorer == "clip"
                     else "one call per (image, caption), sharing=none")
            print(f"  seed  {spread(s['seed_rows_per_s'])} rows/s ({r['rows']} rows, {r['pairs']} pairs, {shape}); "
                  f"max |score - loop| {r.get('gap_vs_loop', float('nan')):.1e}")
            if "lm_tokens" in r:
                t = r["lm_tokens"]
                print(f"  LM tokens on the seed rows (scorer's lm_tokens column): naive {t['naive']:,} / shared "
                      f"{t['shared']:,} = F {t['ratio']:.3f}")
        others = ", ".join(f"{arm} {spread([got[arm]['foreign_cores'] for got in runs[scorer]])}" for arm in last)
        reruns = sum(got[arm]["attempts"] - 1 for got in runs[scorer] for arm in got)
        print(f"  cores used by other processes during the arm (kept runs): {others}; arms re-run for foreign load: "
              f"{reruns}")
        for key in ("ray_vs_loop_steady", "ray_vs_loop_e2e", "loop_vs_seed"):
            if key in s:
                print(f"  {key} = {spread(s[key])}")
    token_ratio = [g["seed"]["lm_tokens"]["ratio"] for g in runs.get("vqascore", []) if "lm_tokens" in g.get(
        "seed", {})]
    if args.json:
        slim = {s: [{arm: {k: v for k, v in r.items() if k != "scores_path"} for arm, r in got.items()}
                    for got in runs[s]] for s in scorers}
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "models": model_sizes,
                                         "summary": summary, "runs": slim, "date": stamp.isoformat(),
                                         "loads": loads, "rows": rows_total}, indent=2, default=str))

    def pick(key: str, scorer: str | None = None) -> float:
        if scorer is not None:
            return median(summary.get(scorer, {}).get(key, []))
        values = [median(summary[s][key]) for s in scorers if key in summary[s]]
        return min(values) if values else float("nan")

    if "vqascore" in summary and token_ratio:
        z, f = pick("loop_vs_seed", "vqascore"), median(token_ratio)
        print(f"\nvqascore_loop_vs_seed / token_ratio = {z / f:.3f} (target >= 0.85)")
    print(f"ray_vs_loop_steady={pick('ray_vs_loop_steady'):.3f} ray_vs_loop_e2e={pick('ray_vs_loop_e2e'):.3f} "
          f"vqascore_loop_vs_seed={pick('loop_vs_seed', 'vqascore'):.3f} "
          f"clip_loop_vs_seed={pick('loop_vs_seed', 'clip'):.3f} token_ratio={median(token_ratio):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
