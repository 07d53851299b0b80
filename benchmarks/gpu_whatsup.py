"""What'sUp Controlled A+B through the eval path with a LLaVA-1.5-7B-shaped model on one GPU: shared prefix vs naive.

What it measures
    The seconds of ``experiments/eval/llava15_whatsup.yaml`` (VQAScore t2v, ``chat``, ``pad``) at full size --
    Controlled A 412 images + Controlled B 408 images, 4 captions each -- on one GPU, through ``run_eval`` (the
    ``perceive-ray eval`` path: Ray Data, one scorer actor with the GPU) or, with ``--executor local``, through the
    same evaluation core in this process (the ``perceive-ray score`` path), with ``scorer.options.sharing`` shared
    (default) and ``none`` (naive: one full sequence per (image, caption), image re-encoded each time).

How
    1. Synthetic What'sUp in the published layout: ``perceive_ray.data.synthetic.generate(out, seed=0, pairs=103)``
       (103 object pairs = 412 images per Controlled subset); B is limited to its published 408 images
       (``benchmarks.1.limit=408``) when ``--pairs`` >= 102.
    2. A random-init model with LLaVA-1.5-7B's exact shapes (``perceive_ray.models.tiny.llava_15_7b_shapes``: CLIP
       ViT-L/14-336 tower, mlp2x_gelu projector, LLaMA-2-7B, 32,001 LM rows) built from a config written in code,
       initialised directly on the GPU in bf16 (never on the CPU, never downloaded) and saved with the offline
       tokenizer where ``load_llava`` reads it. The tokenizer is the library's offline LLaMA-like BPE: prompts are
       ~40 text tokens + 576 image positions, suffixes ~13 tokens (LLaMA's are ~23; PROTOCOLS §4).
    3. ``load_config`` on the real experiment file with overrides (model.source/dtype, benchmark roots, B limit,
       batch sizes, output dir), then the shared eval and the naive eval on the same warm machine (one local Ray
       started once for both; ray.init timed apart).
    4. GPU busy fraction: NVML ``utilization.gpu`` (the share of each sample period in which a kernel ran) sampled
       every ``--sample-s`` during each eval, from ``pynvml`` or else ``nvidia-smi``; reported over the whole eval and
       over its scoring window (first to last score block).

Output: timings, then as the LAST line ``gpu_whatsup_ab_s=T shared_vs_naive=R gpu_busy=U``: T = wall seconds of
the shared-prefix eval (run_eval / run_evaluation, model load included); R = naive eval seconds / T; U = mean GPU
busy fraction during the shared eval (nan on CPU). Without CUDA (and ``--device cuda``, the default) it prints one
line saying so and exits 0. Testing on a CPU: ``--shape tiny --device cpu --pairs 2``. Usage (on a GPU host)::

    python3 benchmarks/gpu_whatsup.py [--executor ray|local] [--batch-size 16] [--naive-batch-size 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere (e.g. the GPU host, where perceive_ray is not installed)
sys.path.insert(0, str(Path(__file__).resolve().parent))
EXPERIMENT = REPO / "experiments" / "eval" / "llava15_whatsup.yaml"
B_PUBLISHED_IMAGES = 408


class GpuSampler:
    """Samples NVML's utilization.gpu (percent of the last sample period with a kernel running) in a thread."""

    def __init__(self, interval: float, device_index: int = 0) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self.source = "none"
        self._read = self._nvml(device_index) or self._smi(device_index)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _nvml(self, index: int):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception:  # noqa: BLE001 - fall back to nvidia-smi
            return None
        self.source = "nvml utilization.gpu (pynvml)"
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _smi(self, index: int):
        if shutil.which("nvidia-smi") is None:
            return None
        self.source = "nvidia-smi utilization.gpu"

        def read() -> float:
            out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            return float(out.stdout.strip().splitlines()[0])
        return read

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self._read()))
            except Exception:  # noqa: BLE001 - a diagnostic must never fail the run
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def busy(self, start: float, end: float) -> float:
        """Mean utilization (0-1) of the samples taken in [start, end]."""
        values = [v for t, v in self.samples if start <= t <= end]
        return sum(values) / len(values) / 100.0 if values else float("nan")


