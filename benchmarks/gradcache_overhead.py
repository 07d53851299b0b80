"""GradCache overhead: one optimiser step of the VLM2Vec training job (PROTOCOLS §5.6) in GradCache chunks vs the
same step in one chunk, same model, same global batch, same optimiser work; one process, CPU, no Ray.

What it measures
    The job is ``Vlm2VecJob`` built from ``experiments/train/vlm2vec_llava15.yaml`` in smoke mode (DoRA r 8 / alpha
    64 / dropout 0.1 on q/k/v/o/down_proj, gradient checkpointing, InfoNCE at t = 0.02, frozen vision tower +
    projector) with ``model.source`` a random-init tiny LLaVA written by ``perceive_ray.models.llava.save_tiny_llava``
    (CLIP 32w x 3L at 32 px / patch 4 -> V = 64 visual tokens, LLaMA 32w x 2L: 87k parameters, 5.4k trainable) and
    ``resources.num_workers: 1``, so this process holds the whole global batch of ``--batch`` N rows (default 16).
    Rows are what a worker's data shard yields (LCS-558K format: one human turn ``<image>\\n<instruction>``, one gpt
    caption of 4-20 words, float32 pixels): queries are image + instruction (V image tokens + ~10 text tokens),
    targets are the captions (text only). Every step is ``job.collate_chunks(split rows, cpu)`` then
    ``perceive_ray.train.gradcache.run_step(engine, job.compute_loss, batches, seeds)`` with the worker's seeds
    (``chunk_seed(seed, step, rank 0, chunk)``), exactly as ``run/training.py`` runs them, on an engine shim:
    ``__call__`` = the module, ``backward`` = ``loss.backward()``, ``step`` = ``torch.optim.AdamW`` (the config's
    lr / betas / eps / weight decay) stepping at the last chunk of the step, then ``zero_grad``. So every arm does
    the same optimiser work (one AdamW step per training step) and differs only in chunking:

    plain   one chunk of N rows (``train.batch.micro = micro_target = N``): ``run_step``'s one-chunk path, forward +
            loss + backward.
    gc_csK  GradCache with chunk size K (``micro = micro_target = K``, N / K chunks): a no-grad forward per chunk,
            the loss on the cached representations, then per chunk a forward with autograd under the replayed seed
            and the surrogate backward. K = 1 (N chunks) is the §5.6 recipe's chunking and gives the headline; K = 4
            is also reported (``--chunk-sizes``).

    ``--warmup`` W rounds of all arms run untimed, then ``--repeats`` R rounds, each timing every arm once, in an
    order rotated per round (A/B interleaving: drift of the host hits every arm alike). Reported per arm: the
    median (min-max) of the ``run_step`` wall time (the headline quantity), of ``collate_chunks`` (tokenising and
    padding, information), and of the step's phases from the engine shim (no-grad forward, forward with autograd,
    backward, AdamW; the rest is the loss, merging and slicing), and process CPU time / wall time (< 1 with 1 thread
    means the host starved this process). Ratios: median GradCache step / median plain step.

    Correctness, once per model before timing: the adapter dropout set to 0 (no mask to replay), the same weights
    (after the warm-up rounds moved every adapter tensor off its init, so lora_A has a gradient), no optimiser step:
    the loss and the gradient of every trainable tensor of each GradCache chunking vs the one-chunk step; the run
    stops (exit 1) if the largest difference exceeds ``--grad-rtol`` x the largest gradient. (Dropout on, with the
    seeds replayed, is covered by ``tests/unit/test_vlm2vec_job.py`` in float64.)

    Memory (default on, ``--no-memory`` / off in ``--quick``): each arm again in a fresh child process (model,
    collation, then its RSS high-water mark reset through ``/proc/self/clear_refs`` and ``--memory-steps`` steps);
    reported: the peak RSS during the steps (``VmHWM``) and that peak over the resident set just before the first
    step (activations, autograd graph, AdamW state, allocator slack). Imports and the model load peak higher than a
    tiny model's steps, hence the reset.

    Sized model (default on, ``--no-sized`` / off in ``--quick``; information, not the headline): plain vs chunk
    size 1 (``--sized-chunk-sizes``) on a LLaVA whose per-row compute dominates the per-call cost (``--sized-*``;
    default the real V = 576 visual tokens at 48 px / patch 2 and a 256w x 2L LLaMA, 2.0M parameters): where the
    GradCache ratio goes when the model is not tiny. 3 rounds (``--sized-repeats``) after 1 warm-up round.

Output: a summary per model, ``gradcache_vs_plain_cs4=Y`` (chunk size 4, when timed), ``gradcache_vs_plain_sized=Z``
(the sized model at chunk size 1, when run), then as the LAST line ``gradcache_vs_plain=X`` = median GradCache step
time at chunk size 1 / median plain step time on the tiny LLaVA (target <= 2.5). Usage::

    .venv/bin/python benchmarks/gradcache_overhead.py [--quick] [--batch 16] [--chunk-sizes 1,4] [--repeats 9]
        [--warmup 2] [--threads 1] [--no-sized] [--no-memory] [--wait-quiet 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ForeignLoad, host_load, wait_for_quiet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments/train/vlm2vec_llava15.yaml"
SIZED = {"image_size": 48, "patch_size": 2, "text_width": 256, "text_layers": 2}  # V = 576 like LLaVA-1.5
PROMPTS = ("Describe the image concisely.", "Provide a brief description of the given image.",
           "Render a clear and concise summary of the photo.", "Share a concise interpretation of the image provided.",
           "Give a short and clear explanation of the subsequent image.", "Summarize the visual content of the image.")
WORDS = ("a red blue green yellow dog cat mug plate chair table bottle person picture photo of on under left right "
         "in front behind above below with the small large wooden glass standing sitting near street room").split()


# ---------------------------------------------------------------------------------------------------------------
# Model, rows, job


def save_model(path: Path, kind: str, args: argparse.Namespace) -> Path:
    """The tiny LLaVA (``save_tiny_llava``) or the sized one (``models.tiny.save_llava``, tiny vision tower sizes)."""
    if (path / "config.json").is_file():
        return path
    if kind == "tiny":
        from perceive_ray.models.llava import save_tiny_llava

        return save_tiny_llava(path, seed=args.seed)
    from perceive_ray.models.llava import TINY_LLAVA_SIZES
    from perceive_ray.models.tiny import save_llava

    width, layers = args.sized_text_width, args.sized_text_layers
    sizes = {**TINY_LLAVA_SIZES, "text_width": width, "text_layers": layers, "text_heads": max(1, width // 64),
             "text_kv_heads": max(1, width // 64), "text_intermediate": int(width * 2.6875)}  # LLaMA's 11008/4096
    return save_llava(path, seed=args.seed, image_size=args.sized_image_size, patch_size=args.sized_patch_size,
                      **sizes)


def load_experiment(model_dir: Path, batch: int, chunk: int, seed: int, *, grad_checkpointing: bool,
                    dropout: float | None = None):
    from perceive_ray.config import load_config

    overrides: dict[str, Any] = {
        "seed": seed, "model.source": str(model_dir),
        "train.batch": {"global": batch, "micro": chunk, "micro_target": chunk},
        "train.vlm2vec.grad_checkpointing": grad_checkpointing,
        "resources.num_workers": 1}
    if dropout is not None:
        overrides["train.vlm2vec.adapter.dropout"] = dropout
    return load_config(EXPERIMENT, overrides, smoke=True)


def make_rows(n: int, image_size: int, seed: int) -> dict[str, Any]:
    """One step's rows as a worker's shard yields them (numpy batch format, LCS-558K pairs, all with an image)."""
    import numpy as np

    from perceive_ray.randomness import keyed_rng

    rng = keyed_rng(seed, "gradcache_overhead_rows", n)
    humans = [json.dumps([f"<image>\n{PROMPTS[int(rng.integers(len(PROMPTS)))]}"]) for _ in range(n)]
    gpts = [json.dumps([" ".join(rng.choice(WORDS, size=int(rng.integers(4, 21))))]) for _ in range(n)]
    return {"key": np.array([f"llava_558k:{i}" for i in range(n)]), "has_image": np.ones(n, dtype=bool),
            "humans": np.array(humans), "gpts": np.array(gpts), "epoch": np.zeros(n, dtype=np.int64),
            "pixels": rng.standard_normal((n, 3, image_size, image_size)).astype(np.float32),
            "step": np.zeros(n, dtype=np.int64), "slot": np.arange(n)}


def split_rows(rows: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    """As the worker splits a step's rows before ``collate_chunks`` (``run/training.py::split_rows``; not imported:
    that module imports Ray)."""
    import numpy as np

    n = len(rows["step"])
    bounds = np.linspace(0, n, chunks + 1).round().astype(int)
    return [{k: v[bounds[i]: bounds[i + 1]] for k, v in rows.items()} for i in range(chunks)]


class Arm:
    """One chunking of the step: a shallow copy of the job whose config / chunk sizes are this arm's (the module,
    tokenizer and loss are the job's own, shared by every arm)."""

    def __init__(self, name: str, job: Any, config: Any) -> None:
        from perceive_ray.training_config import compute_accumulation

        self.name, self.config = name, config
        self.chunk = config.train.batch.micro
        self.chunks = compute_accumulation(config)[1]
        self.collator = copy.copy(job)
        self.collator.config = config
        self.collator.micro = config.train.batch.micro
        self.collator.micro_target = config.train.batch.micro_target or config.train.batch.micro

    def collate(self, rows: dict[str, Any]) -> list[dict[str, Any]]:
        import torch

        return self.collator.collate_chunks(split_rows(rows, self.chunks), torch.device("cpu"))


