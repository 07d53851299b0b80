"""Scoring throughput: the Ray Data pipeline vs an in-process batched loop vs a seed-style per-image loop.

What it measures
    (item, image) rows per second for the SAME scorer on the SAME data, three ways:

    ray   ``perceive_ray.run.inference.run_eval`` on a local Ray started by this script (CPU decode tasks -> one
          scorer actor -> streamed shards -> metrics). Ray's fixed cost is reported apart from its steady-state
          rate: ``ray.init`` is timed directly; then, on that Ray, run_eval runs a small cold run (discarded), a
          small run of ``--small-batches`` batches per benchmark and the full run. Per benchmark both runs pay the
          same fixed cost F (actor process start, imports, model load, pipeline start, first-batch warm-up), so
          T = F + rows / R gives the steady rate R from the two run times and F from the small one. T is measured
          between run_eval's own '... to go' and 'scores: ...' lines (time-stamped), so the steady part includes
          shard writing, assembly and metrics.
    loop  ``perceive_ray.scoring.local.run_local`` (decode every image, then the scorer over batches of
          ``--batch-size`` rows), timed end to end (decode + scoring); model load and one warm-up batch are timed
          apart (the counterpart of Ray's F).
    seed  the reference's shape (t2v_metrics: ``scores[i] = model([image] * K, texts)``; PROTOCOLS §7 last row):
          one image at a time, decoded once, one scorer call per image holding its K (image, caption) pairs, so the
          image is encoded once per caption. clip: K one-text rows of the same image; vqascore: one row with K texts
          to a ``sharing=none`` scorer (the library's per-pair path). Runs on ``--seed-fraction`` of each subset's
          rows (a rate, so a sample is enough).

    Scorer (``--scorer``), a random-init model whose work is realistic for a CPU (tens of ms per row), written to a
    local directory and loaded through the production loader:
      clip      ``clip_cosine`` on an open_clip ViT-B/16-width vision tower (768 wide, 12 heads, 3 layers, 224 px)
                and a 512-wide 2-layer text tower (``load_clip``) -- the default;
      vqascore  VQAScore (t2v, chat, pad, ``sharing=shared``) on a LLaVA whose CLIP vision tower (256 wide, 2
                layers) runs at 336 px / patch 14 -> V = 576 visual tokens like LLaVA-1.5, with a 256-wide 3-layer
                LLaMA LM and the tiny offline tokenizer (``load_llava``).
    Data: the What'sUp skeletons of ``prefix_tokens.py`` (published layout and sizes; default Controlled A + B =
    820 rows x 4 captions) with 640 x 480 JPEGs, so decoding costs what a COCO-sized photo costs.

Fairness: the loop runs torch with ``--threads`` intra-op threads; the Ray actor gets ``num_cpus=--threads`` (Ray
then sets OMP_NUM_THREADS to the same number) on a Ray started with ``--threads + 1`` logical CPUs so the decode
tasks (0.25 CPU each) can run beside the actor. Scores of all three arms are compared (max |delta|).

Output: a table, and as the LAST line ``ray_vs_loop=X ray_vs_seed=Y``: Ray steady-state rows/s over the loop's
rows/s and over the seed loop's rows/s (> 1 = Ray faster). ``--quick`` uses 8 object pairs per subset, batch 8.
Usage::

    .venv/bin/python benchmarks/pipeline_throughput.py [--quick] [--scorer clip|vqascore] [--subsets all]
        [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_tokens import BENCHMARK, CONTROLLED, SUBSETS, seed_everything, write_whatsup  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Shared helpers (pipeline_memory.py imports these).


SCORERS = ("clip", "vqascore")
# Per scorer: a random-init model whose work is realistic for a CPU (tens of ms per row at batch 16 on 2 cores).
MODEL_DEFAULTS = {
    # ViT-B/16 width (768, 12 heads) x 3 layers at 224 px; 512-wide 2-layer text tower (49,408 tokens, context 77).
    "clip": {"width": 768, "layers": 3, "image_size": 224, "patch_size": 16, "text_width": 512, "text_layers": 2},
    # LLaVA layout: CLIP vision 256 x 2 layers at 336 px / patch 14 -> V = 576 like LLaVA-1.5; LLaMA LM 256 x 3.
    "vqascore": {"width": 256, "layers": 2, "image_size": 336, "patch_size": 14, "text_width": 256, "text_layers": 3},
}


def clip_model_cfg(*, width: int, layers: int, text_width: int, text_layers: int, image_size: int,
                   patch_size: int, embed_dim: int = 512) -> dict[str, Any]:
    """An open_clip ``model_cfg``: ViT with 64-wide heads, OpenAI-style text tower (49,408 tokens, context 77)."""
    return {"embed_dim": embed_dim, "quick_gelu": True,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "head_width": 64,
                           "patch_size": patch_size},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width,
                         "heads": max(1, text_width // 64), "layers": text_layers}}


def save_clip_dir(path: Path, model_cfg: dict[str, Any], *, seed: int) -> Path:
    """Random-init open_clip model written as a local directory (config + safetensors) that ``load_clip`` reads;
    the same layout as ``perceive_ray.models.clip.save_tiny_clip``, with a caller-chosen size."""
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    from perceive_ray.models.clip import CONFIG_FILE, WEIGHTS_FILE

    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.CLIP(**model_cfg)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN),
                                                         "std": list(OPENAI_DATASET_STD),
                                                         "interpolation": "bicubic", "resize_mode": "shortest"}}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous() for k, v in clip.state_dict().items()}, str(path / WEIGHTS_FILE))
    return path


def save_llava_dir(path: Path, *, width: int, layers: int, image_size: int, patch_size: int, text_width: int,
                   text_layers: int, seed: int) -> Path:
    """Random-init LLaVA (transformers Llava layout, ``chat`` template) with caller-chosen sizes, written like
    ``perceive_ray.models.llava.save_tiny_llava`` (same offline tokenizer, processor and sidecar) for ``load_llava``."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from perceive_ray.models.llava import SIDECAR, build_tiny_tokenizer
    from perceive_ray.scoring.prompts import IMAGE_PLACEHOLDER

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=max(1, width // 64), image_size=image_size, patch_size=patch_size,
                              projection_dim=width)
    heads = max(1, text_width // 64)
    text = LlamaConfig(hidden_size=text_width, intermediate_size=(text_width * 8 // 3) // 16 * 16,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=ids("<s>"),
                       eos_token_id=ids("</s>"), pad_token_id=ids("<unk>"), tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids(IMAGE_PLACEHOLDER),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch_size) ** 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    (path / SIDECAR).write_text(json.dumps({"template": "chat"}) + "\n", encoding="utf-8")
    return path


def add_model_args(parser: argparse.ArgumentParser, *, scorer: str = "clip",
                   defaults: dict[str, dict[str, int]] = MODEL_DEFAULTS) -> None:
    group = parser.add_argument_group("random-init scorer model (defaults depend on --scorer)")
    group.add_argument("--scorer", default=scorer, choices=SCORERS,
                       help="clip: clip_cosine on an open_clip ViT; vqascore: VQAScore (t2v, chat) on a LLaVA")
    for name, help_ in (("width", "vision width"), ("layers", "vision layers"), ("image-size", "vision input px"),
                        ("patch-size", "vision patch px"), ("text-width", "text tower / LM width"),
                        ("text-layers", "text tower / LM layers")):
        shown = ", ".join(f"{s} {d[name.replace('-', '_')]}" for s, d in defaults.items())
        group.add_argument(f"--{name}", type=int, default=None, help=f"{help_} (default: {shown})")
    parser.set_defaults(_model_defaults=defaults)


def resolve_model_args(args: argparse.Namespace) -> dict[str, int]:
    """The model sizes: explicit options over the scorer's defaults."""
    sizes = dict(args._model_defaults[args.scorer])
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    return sizes


def save_model(path: Path, scorer: str, sizes: dict[str, int], *, seed: int) -> Path:
    if scorer == "clip":
        return save_clip_dir(path, clip_model_cfg(**sizes), seed=seed)
    return save_llava_dir(path, **sizes, seed=seed)


def describe_model(scorer: str, sizes: dict[str, int]) -> str:
    vision = f"vision {sizes['width']}w x {sizes['layers']}L @ {sizes['image_size']}px/{sizes['patch_size']}"
    if scorer == "clip":
        text = f"text {sizes['text_width']}w x {sizes['text_layers']}L"
        return f"clip_cosine on a random-init open_clip ({vision}, {text})"
    visual = (sizes["image_size"] // sizes["patch_size"]) ** 2
    return (f"vqascore (t2v, chat, pad) on a random-init LLaVA ({vision} -> V={visual}, LM {sizes['text_width']}w x "
            f"{sizes['text_layers']}L)")


def experiment(*, data: Path, benchmarks: list[str], model_dir: Path, out: Path, batch_size: int,
               actor_cpus: float, seed: int, scorer: str = "clip", sharing: str = "shared",
               name: str = "benchmark", limit: int | None = None):
    """An ExperimentConfig for run_eval / run_local over ``benchmarks`` under ``data``."""
    from perceive_ray.config import validate

    if scorer == "clip":
        model = {"family": "clip", "source": str(model_dir), "dtype": "float32"}
        scoring = {"name": "clip_cosine", "batch_size": batch_size, "options": {"clip_transform": "val"}}
    else:
        model = {"family": "llava", "source": str(model_dir), "dtype": "float32"}
        scoring = {"name": "vqascore", "batch_size": batch_size,
                   "options": {"mode": "t2v", "template": "chat", "image_preprocess": "pad", "sharing": sharing}}
    return validate({
        "name": name, "seed": seed,
        "benchmarks": [{"name": b, "root": str(data), "limit": limit} for b in benchmarks],
        "model": model, "scorer": scoring,
        "resources": {"num_actors": 1, "num_cpus_per_actor": actor_cpus, "num_gpus_per_actor": 0},
        "output_dir": str(out), "on_error": "fail",
    }, source="benchmarks")


def start_ray(num_cpus: int) -> float:
    """A fresh local Ray instance owned by this process (never an existing cluster); returns ray.init seconds."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    seconds = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False
    return seconds


class StampedLines:
    """A text stream that records (monotonic time, line) for every complete line and forwards to ``target``."""

    def __init__(self, target, sink: list[tuple[float, str, str]], name: str, echo: bool):
        self.target, self.sink, self.name, self.echo = target, sink, name, echo
        self.buffer = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        now = time.perf_counter()
        with self.lock:
            self.buffer += text
            *lines, self.buffer = self.buffer.split("\n")
            for line in lines:
                self.sink.append((now, self.name, line))
        if self.echo:
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        if self.echo:
            self.target.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def stamped_output(echo: bool = False):
    """Time-stamp every line run_eval prints (stdout and stderr) while inside the block."""
    lines: list[tuple[float, str, str]] = []
    old = sys.stdout, sys.stderr
    sys.stdout = StampedLines(old[0], lines, "stdout", echo)
    sys.stderr = StampedLines(old[1], lines, "stderr", echo)
    try:
        yield lines
    finally:
        sys.stdout, sys.stderr = old


START_RE = re.compile(r"^(\S+): (\d+)/(\d+) image rows already scored, (\d+) to go$")


def parse_ray_timeline(lines: list[tuple[float, str, str]]) -> dict[str, dict[str, float]]:
    """Per benchmark, from run_eval's own lines: rows to score, and the seconds from the '... to go' line (printed
    before the dataset is built) to the 'scores: ...' line (printed after shards, scores.parquet and metrics)."""
    benches: dict[str, dict[str, float]] = {}
    current = None
    for t, _, line in lines:
        if m := START_RE.match(line):
            current = m.group(1)
            benches[current] = {"rows": int(m.group(4)), "t_start": t}
        elif line.startswith("scores: ") and current is not None:
            benches[current]["seconds"] = t - benches[current].pop("t_start")
            current = None
    if broken := [name for name, b in benches.items() if "seconds" not in b]:
        raise RuntimeError(f"run_eval output not understood for {broken}: the progress lines changed?")
    return benches


def max_score_gap(reference: dict[str, list[dict]], other: dict[str, list[dict]], *, sample: bool = False) -> float:
    """max |score delta| between two {benchmark: rows} tables; ``sample``: ``other`` may cover a subset of rows."""
    key = lambda r: (r["item_id"], r["image_index"], r["text_index"])  # noqa: E731
    gap = 0.0
    for bench, rows in other.items():
        ref = {key(r): r["score"] for r in reference[bench]}
        missing = [key(r) for r in rows if key(r) not in ref]
        if missing or (not sample and len(rows) != len(ref)):
            raise AssertionError(f"{bench}: score tables differ in rows ({len(ref)} vs {len(rows)}; {missing[:3]})")
        gap = max([gap, *(abs(ref[key(r)] - r["score"]) for r in rows)])
    return gap


# ---------------------------------------------------------------------------------------------------------------
# The three arms.


def timed_run_eval(config, run_id: str, echo: bool) -> tuple[dict[str, dict[str, float]], float, list]:
    from perceive_ray.run.inference import run_eval

    start = time.perf_counter()
    with stamped_output(echo) as lines:
        results = run_eval(config, run_id=run_id, track=False)
    return parse_ray_timeline(lines), time.perf_counter() - start, results


def run_ray_arm(config, small_config, *, ray_cpus: int, run_id: str, echo: bool) -> dict[str, Any]:
    """ray.init, then run_eval three times on the same local Ray: a small cold run (discarded: the first run of a
    fresh Ray also warms the decode workers and the driver's imports), a small warm run, the full run. Per benchmark
    the full and the small run share the fixed cost F (actor process start, imports, model load, pipeline start,
    first-batch warm-up), so T = F + rows / R gives R = (rows_full - rows_small) / (T_full - T_small) and
    F = T_small - rows_small / R. Whole-run endpoints are used, not the progress lines in between: on a busy host
    the driver receives result blocks in bursts, which biases a slope between progress lines."""
    import pyarrow.parquet as pq
    import ray

    init_s = start_ray(ray_cpus)
    try:
        cold, _, _ = timed_run_eval(small_config, f"{run_id}-cold", echo)
        small, _, _ = timed_run_eval(small_config, f"{run_id}-small", echo)
        full, full_wall, results = timed_run_eval(config, f"{run_id}-full", echo)
    finally:
        t = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t
    benches = {}
    for name, b in full.items():
        s_rows, s_t = small[name]["rows"], small[name]["seconds"]
        rate = (b["rows"] - s_rows) / max(b["seconds"] - s_t, 1e-9)
        fixed = s_t - s_rows / rate
        benches[name] = {"rows": b["rows"], "seconds": b["seconds"], "small_rows": s_rows, "small_seconds": s_t,
                         "rate": rate, "fixed_s": fixed, "cold_fixed_s": cold[name]["seconds"] - s_rows / rate,
                         "steady_s": b["rows"] / rate}
    rows = sum(b["rows"] for b in benches.values())
    steady_s = sum(b["steady_s"] for b in benches.values())
    scores = {r.benchmark: pq.read_table(r.scores_path).to_pylist() for r in results}
    return {"init_s": init_s, "run_eval_s": full_wall, "shutdown_s": shutdown_s, "rows": rows,
            "fixed_s": sum(b["fixed_s"] for b in benches.values()),
            "cold_fixed_s": sum(b["cold_fixed_s"] for b in benches.values()),
            "steady_s": steady_s, "rows_per_s": rows / steady_s,
            "end_to_end_rows_per_s": rows / (init_s + full_wall),
            "benchmarks": benches, "scores": scores}


def load_warm(config, manifests: dict[str, Any], kind: str):
    """build_scorer + warm_up, timed: the in-process counterpart of Ray's fixed cost."""
    from perceive_ray.scoring.local import build_scorer

    t = time.perf_counter()
    scorer = build_scorer(config.model, config.scorer)
    warm_up(scorer, next(iter(manifests.values())), config.scorer.batch_size, kind)
    return scorer, time.perf_counter() - t


def run_loop_arm(config, manifests: dict[str, Any], scorer, load_s: float) -> dict[str, Any]:
    from perceive_ray.scoring.local import run_local

    wall = model = 0.0
    rows = 0
    scores = {}
    for name, manifest in manifests.items():
        t = time.perf_counter()
        result = run_local(manifest, scorer, batch_size=config.scorer.batch_size)
        wall += time.perf_counter() - t
        model += result.seconds
        scores[name] = result.scores.to_pylist()
        rows += sum(len(item.images) for item in manifest.items)
    return {"load_s": load_s, "wall_s": wall, "model_s": model, "decode_s": wall - model, "rows": rows,
            "rows_per_s": rows / wall, "scores": scores}


def seed_batch(row: dict[str, Any], image, kind: str) -> dict[str, list]:
    """The per-image call of the reference's shape: K (image, caption) pairs, the image encoded once per caption.
    clip: K one-text rows of the same image (the CLIP scorer encodes each row's image); vqascore: one row with K
    texts for a ``sharing=none`` scorer (the library's per-pair path re-encodes the image per candidate)."""
    context = {name: row[name] for name in ("item_id", "image_index", "subset", "group", "meta", "benchmark")}
    if kind == "clip":
        k = len(row["texts"])
        return {**{name: [value] * k for name, value in context.items()}, "image": [image] * k,
                "texts": [[text] for text in row["texts"]]}
    return {**{name: [value] for name, value in context.items()}, "image": [image], "texts": [list(row["texts"])]}


def warm_up(scorer, manifest, batch_size: int, kind: str) -> None:
    """One production batch and one seed-shaped call, untimed: the first calls of a fresh process pay for kernel
    selection and allocator growth, which Ray's steady-state rate excludes too (it lands in Ray's fixed cost)."""
    from perceive_ray.data.images import load_rgb, scoring_rows

    rows = scoring_rows(manifest)[:batch_size]
    images = [load_rgb(manifest.root, row["image_path"]) for row in rows]
    batch = {name: [row[name] for row in rows] for name in rows[0] if name != "image_path"}
    scorer({**batch, "image": images})
    scorer(seed_batch(rows[0], images[0], kind))


def run_seed_arm(scorer, manifests: dict[str, Any], *, fraction: float, kind: str) -> dict[str, Any]:
    """One image at a time (decoded once), one scorer call per image with its K (image, caption) pairs, the image
    re-encoded for every caption: the shape of the reference's t2v_metrics loop (PROTOCOLS §7, last row)."""
    from perceive_ray.data.images import load_rgb, scoring_rows

    wall = 0.0
    rows = pairs = 0
    scores = {}
    for name, manifest in manifests.items():
        subset_rows = scoring_rows(manifest)
        take = subset_rows[: max(1, math.ceil(len(subset_rows) * fraction))]
        out = []
        t = time.perf_counter()
        for row in take:
            got = scorer(seed_batch(row, load_rgb(manifest.root, row["image_path"]), kind))
            for j, score in enumerate(got["score"]):
                k = j if kind == "clip" else got["text_index"][j]
                out.append({"item_id": row["item_id"], "image_index": row["image_index"], "text_index": k,
                            "score": score})
            pairs += len(row["texts"])
        wall += time.perf_counter() - t
        rows += len(take)
        scores[name] = out
    return {"wall_s": wall, "rows": rows, "pairs": pairs, "rows_per_s": rows / wall, "scores": scores}


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 object pairs per Controlled subset, batch 8")
    parser.add_argument("--subsets", default="controlled_a,controlled_b",
                        help=f"comma-separated from {','.join(SUBSETS)}, or 'all'")
    parser.add_argument("--batch-size", type=int, default=None, help="scoring rows per batch (default 16; quick 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads in the loop = CPUs of the Ray actor (default: all cores)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default threads+1)")
    parser.add_argument("--actor-cpus", type=float, default=None,
                        help="num_cpus of the scorer actor (default --threads; the repo default is 0.5)")
    parser.add_argument("--seed-fraction", type=float, default=None,
                        help="fraction of each subset's rows for the seed loop (default 0.2; quick 0.25)")
    parser.add_argument("--small-batches", type=int, default=2,
                        help="size of Ray's small run, in scorer batches per benchmark (fixed-cost fit)")
    parser.add_argument("--arms", default="ray,loop,seed", help="which arms, in this order")
    parser.add_argument("--repeats", type=int, default=1, help="repeat every arm; medians are reported")
    parser.add_argument("--image-px", default="640x480", help="JPEG size W x H")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--echo", action="store_true", help="show run_eval's own output")
    parser.add_argument("--json", type=Path, default=None)
    add_model_args(parser)
    args = parser.parse_args(argv)
    subsets = SUBSETS if args.subsets == "all" else tuple(s.strip() for s in args.subsets.split(","))
    if unknown := [s for s in subsets if s not in SUBSETS]:
        parser.error(f"unknown subsets {unknown}")
    arms = [a.strip() for a in args.arms.split(",")]
    if unknown := [a for a in arms if a not in ("ray", "loop", "seed")]:
        parser.error(f"unknown arms {unknown}")
    kind, sizes_model = args.scorer, resolve_model_args(args)
    batch_size = args.batch_size or (8 if args.quick else 16)
    seed_fraction = args.seed_fraction or (0.25 if args.quick else 0.2)
    ray_cpus = args.ray_cpus or args.threads + 1
    actor_cpus = args.actor_cpus or float(args.threads)
    image_px = tuple(int(v) for v in args.image_px.lower().split("x"))

    import torch

    from perceive_ray.data.catalog import load_benchmark

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    sizes = {s: {"pairs": 8} for s in CONTROLLED} if args.quick else None
    if args.quick:
        sizes.update({s: {"groups": {"lr": 12, "tb": 12}} for s in SUBSETS if s not in CONTROLLED})
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        work = args.workdir or Path(tmp)
        data = write_whatsup(work / "whatsup", seed=args.seed, subsets=subsets, image_size=image_px, sizes=sizes,
                             pool=32)
        model_dir = save_model(work / f"{kind}_model", kind, sizes_model, seed=args.seed)
        manifests = {BENCHMARK[s]: load_benchmark(BENCHMARK[s], data, strict_sizes=not args.quick) for s in subsets}
        common = {"data": data, "benchmarks": list(manifests), "model_dir": model_dir, "out": work / "runs",
                  "batch_size": batch_size, "actor_cpus": actor_cpus, "seed": args.seed, "scorer": kind}
        config = experiment(**common)
        small_config = experiment(**common, limit=args.small_batches * batch_size)
        # The seed arm: CLIP scores each (image, text) independently anyway; VQAScore uses its per-pair path.
        seed_config = experiment(**common, sharing="none") if kind == "vqascore" else config
        runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
        scorers: dict[str, tuple[Any, float]] = {}
        stamp = datetime.now(timezone.utc)
        load_before = os.getloadavg()[0]
        for repeat in range(args.repeats):
            for arm in arms:
                print(f"[repeat {repeat + 1}/{args.repeats}] {arm} ...", file=sys.stderr, flush=True)
                if arm == "ray":
                    runs[arm].append(run_ray_arm(config, small_config, ray_cpus=ray_cpus, run_id=f"ray-{repeat}",
                                                 echo=args.echo))
                    continue
                use = config if arm == "loop" else seed_config
                key = use.scorer.model_dump_json()
                if key not in scorers:  # model load + warm-up timed once, reused by later repeats and arms
                    scorers[key] = load_warm(use, manifests, kind)
                scorer, load_s = scorers[key]
                if arm == "loop":
                    runs[arm].append(run_loop_arm(config, manifests, scorer, load_s))
                else:
                    runs[arm].append(run_seed_arm(scorer, manifests, fraction=seed_fraction, kind=kind))

    load_after = os.getloadavg()[0]

    def med(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    rows_total = sum(sum(len(i.images) for i in m.items) for m in manifests.values())
    pairs_total = sum(sum(len(i.images) * len(i.texts) for i in m.items) for m in manifests.values())
    print(f"Scoring throughput, {describe_model(kind, sizes_model)}; {'+'.join(subsets)}: {rows_total} rows / "
          f"{pairs_total} (image, text) pairs, {image_px[0]}x{image_px[1]} JPEGs, batch {batch_size}, threads "
          f"{args.threads}, Ray CPUs {ray_cpus} (actor {actor_cpus:g}), repeats {args.repeats}, seed {args.seed}; "
          f"{stamp:%Y-%m-%d %H:%M} UTC; host {os.cpu_count()} cores, 1-min load {load_before:.1f} before / "
          f"{load_after:.1f} after (anything above ~0.5 on an idle host means the timings are noisy)")
    summary: dict[str, Any] = {}
    if "loop" in runs:
        summary["loop"] = {k: med("loop", k) for k in ("rows_per_s", "wall_s", "model_s", "decode_s", "load_s")}
        r = summary["loop"]
        print(f"loop  {r['rows_per_s']:8.2f} rows/s   wall {r['wall_s']:.1f} s = decode {r['decode_s']:.1f} + model "
              f"{r['model_s']:.1f}; model load + warm-up {r['load_s']:.1f} s (excluded)")
        if not args.quick and r["model_s"] < 60:
            print(f"note: in-process model time {r['model_s']:.0f} s < 60 s; lengthen with --layers or --subsets all")
    if "seed" in runs:
        summary["seed"] = {k: med("seed", k) for k in ("rows_per_s", "wall_s", "rows", "pairs")}
        r = summary["seed"]
        print(f"seed  {r['rows_per_s']:8.2f} rows/s   {r['rows']:.0f} rows ({r['pairs']:.0f} pairs, one call per image"
              f"{', sharing=none' if kind == 'vqascore' else ''}) in {r['wall_s']:.1f} s (fraction {seed_fraction:g})")
    if "ray" in runs:
        keys = ("rows_per_s", "end_to_end_rows_per_s", "init_s", "fixed_s", "cold_fixed_s", "steady_s", "run_eval_s",
                "shutdown_s")
        summary["ray"] = {k: med("ray", k) for k in keys}
        r = summary["ray"]
        print(f"ray   {r['rows_per_s']:8.2f} rows/s steady-state   (end to end, ray.init + run_eval of the full data: "
              f"{r['end_to_end_rows_per_s']:.2f} rows/s)")
        print(f"      fixed: ray.init {r['init_s']:.1f} s; per run_eval {r['fixed_s']:.1f} s warm / "
              f"{r['cold_fixed_s']:.1f} s first run on a fresh Ray (actor start, imports, model load, pipeline "
              f"start, summed over {len(manifests)} benchmark(s)); steady {r['steady_s']:.1f} s; "
              f"shutdown {r['shutdown_s']:.1f} s")
        for name, b in runs["ray"][-1]["benchmarks"].items():
            print(f"      {name}: {b['rows']} rows in {b['seconds']:.1f} s, {b['small_rows']} rows in "
                  f"{b['small_seconds']:.1f} s -> {b['rate']:.2f} rows/s, fixed {b['fixed_s']:.1f} s")
    if "loop" in runs:
        reference = runs["loop"][0]["scores"]
        gaps = [f"{arm} vs loop {max_score_gap(reference, runs[arm][0]['scores'], sample=arm == 'seed'):.1e}"
                for arm in ("ray", "seed") if arm in runs]
        if gaps:
            print("max |score delta|: " + "; ".join(gaps))
    if args.json:
        slim = {arm: [{k: v for k, v in r.items() if k != "scores"} for r in rs] for arm, rs in runs.items()}
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "model": sizes_model,
                                         "summary": summary, "runs": slim, "date": stamp.isoformat(),
                                         "load_before": load_before, "load_after": load_after},
                                        indent=2, default=str))
    if "ray" in summary and "loop" in summary and "seed" in summary:
        print(f"ray_vs_loop={summary['ray']['rows_per_s'] / summary['loop']['rows_per_s']:.3f} "
              f"ray_vs_seed={summary['ray']['rows_per_s'] / summary['seed']['rows_per_s']:.3f}")
    else:
        print("ray_vs_loop=nan ray_vs_seed=nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