def build_model(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Write the random-init model (7B shapes on the GPU in bf16, or the tiny test shape) where load_llava reads it."""
    import torch

    from perceive_ray.models.tiny import llava_15_7b_shapes, save_llava

    if args.shape == "llava15_7b":
        shapes, dtype = llava_15_7b_shapes(), args.dtype
    else:  # the tests' tiny LLaVA sizes (V = 64)
        from perceive_ray.models.llava import TINY_IMAGE_SIZE, TINY_LLAVA_SIZES, TINY_PATCH_SIZE

        shapes = {**TINY_LLAVA_SIZES, "image_size": TINY_IMAGE_SIZE, "patch_size": TINY_PATCH_SIZE}
        dtype = args.dtype if args.device == "cuda" else "float32"
    start = time.perf_counter()
    save_llava(path, seed=args.seed, template="chat", dtype=dtype, device=args.device, **shapes)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"seconds": time.perf_counter() - start, "dtype": dtype, "bytes": size, "shapes": shapes}


def eval_config(args: argparse.Namespace, *, model_dir: Path, data: Path, out: Path, sharing: str, dtype: str):
    from perceive_ray.config import load_config

    overrides: dict[str, Any] = {
        "model.source": str(model_dir), "model.dtype": dtype,
        "benchmarks.0.root": str(data / "whatsup"), "benchmarks.1.root": str(data / "whatsup"),
        "scorer.batch_size": args.batch_size if sharing == "shared" else args.naive_batch_size,
        "scorer.options.sharing": sharing, "output_dir": str(out),
        "resources.num_gpus_per_actor": 1 if args.device == "cuda" else 0,
    }
    if args.pairs >= B_PUBLISHED_IMAGES // 4:
        overrides["benchmarks.1.limit"] = B_PUBLISHED_IMAGES
    if args.device == "cpu":
        overrides["scorer.options.device"] = "cpu"
    return load_config(args.experiment, overrides)


def run_one(args: argparse.Namespace, config, run_id: str, sampler_interval: float) -> dict[str, Any]:
    from harness import StampedExecutor

    from perceive_ray.evaluation import run_evaluation

    if args.executor == "ray":
        from perceive_ray.run.inference import RayDataExecutor

        executor = StampedExecutor(RayDataExecutor())
    else:
        from perceive_ray.scoring.local import LocalExecutor

        executor = StampedExecutor(LocalExecutor())
    sampler = GpuSampler(sampler_interval) if args.device == "cuda" else None
    start = time.perf_counter()
    if sampler:
        sampler.__enter__()
    try:
        results = run_evaluation(config, executor, run_id=run_id, track=False)
    finally:
        end = time.perf_counter()
        if sampler:
            sampler.__exit__()
    record = json.loads((config.output_dir / run_id / "run_record.json").read_text())["evaluations"][-1]
    stamps = executor.stamps
    first, last = (stamps[0][0], stamps[-1][0]) if stamps else (start, end)
    pairs = sum(n for _, n in stamps)
    rows = {r.benchmark: r.rows_scored_now for r in results}
    metrics = {r.benchmark: {k: round(v, 4) for k, v in r.report.metrics.items()
                             if k in ("2way/individual_acc", "2way/pair_acc")} for r in results}
    return {"seconds": end - start, "first_block_s": first - start, "scoring_window_s": last - first,
            "pairs": pairs, "rows": rows, "model_loads": record["model_loads"],
            "load_seconds": [a.get("load_seconds") for a in record["actors"]],
            "devices": [a.get("device") for a in record["actors"]], "metrics": metrics,
            "scores": {r.benchmark: str(r.scores_path) for r in results},
            "busy": sampler.busy(start, end) if sampler else float("nan"),
            "busy_scoring": sampler.busy(first, last) if sampler else float("nan"),
            "busy_source": sampler.source if sampler else "none (device cpu)",
            "busy_samples": len(sampler.samples) if sampler else 0}


def score_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """max |score| difference between two evals' score tables (same rows)."""
    import pyarrow.parquet as pq

    gap = 0.0
    for bench, path in a["scores"].items():
        key = ("item_id", "image_index", "text_index")
        left = {tuple(r[k] for k in key): r["score"] for r in pq.read_table(path).to_pylist()}
        for r in pq.read_table(b["scores"][bench]).to_pylist():
            gap = max(gap, abs(left[tuple(r[k] for k in key)] - r["score"]))
    return gap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("llava15_7b", "tiny"), default="llava15_7b",
                        help="llava15_7b: LLaVA-1.5-7B's exact shapes; tiny: the tests' tiny LLaVA (for CPU tests)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="weights and compute on CUDA (the reference uses bf16); CPU runs use float32")
    parser.add_argument("--pairs", type=int, default=103, help="object pairs per Controlled subset (103 = full A)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="scorer.batch_size of the shared eval: images per call (vision batch; the prefix is "
                             "prefilled per image, its K suffixes together)")
    parser.add_argument("--naive-batch-size", type=int, default=8,
                        help="scorer.batch_size of the naive eval: images per call, x 4 captions = sequences per "
                             "forward (8 -> 32 sequences of ~620 tokens)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="ray: run_eval's Ray Data executor (perceive-ray eval); local: the in-process executor "
                             "(perceive-ray score), for hosts without Ray")
    parser.add_argument("--arms", default="shared,naive", help="which evals, in this order")
    parser.add_argument("--experiment", type=Path, default=EXPERIMENT)
    parser.add_argument("--sample-s", type=float, default=0.1, help="GPU utilisation sampling interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="reuse a model written by an earlier run (skips building it)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_whatsup: skipped, CUDA is not available (torch {torch.__version__}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); nothing was run")
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if bad := [a for a in arms if a not in ("shared", "naive")]:
        parser.error(f"unknown arms {bad}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from perceive_ray.data.synthetic import generate

    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_whatsup_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        data = work / "synth"
        generate(data, seed=args.seed, pairs=args.pairs, overwrite=True)
        synth_s = time.perf_counter() - t
        if args.model_dir is not None and (args.model_dir / "config.json").is_file():
            model_dir = args.model_dir
            build = {"seconds": 0.0, "dtype": args.dtype if args.device == "cuda" else "float32", "bytes": 0,
                     "reused": True}
        else:
            model_dir = args.model_dir or work / f"llava_{args.shape}"
            build = build_model(args, model_dir)
        dtype = build["dtype"]
        device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
        print(f"model: {args.shape} random init, {dtype}, {build['bytes'] / 1e9:.2f} GB written in "
              f"{build['seconds']:.1f} s on {device_name}; synthetic data {synth_s:.1f} s", file=sys.stderr)
        ray_init_s = float("nan")
        if args.executor == "ray":
            from harness import start_ray

            from perceive_ray.run.inference import quiet_ray_data

            quiet_ray_data()
            ray_init_s = start_ray()
        try:
            for arm in arms:
                sharing = "shared" if arm == "shared" else "none"
                config = eval_config(args, model_dir=model_dir, data=data, out=work / "runs", sharing=sharing,
                                     dtype=dtype)
                print(f"{arm} eval ...", file=sys.stderr, flush=True)
                results[arm] = run_one(args, config, f"{arm}_{int(time.time())}", args.sample_s)
            gap = score_gap(results["shared"], results["naive"]) if len(results) == 2 else float("nan")
        finally:
            if args.executor == "ray":
                import ray

                ray.shutdown()
    total = time.perf_counter() - started

    print(f"What'sUp Controlled A+B, VQAScore t2v chat pad, {args.shape} ({dtype}) on {device_name}, executor "
          f"{args.executor}, batch {args.batch_size} shared / {args.naive_batch_size} naive; model build+save "
          f"{build['seconds']:.1f} s ({build['bytes'] / 1e9:.1f} GB); ray.init {ray_init_s:.1f} s; script {total:.0f} s")
    for arm, r in results.items():
        print(f"  {arm:<6} {r['seconds']:7.1f} s  rows {r['rows']}  pairs {r['pairs']}  model_loads "
              f"{r['model_loads']} (load {r['load_seconds']} s, {r['devices']})  first block after "
              f"{r['first_block_s']:.1f} s, scoring window {r['scoring_window_s']:.1f} s  GPU busy "
              f"{r['busy']:.2f} whole eval / {r['busy_scoring']:.2f} scoring window ({r['busy_source']}, "
              f"{r['busy_samples']} samples)  metrics {r['metrics']}")
    shared, naive = results.get("shared"), results.get("naive")
    t_shared = shared["seconds"] if shared else float("nan")
    ratio = naive["seconds"] / t_shared if shared and naive else float("nan")
    if shared and naive and shared["scoring_window_s"] > 0:
        print(f"  scoring windows only: naive / shared = "
              f"{naive['scoring_window_s'] / shared['scoring_window_s']:.2f}")
    if shared and naive:
        print(f"  max |score shared - score naive| over all rows: {gap:.2e} ({dtype})")
    busy = shared["busy"] if shared else float("nan")
    print(f"  gpu_busy = mean {shared['busy_source'] if shared else 'none'} over the whole shared eval")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "build": build,
                                         "ray_init_s": ray_init_s, "results": results, "device": device_name},
                                        indent=2, default=str))
    print(f"gpu_whatsup_ab_s={t_shared:.1f} shared_vs_naive={ratio:.2f} "
          f"gpu_busy={'nan' if math.isnan(busy) else f'{busy:.2f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
