"""Training on Ray Train + DeepSpeed: per-rank Ray Data pipelines, the one ``train_fn_per_worker``, the trainer.

Data. Every rank reads its own Ray Data dataset (``datasets={"rank0": ..., "rank1": ...}``, not split), whose rows
are this rank's slots of every remaining step in order: row -> (step, slot) -> the sample the counter-based epoch
order puts there (``data/llava_data.py::rank_rows``, independent of worker count and timing). Images are decoded in
CPU tasks (``map_batches``, fractional CPUs) with the seeded train transform, so 1.2M images stream through the
object store and never sit in a worker's memory. ``data.decode_tasks: 0`` (small images on a few cores) runs no
task and has no dataset: each worker makes the row ids of its remaining steps and decodes its own batches with the
same function (and Ray Train starts no DatasetManager actor for the run). The datasets are callables: Ray Train
calls them each time the worker group starts, and they begin at the step of the newest registered checkpoint, so a
restarted group neither re-decodes finished steps nor sees a different order (the worker still checks every row's
step).

Worker. Seeds identically, builds the job, ``deepspeed.initialize`` (DeepSpeed reuses Ray's process group), resumes
from ``ray.train.get_checkpoint()`` (step, config hash and data position in ``client_state``), then per step: the
learning rate from open_clip's schedule, GradCache chunks (``train/gradcache.py``), the job's post-step hook
(``logit_scale`` clamp), progress, MLflow on rank 0, and every ``train.checkpoint.every_steps`` a checkpoint that
EVERY rank saves (frozen parameters excluded) and reports; the last one carries rank 0's export.

Local mode (``resources.local``): Ray Train's own ``ScalingConfig(num_workers=0)`` runs the same function in the
calling process, as one rank, with a process group of one that the process keeps (``local_process_group``; Ray's
plain local controller, which leaves it alone: ``trainer_class``). Ray's local mode keeps reported checkpoints
only in memory, so each is also copied to where a worker group's would be and registered
(``training.register_local_checkpoint``); a rerun resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray

from perceive_ray import registry
from perceive_ray.config import ConfigError
from perceive_ray.training import (
    DEEPSPEED_FILE,
    EXPORT_DIR,
    SAMPLES_FILE,
    STORAGE_NAME,
    PreparedRun,
    TrainPlan,
    absolute_paths,
    config_hash,
    copy_export,
    latest_checkpoint_step,
    local_checkpoint_dir,
    local_checkpoint_steps,
    prepare_training,
    register_local_checkpoint,
    write_result,
)
from perceive_ray.training_config import TrainExperimentConfig

# "train_worker:<K>": the last rank dies once, just before step K (1-based) runs; "train_hold:<K>[:<marker>[:<end>]]":
# it stalls there once (a sweep driver killed mid-trial, in tests), after the checkpoints of the steps before K are
# registered; with a marker path, only the first run to get there stalls (the marker names its run directory), and
# with <end>, only a run whose directory name ends with it (one trial of a sweep).
FAULT_ENV = "PERCEIVE_RAY_FAULT"
HOLD_S = 600
CLIENT_STATE = "perceive_ray"
READ_CPUS = 1.0  # what a Ray Data read task requests
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"  # Ray Train's own switch (default on)
LOG_FILE = "train_log.jsonl"  # rank 0's logged metrics, one JSON line per logged step (run directory)


# -- data --------------------------------------------------------------------------------------------------------

def decode_rows(batch: dict[str, np.ndarray], *, run_dir: str, plan: dict[str, int], rank: int, start: int,
                seed: int, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Row ids of rank ``rank`` -> (step, slot, sample key, caption, negative, pixels, ok): one CPU task, or the
    training worker itself (``data.decode_tasks: 0``: absolute ids, ``start`` 0).

    Conversation jobs (``spec["kind"] == "conversations"``) get (step, slot, epoch, key, has_image, humans, gpts,
    pixels, ok) instead: the worker builds its own token ids from every turn."""
    from perceive_ray.data import llava_data
    from perceive_ray.training import LENGTHS_FILE, step_rows

    local = plan["local_rows"]
    ids = np.asarray(batch["id"], dtype=np.int64)
    steps = start + ids // local
    slots = ids % local
    table = llava_data.open_sample_table(Path(run_dir) / SAMPLES_FILE)
    indices = np.empty(len(ids), dtype=np.int64)
    epochs = steps // plan["steps_per_epoch"]
    lengths = str(Path(run_dir) / LENGTHS_FILE)
    for step in np.unique(steps):
        epoch = int(step // plan["steps_per_epoch"])
        rows = step_rows(plan, order=spec.get("order", "random"), lengths_path=lengths, seed=seed, epoch=epoch,
                         step=int(step % plan["steps_per_epoch"]), rank=rank)
        mask = steps == step
        indices[mask] = rows[slots[mask]]
    samples = llava_data.take_samples(table, indices)
    if spec.get("kind") == "conversations":
        return decode_conversation_rows(samples, steps=steps, slots=slots, epochs=epochs, spec=spec["images"])
    captions, negatives = [], []
    chunker = llava_data.load_spacy_chunker(spec["noun_chunker"]) if spec["pacl_augment"] else None
    for sample, epoch in zip(samples, epochs, strict=True):
        caption = llava_data.draw_caption(sample["gpt_turns"], seed=seed, epoch=int(epoch), key=sample["key"],
                                          mode=spec["caption_turn"])
        if chunker is not None:
            caption = llava_data.augment_pacl_caption(caption, seed=seed, epoch=int(epoch), key=sample["key"],
                                                      chunker=chunker)
        captions.append(caption)
        negative = llava_data.make_hard_negative(caption) if spec["hard_negatives"] == "leftright" else None
        negatives.append(negative or "")
    transform = spec["transform"]
    size = tuple(transform["size"])
    pixels = np.zeros((len(samples), 3, *size), dtype=np.float32)
    ok = np.zeros(len(samples), dtype=bool)
    for epoch in np.unique(epochs):  # a batch may straddle two epochs; each image is keyed by its own
        mask = epochs == epoch
        chosen = [s for s, m in zip(samples, mask, strict=True) if m]
        pixels[mask], ok[mask] = llava_data.decode_train_images(
            [s["image"] for s in chosen], keys=[s["key"] for s in chosen], seed=seed, epoch=int(epoch),
            transform=transform["kind"], image_size=size, mean=transform["mean"], std=transform["std"])
    return {"step": steps, "slot": slots, "key": np.array([s["key"] for s in samples], dtype=object),
            "caption": np.array(captions, dtype=object), "negative": np.array(negatives, dtype=object),
            "pixels": pixels, "ok": ok}


def decode_conversation_rows(samples: list[dict[str, Any]], *, steps: np.ndarray, slots: np.ndarray,
                             epochs: np.ndarray, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """LLaVA / VLM2Vec rows: every turn (JSON), and the image through the checkpoint's processor; a text-only row
    gets zeros (LLaVA runs a zero image through the tower for it). An unreadable image makes the row not ``ok``."""
    from PIL import Image

    from perceive_ray.train.jobs.llava_common import preprocess_image

    # what PIL raises for a missing, truncated, undecodable or oversized file (a ValueError stays an error: a
    # processor that does not give spec["size"] is a configuration problem, not a bad row)
    unreadable = (OSError, SyntaxError, EOFError, Image.DecompressionBombError)
    size = tuple(spec["size"])
    pixels = np.zeros((len(samples), 3, *size), dtype=np.float32)
    ok = np.ones(len(samples), dtype=bool)
    for i, sample in enumerate(samples):
        if sample["image"] is None:
            continue
        try:
            pixels[i] = preprocess_image(sample["image"], spec)
        except unreadable as exc:
            print(f"[train] image of {sample['key']} unreadable: {exc}", file=sys.stderr, flush=True)
            ok[i] = False
    return {"step": steps, "slot": slots, "epoch": epochs,
            "key": np.array([s["key"] for s in samples], dtype=object),
            "has_image": np.array([s["image"] is not None for s in samples], dtype=bool),
            "humans": np.array([json.dumps(list(s["human_turns"])) for s in samples], dtype=object),
            "gpts": np.array([json.dumps(list(s["gpt_turns"])) for s in samples], dtype=object),
            "pixels": pixels, "ok": ok}


def decode_spec(prepared: PreparedRun) -> dict[str, Any]:
    """What ``decode_rows`` needs besides the row ids (JSON-able: it travels to decode tasks or to the workers)."""
    spec = prepared.data_spec
    out = {"transform": asdict(spec.transform) if spec.transform else None,
           "hard_negatives": spec.hard_negatives, "pacl_augment": spec.pacl_augment,
           "caption_turn": spec.caption_turn, "noun_chunker": prepared.config.data.noun_chunker,
           "kind": spec.kind, "order": spec.order, "images": asdict(spec.images) if spec.images else None}
    for part in ("transform", "images"):
        if out[part] is not None:
            out[part]["size"] = list(out[part]["size"])
    return out


def worker_row_ids(step: int, plan: TrainPlan) -> Any:
    """``data.decode_tasks: 0``: the absolute row ids of every step from ``step`` (the one resumed from) on, one
    step's ``local_rows`` per batch, made in the worker: the rows a ``RankDataset`` of ids would stream, with no Ray
    Data dataset (and no DatasetManager actor) at all."""
    local = plan.local_rows
    for s in range(step, plan.total_steps):
        yield {"id": np.arange(s * local, (s + 1) * local, dtype=np.int64)}


class RankDataset:
    """Ray Train calls this at every worker-group start: rank ``rank``'s rows from the last checkpointed step,
    decoded by ``data.decode_tasks`` CPU tasks (with ``0`` there is no dataset: ``worker_row_ids``)."""

    def __init__(self, prepared: PreparedRun, rank: int) -> None:
        self.run_dir = str(prepared.run_dir.resolve())
        self.plan = prepared.plan.__dict__.copy()
        self.rank = rank
        self.seed = prepared.config.seed
        self.decode_cpus = prepared.config.data.decode_cpus
        self.decode_tasks = prepared.config.data.decode_tasks
        self.spec = decode_spec(prepared)

    def __call__(self) -> ray.data.Dataset:
        # Runs in Ray Train's controller. Order comes from build_trainer's DataConfig (Ray Train replaces the
        # dataset's own execution options); progress bars are off because rank 0 prints step / loss / ETA instead.
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = latest_checkpoint_step(Path(self.run_dir))
        local = self.plan["local_rows"]
        rows = max(0, (self.plan["total_steps"] - start) * local)
        fn = partial(decode_rows, run_dir=self.run_dir, plan=self.plan, rank=self.rank, start=start,
                     seed=self.seed, spec=self.spec)
        return ray.data.range(rows).map_batches(
            fn, batch_size=local, num_cpus=self.decode_cpus, batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=self.decode_tasks) if self.decode_tasks else None)


# -- worker ------------------------------------------------------------------------------------------------------

def fault_step(kind: str = "train_worker") -> int | None:
    value = os.environ.get(FAULT_ENV, "")
    return int(value.split(":")[1]) if value.startswith(f"{kind}:") else None


def maybe_die(run_dir: Path, step: int, rank: int, world: int, saved: int = 0) -> None:
    """Fault injection: the last rank exits abruptly (or stalls) once, just before the configured step runs.
    ``saved``: the step of this run's newest checkpoint; a stall waits until Ray Train has registered it (its
    controller does so when it next polls the workers), so a driver killed during the stall resumes from it."""
    if rank != world - 1:
        return
    for kind in ("train_worker", "train_hold"):
        if fault_step(kind) != step:
            continue
        parts = os.environ[FAULT_ENV].split(":")
        if kind == "train_hold" and len(parts) > 3 and not run_dir.name.endswith(parts[3]):
            continue
        marker = Path(parts[2]) if kind == "train_hold" and len(parts) > 2 else run_dir / f".fault-{kind}-{step}"
        if kind == "train_hold":
            deadline = time.monotonic() + 120
            while latest_checkpoint_step(run_dir) < saved and time.monotonic() < deadline:
                time.sleep(0.1)
        try:
            with open(marker, "x", encoding="utf-8") as handle:
                handle.write(str(run_dir))
        except FileExistsError:
            return
        print(f"[train] fault injection: rank {rank} {'exits' if kind == 'train_worker' else 'stalls'} at step "
              f"{step}", file=sys.stderr, flush=True)
        if kind == "train_worker":
            os._exit(1)
        time.sleep(HOLD_S)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def split_rows(rows: dict[str, np.ndarray], chunks: int) -> list[dict[str, np.ndarray]]:
    n = len(rows["step"])
    bounds = np.linspace(0, n, chunks + 1).round().astype(int)
    return [{k: v[bounds[i]: bounds[i + 1]] for k, v in rows.items()} for i in range(chunks)]


def resolve_warmup(config: TrainExperimentConfig, total_steps: int) -> int:
    """Warmup steps: ``ceil(warmup_ratio x total)`` when a ratio is set (LLaVA's 0.03), else ``warmup_steps``."""
    ratio = config.train.schedule.warmup_ratio
    return math.ceil(ratio * total_steps) if ratio is not None else config.train.schedule.warmup_steps


def build_schedule(optimizer: Any, config: TrainExperimentConfig, total_steps: int) -> Any:
    """step -> lr of ``train.optim.lr``'s group, setting every parameter group's lr for that step.

    ``cosine`` / ``const``: open_clip_train's schedules (one lr for all groups). ``hf_cosine`` / ``linear``:
    transformers' warmup + cosine / linear decay factors, applied to each group's own base lr (the LLaVA projector
    group keeps its ratio to the LoRA group), as the HF Trainer's LambdaLR does. Base lrs are read before any
    checkpoint is loaded (a checkpoint restores the last scheduled values, not the bases)."""
    import torch

    sched = config.train.schedule
    warmup = resolve_warmup(config, total_steps)
    if sched.kind in ("cosine", "const"):
        from open_clip_train.scheduler import const_lr, cosine_lr

        fn = cosine_lr if sched.kind == "cosine" else const_lr
        return fn(optimizer, config.train.optim.lr, warmup, total_steps)
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    factory = get_cosine_schedule_with_warmup if sched.kind == "hf_cosine" else get_linear_schedule_with_warmup
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = factory(probe, warmup, total_steps).lr_lambdas[0]
    bases = [float(group["lr"]) for group in optimizer.param_groups]

    def assign(step: int) -> float:
        scale = factor(step)
        for group, base in zip(optimizer.param_groups, bases, strict=True):
            group["lr"] = base * scale
        return config.train.optim.lr * scale

    return assign


def check_init_checksums(job: Any, run_dir: Path, rank: int) -> None:
    """Every rank must start from the same weights (LLaVA#1440): all-gather the job's init checksums, compare,
    and record them (``init_checksums.json``) before the first step."""
    import torch.distributed as dist

    if not hasattr(job, "init_checksum"):
        return
    mine = job.init_checksum()
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    differ = [r for r, other in enumerate(every) if other != every[0]]
    if differ:
        raise RuntimeError(f"ranks {differ} start from other weights than rank 0: {every}")
    if rank == 0:
        (run_dir / "init_checksums.json").write_text(json.dumps({"ranks": every}, indent=2) + "\n")


def open_tracker(cfg: dict[str, Any]) -> Any:
    from perceive_ray.tracking.tracker import GuardedTracker, MlflowTracker, NullTracker

    if not cfg.get("mlflow_run_id"):
        return NullTracker()
    try:
        inner = MlflowTracker(cfg["tracking_uri"], cfg["experiment"], timeout_s=cfg["tracking_timeout_s"],
                              max_retries=cfg["tracking_max_retries"])
        tracker = GuardedTracker(inner)
        tracker.start("", {}, {}, resume_run_id=cfg["mlflow_run_id"])
        return tracker
    except Exception as exc:  # noqa: BLE001 (training goes on; the driver reports tracking problems)
        print(f"[train] tracking unavailable on rank 0: {exc}", file=sys.stderr, flush=True)
        return NullTracker()


def train_api(local: bool) -> Any:
    """``get_context``, ``get_checkpoint`` and ``report`` for ``train_fn_per_worker``. In a worker group: Ray Train's
    public functions. In local mode: the ``TrainFnUtils`` object those functions call, called directly, because in a
    Tune trial (a sweep's local-mode stage) the public ones refuse to run: the trial's Tune session is in the same
    process, and Ray guards a Tune function against calling ``ray.train.*`` (ray-project/ray#49454)."""
    if not local:
        return ray.train
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

    utils = get_train_fn_utils()

    def report(metrics: dict[str, Any], checkpoint: Any = None, checkpoint_dir_name: str | None = None) -> None:
        utils.report(metrics=metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)

    return SimpleNamespace(get_context=utils.get_context, get_checkpoint=utils.get_checkpoint, report=report)


def save_checkpoint(engine: Any, job: Any, *, step: int, state: dict[str, Any], rank: int, final: bool,
                    zero_stage: int, metrics: dict[str, float], local: tuple[Path, int | None] | None = None) -> None:
    """Every rank saves its part under one tag and reports it; rank 0 adds ``export/`` to the last one.
    ``local``: (run directory, checkpoints to keep) of a local-mode run, which registers the checkpoint itself."""
    import deepspeed
    from ray.train import Checkpoint

    tmp = Path(tempfile.mkdtemp(prefix=f"perceive-ckpt-{rank}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=f"step_{step:08d}", client_state={CLIENT_STATE: state},
                               exclude_frozen_parameters=True)
        if final:
            params = list(engine.module.parameters())
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else None
            if ctx is not None:
                ctx.__enter__()
            try:
                if rank == 0:
                    info = job.export(engine.module, tmp / EXPORT_DIR)
                    (tmp / EXPORT_DIR / "export.json").write_text(json.dumps(info, indent=2) + "\n")
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)
        folder = register_local_checkpoint(tmp, local[0], step, local[1]) if local is not None else tmp
        train_api(local is not None).report(metrics, checkpoint=Checkpoint.from_directory(str(folder)),
                                            checkpoint_dir_name=f"step_{step:08d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_fn_per_worker(cfg: dict[str, Any]) -> None:
    """The one per-worker training function (see the module docstring)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from perceive_ray.train.deepspeed import clip_fp32_gradients_like_torch, skip_unused_cpu_comm_op
    from perceive_ray.train.gradcache import chunk_seed, run_accumulation_step, run_step

    config = TrainExperimentConfig.model_validate(cfg["config"])
    plan = TrainPlan(**cfg["plan"])
    run_dir = Path(cfg["run_dir"])
    api = train_api(bool(cfg.get("local")))
    ctx = api.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} workers, running on {world}")
    # The worker's CPU share rounded up (a fractional share still gets a thread), at most this node's cores.
    torch.set_num_threads(max(1, min(math.ceil(config.resources.cpus_per_worker), os.cpu_count() or 1)))
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if config.resources.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)  # identical initial weights (random-init heads) on every rank
    job = registry.resolve("jobs", config.job)(config, device=device)
    check_init_checksums(job, run_dir, rank)
    ds_config = json.loads((run_dir / DEEPSPEED_FILE).read_text())
    if device.type == "cpu":
        skip_unused_cpu_comm_op()  # no JIT compile of an inference-only op (perceive_ray.train.deepspeed)
    engine, optimizer, _, _ = deepspeed.initialize(model=job.module, model_parameters=job.parameter_groups(),
                                                   config=ds_config)
    clip_fp32_gradients_like_torch(engine)  # ZeRO 0 + grad_clip: DeepSpeed's own clip fails on 0-dim parameters
    zero_stage = config.train.deepspeed.zero_stage
    gathered = (lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)) if zero_stage == 3 \
        else None
    schedule = build_schedule(optimizer, config, plan.total_steps)
    step, missing = 0, 0
    checkpoint = api.get_checkpoint()
    if checkpoint is None and cfg.get("local") and local_checkpoint_steps(run_dir):
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(str(local_checkpoint_dir(run_dir, local_checkpoint_steps(run_dir)[-1])))
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            tag = (Path(folder) / "latest").read_text().strip()
            _, client = engine.load_checkpoint(folder, tag=tag, load_module_strict=False)
        state = client[CLIENT_STATE]
        if state["config_hash"] != cfg["config_hash"]:
            raise RuntimeError(f"checkpoint {tag} was written by another configuration")
        step, missing = int(state["step"]), int(state["missing_images"])
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            print(f"[train] resumed from checkpoint {tag} at step {step}/{plan.total_steps}", flush=True)
    tracker = open_tracker(cfg) if rank == 0 else None
    gauges = None
    if rank == 0:  # live Prometheus gauges (dashboards/perceive_train.json); imported on rank 0 only
        from perceive_ray.run.ray_metrics import TrainGauges

        gauges = TrainGauges()
    in_worker = cfg.get("decode_in_worker")  # data.decode_tasks: 0 (the worker makes its own row ids)
    batches = worker_row_ids(step, plan) if in_worker is not None else ray.train.get_dataset_shard(
        f"rank{rank}").iter_batches(batch_size=plan.local_rows, batch_format="numpy", prefetch_batches=1)
    started, first_step = time.monotonic(), step
    saved = step  # the newest checkpoint (the one resumed from, if any)
    window_rows, window_start = 0, time.monotonic()
    max_missing = config.data.max_missing_fraction
    for rows in batches:
        if in_worker is not None:
            rows = decode_rows(rows, run_dir=str(run_dir), plan=cfg["plan"], rank=rank, start=0, seed=config.seed,
                               spec=in_worker)
        steps = np.unique(rows["step"])
        if len(steps) != 1 or len(rows["step"]) != plan.local_rows:
            raise RuntimeError(f"rank {rank}: a batch spans steps {steps.tolist()} ({len(rows['step'])} rows)")
        if int(steps[0]) < step:
            continue  # the dataset started before the checkpoint (a checkpoint registered after it was built)
        if int(steps[0]) != step:
            raise RuntimeError(f"rank {rank}: expected step {step}, the data is at step {int(steps[0])}")
        maybe_die(run_dir, step + 1, rank, world, saved)
        ok = np.asarray(rows["ok"], dtype=bool)
        bad = torch.tensor([float((~ok).sum()), float(len(ok))], device=device)
        if dist.is_initialized():
            dist.all_reduce(bad)
        if bad[0] > 0:
            missing += int(bad[0])
            print(f"[train] step {step}: {int(bad[0])} unreadable image(s) skipped (rank {rank} keys "
                  f"{[str(k) for k in rows['key'][~ok]][:3]})", file=sys.stderr, flush=True)
            if bad[0] > max_missing * bad[1]:
                raise RuntimeError(f"step {step}: {int(bad[0])} of {int(bad[1])} images unreadable, more than "
                                   f"data.max_missing_fraction={max_missing}")
            rows = {k: v[ok] for k, v in rows.items()}
        lr = schedule(step)
        if hasattr(job, "collate_chunks"):
            batches = job.collate_chunks(split_rows(rows, plan.chunks), device)
        else:
            batches = [job.collate(chunk, device) for chunk in split_rows(rows, plan.chunks)]
        seeds = [chunk_seed(config.seed, step, rank, c) for c in range(plan.chunks)]
        if getattr(job, "decomposable", False):  # a sum over rows: plain accumulation, no GradCache pass
            loss, logs = run_accumulation_step(engine, job.compute_loss, batches, seeds)
            if dist.is_initialized():  # the chunks' losses are world x local shares of the global loss
                dist.all_reduce(loss)
            loss = loss / world
        else:
            loss, logs = run_step(engine, job.compute_loss, batches, seeds)
        job.after_step(engine.module, gathered)
        step += 1
        window_rows += int(bad[1] - bad[0])
        final = step == plan.total_steps
        metrics = {"train/loss": float(loss), "train/lr": float(lr), "train/step": step,
                   "train/missing_images": missing, **{f"train/{k}": float(v) for k, v in logs.items()}}
        if step % config.train.log_every_steps == 0 or final:
            elapsed = time.monotonic() - window_start
            metrics["train/samples_per_s"] = window_rows / max(elapsed, 1e-9)
            metrics["train/step_time_s"] = elapsed / max(1, config.train.log_every_steps)
            window_rows, window_start = 0, time.monotonic()
            if rank == 0:
                rate = (time.monotonic() - started) / max(1, step - first_step)
                print(f"[train] step {step}/{plan.total_steps} ({100 * step / plan.total_steps:.0f}%) "
                      f"loss {float(loss):.4f} lr {float(lr):.2e} {metrics['train/samples_per_s']:.1f} samples/s "
                      f"eta {format_eta(rate * (plan.total_steps - step))}", flush=True)
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "train/step"}, step=step)
                with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:  # the curve, also without MLflow
                    log.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if gauges is not None:
            gauges.update(metrics, job=config.job, run_id=run_dir.name)
        if step % config.train.checkpoint.every_steps == 0 or final:
            state = {"step": step, "epoch": step // plan.steps_per_epoch, "seed": config.seed,
                     "config_hash": cfg["config_hash"], "missing_images": missing,
                     "data_position": {"step": step, "rows_per_rank": plan.local_rows}}
            save_checkpoint(engine, job, step=step, state=state, rank=rank, final=final, zero_stage=zero_stage,
                            metrics=metrics, local=(run_dir, config.train.checkpoint.num_to_keep)
                            if cfg.get("local") else None)
            saved = step
            if rank == 0:
                tracker.log_tags({"checkpoint.step": str(step), "checkpoint.location": str(run_dir / STORAGE_NAME /
                                                                                        f"step_{step:08d}")})
        if final:
            break
    if step != plan.total_steps:
        raise RuntimeError(f"rank {rank}: the data ended at step {step} of {plan.total_steps}")
    if rank == 0 and tracker is not None:
        tracker.log_metrics({"train/missing_images": missing}, step=step)


# -- driver ------------------------------------------------------------------------------------------------------

def check_cluster_cpus(config: TrainExperimentConfig) -> None:
    """Workers must leave CPU for the decode tasks: a pipeline with no CPU left waits forever, silently."""
    res = config.resources
    total = float(ray.cluster_resources().get("CPU", 0.0))
    # Ray Data's read step (the row ids) asks for one whole CPU per task; decode tasks for data.decode_cpus. With
    # data.decode_tasks 0 the pipeline runs no task (the workers decode).
    data_cpus = 0.0 if config.data.decode_tasks == 0 else max(READ_CPUS, config.data.decode_cpus)
    needed = res.num_workers * res.cpus_per_worker + data_cpus
    if needed > total + 1e-9:
        raise ConfigError(
            f"resources: {res.num_workers} workers x {res.cpus_per_worker} CPUs (resources.cpus_per_worker) + "
            f"{data_cpus:g} CPU left for the data pipeline (its read step takes 1 CPU; decoding "
            f"data.decode_cpus={config.data.decode_cpus}) need {needed:g} CPUs; the Ray cluster has {total:g}. "
            "Lower resources.cpus_per_worker (fractions are fine) or add CPUs")


def trainer_class() -> type:
    """Ray Train's ``TorchTrainer`` less two default callbacks that would only cost CPU here (Ray has no switch for
    either; if Ray moves their classes, the plain TorchTrainer is used):

    - on a local instance started by ``init_ray`` (no dashboard), the PlacementGroupCleaner. That detached actor
      watches the controller through the state API, which needs the dashboard: without it every poll fails, so it
      would never clean anything up, and it logs "Failed to query Ray Train Controller actor state" every second of
      every run (~2.5 CPU-s per run);
    - for a run with no datasets (``data.decode_tasks: 0``), the datasets callback: it starts a DatasetManager actor
      (a process, ~2.5 CPU-s) at every worker-group start even when there is nothing to manage.

    It also gives ``resources.local`` runs Ray's plain local controller (see ``_get_local_controller``); without
    that class a local-mode run is refused (``build_trainer``)."""
    from ray.train.torch import TorchTrainer

    from perceive_ray.run.inference import LOCAL_NO_DASHBOARD_ENV

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.local_mode.utils import LocalController
    except ImportError:
        return TorchTrainer
    local = os.environ.get(LOCAL_NO_DASHBOARD_ENV) == "1"

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [cb for cb in super()._create_default_callbacks()
                    if not (local and isinstance(cb, PlacementGroupCleanerCallback))
                    and not (not self.datasets and isinstance(cb, DatasetsCallback))]

        def _get_local_controller(self) -> Any:
            # resources.local: Ray's plain local controller. TorchTrainer's makes a process group from the torchrun
            # variables and destroys it after each run, which DeepSpeed's per-process group caches do not survive
            # (the second run in a process fails); local_process_group keeps one for the process instead.
            return LocalController(experiment_name=self.run_config.name, datasets=self.datasets)

    return LeanTorchTrainer


def build_trainer(prepared: PreparedRun, tracking: dict[str, Any]) -> Any:
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    config = prepared.config
    res = config.resources
    env = {"DS_ACCELERATOR": "cuda" if res.use_gpu else "cpu", "PYTHONUNBUFFERED": "1",
           # Ray Train's print patch sends a worker's print() to its logger and, when sys.stdout is wrapped (it is
           # in a Train worker), to the stream as well: every progress line reached the console twice. Off unless
           # the user sets it; rank 0's lines are also in train_log.jsonl and MLflow.
           PRINT_PATCH_ENV: os.environ.get(PRINT_PATCH_ENV, "0")}
    for name in (FAULT_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "HF_HUB_OFFLINE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    loop_config = {"config": absolute_paths(config).model_dump(mode="json", by_alias=True), "plan": prepared.plan.__dict__,
                   "run_dir": str(prepared.run_dir.resolve()), "config_hash": config_hash(config),
                   "decode_in_worker": decode_spec(prepared) if config.data.decode_tasks == 0 else None,
                   "local": res.local, **tracking}
    # data.decode_tasks 0: no dataset, the workers make their row ids (worker_row_ids)
    datasets = {f"rank{r}": RankDataset(prepared, r) for r in range(res.num_workers)} \
        if config.data.decode_tasks != 0 else None
    cls = trainer_class()
    if res.local and "_get_local_controller" not in cls.__dict__:
        raise RuntimeError("resources.local: this Ray has no ray.train.v2 LocalController where perceive_ray looks "
                           "for it (Ray 2.60's layout); run with resources.local: false")
    return cls(
        train_fn_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        # resources.local: Ray Train's local mode (no controller, no workers: train_fn_per_worker runs in this process)
        scaling_config=ScalingConfig(num_workers=0) if res.local else ScalingConfig(
            num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker={"CPU": res.cpus_per_worker}),
        run_config=RunConfig(
            name=STORAGE_NAME, storage_path=str(prepared.run_dir.resolve()),
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.checkpoint.num_to_keep),
            worker_runtime_env={"env_vars": env},
        ),
        datasets=datasets,
        # Each rank reads its own dataset whole, in order: one batch = one step. Ray Train applies these options to
        # the datasets' execution (they override what the dataset's own context says).
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))
        if datasets else None,
    )


def local_process_group(use_gpu: bool) -> None:
    """A local-mode run's process group of one (gloo, or NCCL for a GPU run) on 127.0.0.1 and a free port, made at
    this process's first local-mode run and kept for the next ones (a sweep's reused trial actor runs several):
    DeepSpeed caches the groups it derives from it per process, so a group destroyed and made again would leave it
    holding dead ones. DeepSpeed then reuses this group, as it reuses a worker group's. The process also gets what a
    worker group's workers have: the launcher's variables for the group, and ``DS_ACCELERATOR`` (unless set)."""
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    backend = "nccl" if use_gpu else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != 1 or dist.get_backend() != backend:
            raise RuntimeError(f"resources.local: this process already has a torch.distributed group "
                               f"({dist.get_backend()}, {dist.get_world_size()} ranks), not a {backend} group of one")
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # what a launcher sets, and DeepSpeed reads (LOCAL_RANK above all), describing this group of one
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def preload_local(use_gpu: bool) -> None:
    """Import what ``train_fn_per_worker`` imports, in a process that will run it in local mode (a sweep's trial
    preloads while the shared runs train). ``DS_ACCELERATOR`` first: DeepSpeed picks its accelerator on import."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed  # noqa: F401

    from perceive_ray.train import deepspeed as _ds  # noqa: F401
    from perceive_ray.train import gradcache as _gc  # noqa: F401