def build(model_dir: Path, args: argparse.Namespace, batch: int, chunk_sizes: list[int]):
    """(job, arms): the job of the plain (one-chunk) config and one arm per chunking, plain first."""
    import torch

    from perceive_ray.train.jobs.vlm2vec import Vlm2VecJob

    configs = {"plain": load_experiment(model_dir, batch, batch, args.seed, grad_checkpointing=args.grad_ckpt)}
    for k in chunk_sizes:
        configs[f"gc_cs{k}"] = load_experiment(model_dir, batch, k, args.seed, grad_checkpointing=args.grad_ckpt)
    job = Vlm2VecJob(configs["plain"], device=torch.device("cpu"))
    return job, [Arm(name, job, config) for name, config in configs.items()]


def make_optimizer(job: Any):
    import torch

    optim = job.config.train.optim
    return torch.optim.AdamW(job.parameter_groups(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


class Engine:
    """The engine interface ``run_step`` drives (DeepSpeed's, on one process): the module's forward, a plain
    backward, the optimiser stepping at the last chunk of the step (``gas`` chunks) then zeroing the gradients.
    ``optimizer=None``: no step, gradients accumulate (the gradient check). Phases are timed for the breakdown."""

    def __init__(self, module: Any, optimizer: Any) -> None:
        self.module, self.optimizer = module, optimizer
        self.gas, self.calls, self.optimizer_steps = 1, 0, 0
        self.phases = dict.fromkeys(("fwd_nograd", "fwd_grad", "backward", "optimizer"), 0.0)

    def begin(self, chunks: int) -> None:
        self.gas, self.calls = chunks, 0
        self.phases = dict.fromkeys(self.phases, 0.0)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        start = time.perf_counter()
        out = self.module(batch)
        self.phases["fwd_grad" if torch.is_grad_enabled() else "fwd_nograd"] += time.perf_counter() - start
        return out

    def backward(self, loss: Any, scale_wrt_gas: bool = True) -> None:
        start = time.perf_counter()
        loss.backward()
        self.phases["backward"] += time.perf_counter() - start

    def step(self) -> None:
        self.calls += 1
        if self.optimizer is not None and self.calls == self.gas:
            start = time.perf_counter()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
            self.phases["optimizer"] += time.perf_counter() - start


def one_step(job: Any, engine: Engine, arm: Arm, rows: dict[str, Any], step: int, seed: int) -> dict[str, Any]:
    """collate + run_step of one arm, as the worker does them; wall and CPU seconds and the phases."""
    from perceive_ray.train.gradcache import chunk_seed, run_step

    t0, c0 = time.perf_counter(), time.process_time()
    batches = arm.collate(rows)
    t1, c1 = time.perf_counter(), time.process_time()
    seeds = [chunk_seed(seed, step, 0, c) for c in range(len(batches))]
    engine.begin(len(batches))
    loss, _ = run_step(engine, job.compute_loss, batches, seeds)
    t2, c2 = time.perf_counter(), time.process_time()
    if engine.calls != len(batches):
        raise RuntimeError(f"{arm.name}: {engine.calls} engine steps for {len(batches)} chunks")
    return {"step_s": t2 - t1, "collate_s": t1 - t0, "step_cpu_s": c2 - c1, "collate_cpu_s": c1 - c0,
            "loss": float(loss), "chunks": len(batches), "phases": dict(engine.phases)}


# ---------------------------------------------------------------------------------------------------------------
# The gradient check


def trainable_grads(module: Any) -> dict[str, Any]:
    out = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            if param.grad is None:
                raise RuntimeError(f"{name}: no gradient")
            out[name] = param.grad.detach().clone()
    return out


def check_gradients(job: Any, arms: list[Arm], rows: dict[str, Any], *, seed: int, rtol: float) -> dict[str, Any]:
    """Adapter dropout 0, no optimiser step: every GradCache arm's loss and gradients vs the one-chunk step's."""
    import torch

    from perceive_ray.train.gradcache import chunk_seed, run_step

    dropouts = [m for m in job.module.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    saved = [m.p for m in dropouts]
    engine = Engine(job.module, None)
    results: dict[str, Any] = {"dropout_modules_zeroed": len(dropouts)}
    try:
        for m in dropouts:
            m.p = 0.0
        got = {}
        for arm in arms:
            batches = arm.collate(rows)
            job.module.zero_grad(set_to_none=True)
            engine.begin(len(batches))
            loss, _ = run_step(engine, job.compute_loss, batches, [chunk_seed(seed, 0, 0, c)
                                                                  for c in range(len(batches))])
            got[arm.name] = (float(loss), trainable_grads(job.module))
        job.module.zero_grad(set_to_none=True)
    finally:
        for m, p in zip(dropouts, saved, strict=True):
            m.p = p
    want_loss, want = got["plain"]
    scale = max(float(g.abs().max()) for g in want.values())
    kinds = ("lora_A", "lora_B", "lora_magnitude_vector")
    results["plain"] = {"loss": want_loss, "max_abs_grad": scale,
                        "max_abs_grad_by_kind": {k: max((float(g.abs().max()) for n, g in want.items() if k in n),
                                                        default=0.0) for k in kinds},
                        "tensors": len(want)}
    ok = True
    for name, (loss, grads) in got.items():
        if name == "plain":
            continue
        diff = max(float((grads[n] - want[n]).abs().max()) for n in want)
        passed = diff <= rtol * scale and abs(loss - want_loss) <= 1e-4 * max(1.0, abs(want_loss))
        ok &= passed
        results[name] = {"loss": loss, "max_abs_grad_diff": diff, "relative": diff / scale, "ok": passed}
    results["ok"] = ok
    results["rtol"] = rtol
    return results


# ---------------------------------------------------------------------------------------------------------------
# Timing (one process) and memory (a child per arm)


def time_model(kind: str, model_dir: Path, args: argparse.Namespace, repeats: int, warmup: int,
               chunk_sizes: list[int]) -> dict[str, Any]:
    import torch

    job, arms = build(model_dir, args, args.batch, chunk_sizes)
    image_size = job.parts.model.config.vision_config.image_size
    rows = make_rows(args.batch, image_size, args.seed)
    engine = Engine(job.module, make_optimizer(job))
    step = 0
    probe = arms[0].collate(rows)[0]
    shape = {"query_tokens": list(probe["query"]["input_ids"].shape), "target_tokens":
             list(probe["target"]["input_ids"].shape), "visual_tokens": job.parts.num_visual_tokens}
    print(f"[{kind}] {job.describe()['parameters']:,} parameters, {job.describe()['trainable_parameters']:,} "
          f"trainable; batch {args.batch}: query ids {shape['query_tokens']}, target ids {shape['target_tokens']}, "
          f"V = {shape['visual_tokens']}; warm-up {warmup} round(s)", file=sys.stderr, flush=True)
    for _ in range(warmup):
        for arm in arms:
            one_step(job, engine, arm, rows, step, args.seed)
            step += 1
    started = time.perf_counter()
    check = check_gradients(job, arms, rows, seed=args.seed, rtol=args.grad_rtol)
    check["seconds"] = time.perf_counter() - started
    print(f"[{kind}] gradient check ({check['seconds']:.1f} s): "
          + ", ".join(f"{a.name} max|diff| {check[a.name]['max_abs_grad_diff']:.2e} "
                      f"({check[a.name]['relative']:.1e} of max|g| {check['plain']['max_abs_grad']:.2e})"
                      for a in arms[1:]), file=sys.stderr, flush=True)
    if not check["ok"]:
        raise SystemExit(f"[{kind}] GradCache gradients differ from the one-chunk step's: {json.dumps(check)}")
    waited = 0.0
    if args.wait_quiet > 0:
        waited, busy = wait_for_quiet(args.quiet_cores, args.wait_quiet)
        if waited > 5:
            print(f"[{kind}] waited {waited:.0f} s for the host ({busy:.2f} cores busy now)", file=sys.stderr,
                  flush=True)
    results: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms}
    load_before = host_load()
    began = time.perf_counter()
    with ForeignLoad() as foreign:
        for r in range(repeats):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            for arm in order:
                results[arm.name].append(one_step(job, engine, arm, rows, step, args.seed))
                step += 1
            if (r + 1) % max(1, repeats // 3) == 0 or r + 1 == repeats:
                print(f"[{kind}] round {r + 1}/{repeats}: " + ", ".join(
                    f"{a.name} {results[a.name][-1]['step_s']:.3f} s" for a in arms), file=sys.stderr, flush=True)
    return {"model": kind, "model_dir": str(model_dir), "shape": shape, "describe": job.describe(),
            "threads": torch.get_num_threads(), "gradient_check": check, "runs": results,
            "optimizer_steps": engine.optimizer_steps, "timed_s": time.perf_counter() - began,
            "foreign_cores": foreign.cores(), "load_before": load_before, "load_after": host_load(),
            "waited_s": waited}


def proc_status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_memory(args: argparse.Namespace) -> int:
    """One arm in this fresh process: build, collate, reset the RSS high-water mark (``clear_refs`` 5), then
    ``--memory-steps`` steps; the peak RSS of the steps and the resident set just before them."""
    import torch

    torch.set_num_threads(args.threads)
    job, arms = build(Path(args.model_dir), args, args.batch, args.chunk_sizes)
    arm = next(a for a in arms if a.name == args.child_arm)
    rows = make_rows(args.batch, job.parts.model.config.vision_config.image_size, args.seed)
    engine = Engine(job.module, make_optimizer(job))
    arm.collate(rows)  # the tokenizer's first call allocates too
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # imports and model load
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")
    before = proc_status_bytes("VmRSS")
    for step in range(args.memory_steps):
        one_step(job, engine, arm, rows, step, args.seed)
    peak = proc_status_bytes("VmHWM")
    Path(args.result).write_text(json.dumps({"arm": arm.name, "rss_before_steps": before, "peak_steps": peak,
                                             "peak_over_rss_before": peak - before,
                                             "process_peak_before_steps": process_peak}))
    return 0


def measure_memory(kind: str, model_dir: Path, args: argparse.Namespace, work: Path,
                   chunk_sizes: list[int]) -> dict[str, Any]:
    out = {}
    names = ["plain"] + [f"gc_cs{k}" for k in chunk_sizes]
    for name in names:
        result = work / f"memory_{kind}_{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-arm", name, "--model-dir", str(model_dir),
               "--result", str(result), "--batch", str(args.batch), "--chunk-sizes",
               ",".join(map(str, chunk_sizes)), "--threads", str(args.threads), "--seed", str(args.seed),
               "--memory-steps", str(args.memory_steps)]
        if not args.grad_ckpt:
            cmd.append("--no-grad-checkpointing")
        print(f"[{kind}] memory: {name} in a fresh process", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"memory child {kind}/{name} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        out[name] = json.loads(result.read_text())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Summary


def spread(values: list[float], digits: int = 3) -> str:
    med = f"{statistics.median(values):.{digits}f}"
    return med if len(values) == 1 else f"{med} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summarise(timing: dict[str, Any], memory: dict[str, Any] | None) -> dict[str, Any]:
    runs = timing["runs"]
    plain = statistics.median(r["step_s"] for r in runs["plain"])
    check = timing["gradient_check"]
    shape = timing["shape"]
    d = timing["describe"]
    print(f"\n{timing['model']} LLaVA: {d['parameters']:,} parameters ({d['trainable_parameters']:,} trainable DoRA), "
          f"V = {shape['visual_tokens']}, query ids {shape['query_tokens'][1]} wide, target ids "
          f"{shape['target_tokens'][1]} wide (one chunk); {timing['threads']} torch thread(s); "
          f"{len(runs['plain'])} interleaved rounds in {timing['timed_s']:.0f} s; cores used by other processes "
          f"{timing['foreign_cores']:.2f}, 1-min load {timing['load_before']:.2f} -> {timing['load_after']:.2f}")
    print(f"{'arm':<9} {'chunks':>6} {'step s (median, min-max)':>26} {'vs plain':>8} {'collate s':>9} "
          f"{'cpu/wall':>8} | phases s: fwd no-grad / fwd grad / backward / AdamW / rest")
    ratios = {}
    for name, rs in runs.items():
        step = statistics.median(r["step_s"] for r in rs)
        ratios[name] = step / plain
        phases = {k: statistics.median(r["phases"][k] for r in rs) for k in rs[0]["phases"]}
        rest = statistics.median(r["step_s"] - sum(r["phases"].values()) for r in rs)
        cpu = sum(r["step_cpu_s"] for r in rs) / sum(r["step_s"] for r in rs)
        print(f"{name:<9} {rs[0]['chunks']:>6} {spread([r['step_s'] for r in rs]):>26} {ratios[name]:>8.2f} "
              f"{statistics.median(r['collate_s'] for r in rs):>9.4f} {cpu:>8.2f} | "
              f"{phases['fwd_nograd']:.3f} / {phases['fwd_grad']:.3f} / {phases['backward']:.3f} / "
              f"{phases['optimizer']:.4f} / {rest:.3f}")
    per_round = {name: [g["step_s"] / p["step_s"] for g, p in zip(rs, runs["plain"], strict=True)]
                 for name, rs in runs.items() if name != "plain"}
    for name, values in per_round.items():
        print(f"{name}: per-round ratio to the plain step of the same round {spread(values, 2)}")
    chunked = sorted(((rs[0]["chunks"], statistics.median(r["step_s"] for r in rs)) for name, rs in runs.items()
                      if name != "plain"))
    per_chunk = None
    if len(chunked) >= 2 and chunked[-1][0] != chunked[0][0]:
        (c_lo, t_lo), (c_hi, t_hi) = chunked[0], chunked[-1]
        per_chunk = (t_hi - t_lo) / (c_hi - c_lo)
        print(f"cost per extra chunk (same rows, {c_lo} -> {c_hi} chunks): {1000 * per_chunk:.1f} ms; the plain "
              f"step costs {1000 * plain / shape['query_tokens'][0]:.1f} ms per row")
    print("gradient check (adapter dropout 0, same weights): " + ", ".join(
        f"{name} loss {check[name]['loss']:.6f} vs {check['plain']['loss']:.6f}, max|grad diff| "
        f"{check[name]['max_abs_grad_diff']:.1e} = {check[name]['relative']:.1e} x max|grad|"
        for name in runs if name != "plain") + " (max|grad| by kind: " + ", ".join(
        f"{k} {v:.1e}" for k, v in check["plain"]["max_abs_grad_by_kind"].items()) + ")")
    if memory:
        base = memory["plain"]
        print("memory, fresh process per arm: " + "; ".join(
            f"{name} peak RSS during the steps {m['peak_steps'] / 2**20:.0f} MiB, over the pre-step RSS "
            f"{m['peak_over_rss_before'] / 2**20:.1f} MiB"
            + (f" ({m['peak_over_rss_before'] / max(1, base['peak_over_rss_before']):.2f}x plain)"
               if name != "plain" else "")
            for name, m in memory.items()))
    return {"plain_s": plain, "ratios": ratios, "per_round_ratios": per_round, "per_chunk_s": per_chunk}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="check that it runs: batch 8, 3 rounds, 1 warm-up round, tiny model only, no memory")
    parser.add_argument("--batch", type=int, default=None, help="global batch N (pairs; default 16, quick 8)")
    parser.add_argument("--chunk-sizes", default="1,4", help="GradCache chunk sizes (rows per chunk; default 1,4: "
                        "1 is the recipe's and gives the headline)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; quick 3)")
    parser.add_argument("--sized-repeats", type=int, default=3, help="timed rounds of the sized model (default 3)")
    parser.add_argument("--sized-warmup", type=int, default=1, help="untimed rounds of the sized model (default 1)")
    parser.add_argument("--sized-chunk-sizes", default="1",
                        help="GradCache chunk sizes of the sized model (default 1: the recipe's only)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: what the Ray worker gets at cpus_per_worker <= 1)")
    parser.add_argument("--no-grad-checkpointing", dest="grad_ckpt", action="store_false",
                        help="train.vlm2vec.grad_checkpointing false (the recipe has it on)")
    parser.add_argument("--sized", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a LLaVA whose compute dominates (default on; quick off)")
    for key, value in SIZED.items():
        parser.add_argument(f"--sized-{key.replace('_', '-')}", type=int, default=value,
                            help=f"sized model (default {value})")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="peak RSS of each arm in a fresh process (default on; quick off)")
    parser.add_argument("--memory-steps", type=int, default=1, help="steps per memory child (default 1)")
    parser.add_argument("--grad-rtol", type=float, default=1e-4,
                        help="gradient check: max |diff| allowed, relative to the largest gradient (float32)")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each model's timed rounds, wait up to this many seconds for a quiet host")
    parser.add_argument("--quiet-cores", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child-arm", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch = args.batch or (8 if quick else 16)
    args.repeats = args.repeats or (3 if quick else 9)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.sized = (not quick) if args.sized is None else args.sized
    args.memory = (not quick) if args.memory is None else args.memory
    args.chunk_sizes = [int(k) for k in str(args.chunk_sizes).split(",") if k.strip()]
    args.sized_chunk_sizes = [int(k) for k in str(args.sized_chunk_sizes).split(",") if k.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.child_arm:
        return child_memory(args)
    if 1 not in args.chunk_sizes or (args.sized and 1 not in args.sized_chunk_sizes):
        parser.error("--chunk-sizes and --sized-chunk-sizes must include 1 (the recipe's chunking, the headline)")
    if bad := [k for k in args.chunk_sizes + args.sized_chunk_sizes if k < 1 or args.batch % k or k == args.batch]:
        parser.error(f"chunk sizes {bad} must divide --batch {args.batch} into 2 or more chunks")
    if min(args.repeats, args.warmup, args.sized_repeats, args.sized_warmup) < 1:
        parser.error("--repeats and --warmup must be >= 1 (the gradient check needs a warm-up step)")

    import torch

    torch.set_num_threads(args.threads)
    stamp = datetime.now(timezone.utc)
    began = time.perf_counter()
    models = ["tiny"] + (["sized"] if args.sized else [])
    timings, memories = {}, {}
    with tempfile.TemporaryDirectory(prefix="gradcache_overhead_") as tmp:
        work = (args.out or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        for kind in models:
            model_dir = save_model(work / f"llava_{kind}", kind, args)
            plan = ((args.repeats, args.warmup, args.chunk_sizes) if kind == "tiny" else
                    (args.sized_repeats, args.sized_warmup, args.sized_chunk_sizes))
            timings[kind] = time_model(kind, model_dir, args, *plan)
            if args.memory:
                memories[kind] = measure_memory(kind, model_dir, args, work, plan[2])
    elapsed = time.perf_counter() - began

    print(f"GradCache overhead, VLM2Vec job ({EXPERIMENT.relative_to(REPO)}, smoke, 1 worker holds the global "
          f"batch): global batch {args.batch} pairs (558K format: image query, caption target); gradient "
          f"checkpointing {'on' if args.grad_ckpt else 'off'}; AdamW stepping once per step in every arm; "
          f"{stamp:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s; host {os.cpu_count()} cores")
    summaries = {kind: summarise(timings[kind], memories.get(kind)) for kind in models}
    tiny = summaries["tiny"]["ratios"]
    headline = tiny["gc_cs1"]
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "date":
                                         stamp.isoformat(), "elapsed_s": elapsed, "timings": timings,
                                         "memory": memories, "summaries": summaries,
                                         "gradcache_vs_plain": headline}, indent=2, default=str))
    print()
    for k in args.chunk_sizes:
        if k != 1:
            print(f"gradcache_vs_plain_cs{k}={tiny[f'gc_cs{k}']:.3f}")
    if "sized" in summaries:
        print(f"gradcache_vs_plain_sized={summaries['sized']['ratios']['gc_cs1']:.3f}")
    print(f"gradcache_vs_plain={headline:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