def fit_releasing_controller(trainer: Any) -> Any:
    """``trainer.fit()``, then the SIGINT handler that was there before it. In the main thread Ray Train installs
    a SIGINT handler that closes over its TrainController's handle and never removes it: the controller actor (and
    its DatasetManager, ~1 GB together) would stay alive for the rest of the driver, e.g. a sweep's whole run after
    its shared pretraining. Putting the previous handler back drops that last reference, so they exit."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # no handler is installed off the main thread (a Tune trial)
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)


def run_train(config: TrainExperimentConfig, *, run_id: str | None = None, address: str | None = None,
              track: bool = True, attach_run: str | None = None) -> dict[str, Any]:
    """Prepare (all checks first), train on Ray Train + DeepSpeed, export, record. Returns ``result.json``.
    ``attach_run``: log into that MLflow run (a sweep trial's child) instead of one per run id."""
    from perceive_ray.run.inference import init_ray, shutdown_ray
    from perceive_ray.run_directory import RunLock
    from perceive_ray.tracking.training import TrainingTracking

    prepared = prepare_training(config, run_id=run_id)
    if prepared.finished:
        result = json.loads((prepared.run_dir / "result.json").read_text())
        print(f"[train] run {prepared.run_id} already finished: export in {result['export']}", flush=True)
        return result
    plan, config = prepared.plan, prepared.config  # (model.source train:<id> resolved)
    with RunLock(prepared.run_dir):
        tracking = TrainingTracking(config, prepared, enabled=track, attach_run=attach_run)
        where = "in this process (Ray Train's local mode)" if config.resources.local else \
            f"on {plan.world_size} worker(s)"
        print(f"[train] run {prepared.run_id}: {config.job}, {plan.num_samples} samples, {plan.total_steps} steps "
              f"x {plan.global_batch} rows {where} ({plan.chunks} chunk(s) each); "
              f"{'resuming' if prepared.resumed else 'starting'} in {prepared.run_dir}", flush=True)
        started_ray = init_ray(address, log_to_driver=True)
        status = "FAILED"
        try:
            if not config.resources.local:  # (a local-mode run asks Ray for nothing)
                check_cluster_cpus(config)
            trainer = build_trainer(prepared, tracking.worker_config())
            started = time.monotonic()
            if config.resources.local:
                local_process_group(config.resources.use_gpu)
            result = fit_releasing_controller(trainer)
            if result.checkpoint is None:
                raise RuntimeError("training ended without a checkpoint")
            with result.checkpoint.as_directory() as folder:
                export = copy_export(Path(folder), prepared.run_dir)
            summary = {"run_id": prepared.run_id, "export": str(export), "steps": plan.total_steps,
                       "final_metrics": {k: v for k, v in (result.metrics or {}).items()
                                         if isinstance(v, (int, float))},
                       "checkpoint": str(result.checkpoint.path), "wall_s": round(time.monotonic() - started, 1),
                       "export_info": json.loads((export / "export.json").read_text())}
            write_result(prepared.run_dir, summary)
            status = "FINISHED"
            tracking.finish(summary, status)
            print(f"[train] finished: export in {export} (evaluate with model.source / head_weights "
                  f"train:{prepared.run_id})", flush=True)
            return summary
        except ConfigError:
            raise
        finally:
            if status != "FINISHED":
                tracking.finish(None, status)
            if started_ray:
                shutdown_ray()
