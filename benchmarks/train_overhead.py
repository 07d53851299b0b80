"""Training overhead: steps/s of Ray Train + DeepSpeed (``run_train``) vs the plain single-process torch loop a user
would otherwise write, on the same model, data and global batch; 1 worker, CPU, steady state, start-up apart.

What it measures
    One CLIP fine-tuning job (``experiments/train/clip_negclip_lock.yaml`` in smoke mode: NegCLIP with left/right hard
    negatives, vision tower locked, gradient checkpointing as the recipe says) on a random-init open_clip model of a
    chosen size (default ViT 384w x 6L @ 64 px / patch 16, text 128w x 4L with the real 49,408-token vocabulary and
    context 77; written with ``perceive_ray.models.tiny.save_clip``) and the synthetic LLaVA-1.5 data
    (``perceive_ray.data.synthetic``: 80 x 80 JPEGs, 8 image samples per ``--pairs``), ``train.epochs`` repeated as
    needed for ``--steps`` steps of global batch ``--batch`` in ONE chunk (``train.batch.micro`` = global):

    ray    ``run_train(config, run_id=..., track=False)`` -- what ``perceive-ray train`` runs -- in a fresh process
           with no Ray up: its own local Ray (``init_ray``), Ray Train V2, one worker (``resources.cpus_per_worker``
           ``--worker-cpus``, default 1.0), images decoded in Ray Data tasks (``data.decode_cpus`` ``--decode-cpus``,
           default 0.5), DeepSpeed ZeRO ``--zero`` (default 2, the recipe's, then 0; fp32 on CPU, torch AdamW), ``train.log_every_steps: 1``, one
           checkpoint at the final step (``train.checkpoint.every_steps`` larger than the run), ``ray.shutdown``.
           The worker sets ``torch.set_num_threads(int(cpus_per_worker))``: 1 thread at 1.0 (and at 1.5) CPUs.
           Not 1.5 + 0.5 on a 2-core host: ``ray.data.range``'s ReadRange tasks ask for 1 CPU each, so with only
           0.5 left the pipeline never starts (the run hangs; see RESULTS.md). One work-around of a library bug:
           ``preserve_order`` is set on the driver's Ray Data context before ``run_train`` (Ray Train applies the
           driver's context to the datasets, dropping the one ``RankDataset`` sets; ``--no-order-fix`` shows the
           failure, "a batch spans steps").
    plain  the loop a user writes for the same job, in a fresh process: the same samples in the same order
           (``data/llava_data.py``: ``load_llava_source`` + ``drop_text_only``, ``global_batch_rows``,
           ``draw_caption``, ``make_hard_negative``, ``decode_train_images`` with the model's train transform) through
           a torch ``DataLoader`` with ``--loader-workers`` worker process(es) (default 1, the counterpart of the
           decode tasks; 0 decodes inline), ``load_clip`` + the same lock / gradient checkpointing, open_clip's
           tokenizer, ``CLIP.forward``, ``losses.compute_negclip_loss`` (one process), ``torch.optim.AdamW`` with the
           recipe's betas / eps / weight decay, open_clip's cosine schedule and the ``logit_scale`` clamp. The SAME
           torch thread count as the Ray worker (``int(--worker-cpus)``), so both arms compute on equal terms.
    ray_full  (checkpoint size) the Ray arm again with ``train.clip.lock_image: false``, ``--full-steps`` steps.

    Both timed arms stamp the wall clock at the end of every step (Ray: rank 0's ``train_log.jsonl`` line, written
    after the optimiser step and the clamp and before any checkpoint; plain: after the clamp). Steady steps/s =
    (N - W) / (t_N - t_W) over the stamps of steps W..N (``--warmup`` W): process start, ``ray.init``, the worker
    group, DeepSpeed, the data pipeline's start and the first W steps fall before t_W; the final checkpoint,
    export and shutdown after t_N. Start-up = the first step's stamp minus the moment ``run_train`` was called
    (plain: minus the moment the child started loading). The loss of every step is compared between the arms (same
    initial weights, pixels and captions: they should agree to float rounding), which checks that the loop does the
    same work.

    Where the time goes: the parent samples the CPU time of every process of the child's tree (the Ray it started
    included) every 0.5 s; the CPU-seconds per steady step of the training worker, the decode tasks, Ray's own
    processes and the driver are printed next to the loop's, and the plain arm also reports the seconds it waited
    on its DataLoader.

    Checkpoint size: the sum of the file sizes in the final ``ray/step_*`` directory of the locked and the unlocked
    run (DeepSpeed saves with ``exclude_frozen_parameters``; the final checkpoint also carries rank 0's
    ``export/``, the full model in both), and the DeepSpeed part alone.

Output: a summary table, ``checkpoint_lock_vs_full=Y`` (whole final directory, locked / unlocked), then as the LAST
line ``ray_vs_plain=X`` = Ray steady steps/s / plain steady steps/s (of the first ``--zero`` stage).
Each arm runs in its own child process, one after the other; around each the parent records the cores used by
processes outside its tree ("foreign cores", ~0 on a quiet host); ``--wait-quiet S`` waits before each arm for a
quiet host and ``--max-foreign C`` re-runs an arm during which others used more than C cores; ``--repeats N``
repeats the timed arms (medians (min-max); ``ray_vs_plain`` = the median of the per-repeat ratios). Usage::

    .venv/bin/python benchmarks/train_overhead.py [--quick] [--steps 40] [--warmup 5] [--zero 2,0] [--out DIR]
        [--repeats 3 --wait-quiet 600 --max-foreign 0.2] [--json out.json]
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
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ForeignLoad, host_load, wait_for_quiet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments/train/clip_negclip_lock.yaml"
# Vision > half of the parameters (ViT-L-14-336: 304M of 428M), so locking it matters for the checkpoint as in the
# real recipe; one locked step of 32 rows ~0.6 s on one thread of this host.
MODEL = {"width": 384, "layers": 6, "image_size": 64, "patch_size": 16, "text_width": 128, "text_layers": 4}
QUICK_MODEL = {"width": 64, "layers": 2, "image_size": 32, "patch_size": 8, "text_width": 64, "text_layers": 2}
ARMS = ("ray", "plain", "ray_full")


# ---------------------------------------------------------------------------------------------------------------
# The experiment both arms run


def overrides(args: argparse.Namespace, *, lock: bool, zero: int, steps: int) -> dict[str, Any]:
    """Dotted overrides on top of the experiment's smoke block (model, data, sizes, resources of this benchmark)."""
    llava = Path(args.synth) / "llava"
    samples = 8 * args.pairs
    per_epoch = samples // args.batch
    return {
        "seed": args.seed,
        "output_dir": str(Path(args.runs)),
        "model.source": str(args.model_dir), "model.pretrained": None,
        "data.sources": [
            {"name": "llava_558k", "path": str(llava / "synthetic_558k.json"), "image_root": str(llava / "images"),
             "format": "pretrain"},
            {"name": "llava_665k", "path": str(llava / "synthetic_mix665k.json"), "image_root": str(llava / "images"),
             "format": "mix"}],
        "data.decode_cpus": args.decode_cpus,
        "train.batch": {"global": args.batch, "micro": args.batch},
        "train.epochs": max(1, math.ceil(steps / per_epoch)),
        "train.max_steps": steps,
        "train.clip.lock_image": lock,
        "train.deepspeed.zero_stage": zero,
        "train.checkpoint.every_steps": 10 * steps + 1000,  # only the final step checkpoints
        "train.checkpoint.num_to_keep": 1,
        "train.log_every_steps": 1,
        "resources": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": args.worker_cpus, "max_failures": 0},
    }


def load_experiment(args: argparse.Namespace, *, lock: bool, zero: int, steps: int):
    from perceive_ray.config import load_config

    return load_config(EXPERIMENT, overrides(args, lock=lock, zero=zero, steps=steps), smoke=True)


# ---------------------------------------------------------------------------------------------------------------
# Child processes: one arm each; they write a JSON result


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child_ray(args: argparse.Namespace) -> dict[str, Any]:
    from perceive_ray.run.inference import quiet_ray_data
    from perceive_ray.run.training import LOG_FILE, run_train
    from perceive_ray.training import EXPORT_DIR, train_run_dir

    os.environ.pop("RAY_ADDRESS", None)
    quiet_ray_data()  # as ``perceive-ray train`` does
    if not args.no_order_fix:
        # Work-around (see RESULTS.md): Ray Train applies the DataContext captured in THIS process when the trainer
        # is built to every dataset (DataConfig.default_ingest_options), overriding the preserve_order that
        # RankDataset sets in the controller; without it, decode tasks that finish out of order make the worker
        # fail with "a batch spans steps [...]".
        import ray

        ray.data.DataContext.get_current().execution_options.preserve_order = True
    config = load_experiment(args, lock=args.lock, zero=args.zero_stage, steps=args.arm_steps)
    run_id = args.run_id
    called = time.time()
    result = run_train(config, run_id=run_id, track=False)
    returned = time.time()
    run_dir = train_run_dir(config.output_dir, run_id)
    log = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    final = sorted((run_dir / "ray").glob("step_*"))[-1]
    export = final / EXPORT_DIR
    files = {str(f.relative_to(final)): f.stat().st_size for f in sorted(final.rglob("*")) if f.is_file()}
    return {"called": called, "returned": returned,
            "stamps": [(row["step"], row["time"]) for row in log],
            "losses": [(row["step"], row["train/loss"]) for row in log],
            "step_time_s": [(row["step"], row["train/step_time_s"]) for row in log],
            "negatives": [row.get("train/negatives_local") for row in log],
            "checkpoint": {"dir": final.name, "bytes": dir_bytes(final),
                           "export_bytes": dir_bytes(export) if export.is_dir() else 0, "files": files},
            "plan": json.loads((run_dir / "run_record.json").read_text())["plan"],
            "wall_s_in_result": result.get("wall_s")}


def plain_samples(config) -> list[Any]:
    from perceive_ray.data import llava_data

    samples = []
    for source in config.data.sources:
        loaded = llava_data.load_llava_source(source.path, source.image_root, source_name=source.name,
                                              fmt=source.format, limit=source.limit)
        samples.extend(llava_data.drop_text_only(loaded)[0])
    return samples


class StepBatches:
    """A map-style dataset of whole steps: item s = the decoded global batch of step s (what a user's Dataset +
    sampler would produce), so a DataLoader worker decodes step s + 1 while the model trains on step s."""

    def __init__(self, samples: list[Any], *, seed: int, global_batch: int, caption_turn: str,
                 image_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.samples, self.seed, self.global_batch, self.caption_turn = samples, seed, global_batch, caption_turn
        self.image_size, self.mean, self.std = image_size, mean, std

    def __getitem__(self, step: int) -> dict[str, Any]:
        import torch

        from perceive_ray.data import llava_data

        per_epoch = llava_data.steps_per_epoch(len(self.samples), self.global_batch)
        epoch = step // per_epoch
        rows = llava_data.global_batch_rows(len(self.samples), seed=self.seed, epoch=epoch, step=step % per_epoch,
                                            global_batch=self.global_batch)
        chosen = [self.samples[i] for i in rows]
        captions = [llava_data.draw_caption(s.gpt_turns, seed=self.seed, epoch=epoch, key=s.key,
                                            mode=self.caption_turn) for s in chosen]
        negatives = [n for n in (llava_data.make_hard_negative(c) for c in captions) if n]
        pixels, ok = llava_data.decode_train_images(
            [s.image for s in chosen], keys=[s.key for s in chosen], seed=self.seed, epoch=epoch,
            transform="clip_train", image_size=self.image_size, mean=self.mean, std=self.std)
        if not ok.all():
            raise RuntimeError(f"step {step}: unreadable images")
        return {"pixels": torch.from_numpy(pixels), "captions": captions, "negatives": negatives}


def child_plain(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from open_clip_train.scheduler import const_lr, cosine_lr
    from torch.utils.data import DataLoader

    from perceive_ray.models.clip import load_clip
    from perceive_ray.train.losses import compute_negclip_loss

    config = load_experiment(args, lock=args.lock, zero=args.zero_stage, steps=args.arm_steps)
    threads = args.plain_threads or max(1, int(config.resources.cpus_per_worker))
    torch.set_num_threads(threads)  # what the Ray worker sets (train_fn_per_worker)
    started = time.time()
    torch.manual_seed(config.seed)
    bundle = load_clip(config.model.model_copy(update={"dtype": "float32"}), device="cpu")
    clip = bundle.model
    clip.requires_grad_(True).train()
    if config.train.clip.lock_image:
        clip.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
        clip.visual.requires_grad_(False)
    if config.train.clip.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    optim = config.train.optim
    decay, exempt = [], []  # open_clip's launcher: no weight decay on gains, biases and logit_scale
    for name, param in clip.named_parameters():
        if param.requires_grad:
            no_decay = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (exempt if no_decay else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                                   {"params": exempt, "weight_decay": 0.0}], lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps)
    steps = args.arm_steps
    schedule = (cosine_lr if config.train.schedule.kind == "cosine" else const_lr)(
        optimizer, optim.lr, config.train.schedule.warmup_steps, steps)
    size = bundle.image_size if isinstance(bundle.image_size, (list, tuple)) else (bundle.image_size,) * 2
    data = StepBatches(plain_samples(config), seed=config.seed, global_batch=config.train.batch.global_,
                       caption_turn=config.data.caption_turn, image_size=tuple(size), mean=bundle.mean,
                       std=bundle.std)
    loader = DataLoader(data, batch_size=None, sampler=range(steps), num_workers=args.loader_workers,
                        prefetch_factor=2 if args.loader_workers else None,
                        persistent_workers=False)
    max_scale = math.log(config.train.clip.clamp_logit_scale)
    stamps, losses, waits, computes, negatives = [], [], [], [], []
    loaded = time.time()
    ready = time.perf_counter()
    for step, batch in enumerate(loader):
        got = time.perf_counter()
        schedule(step)
        ids = bundle.tokenizer(batch["captions"] + batch["negatives"])
        image, text, scale = clip(batch["pixels"], ids)[:3]
        n = batch["pixels"].shape[0]
        loss = compute_negclip_loss(image, text[:n], text[n:], scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, max_scale)
        done = time.perf_counter()
        stamps.append((step + 1, time.time()))
        losses.append((step + 1, float(loss)))
        waits.append(got - ready)
        computes.append(done - got)
        negatives.append(len(batch["negatives"]))
        ready = done
    return {"started": started, "loaded": loaded, "stamps": stamps, "losses": losses, "wait_s": waits,
            "compute_s": computes, "negatives": negatives, "threads": threads}


def run_child(args: argparse.Namespace) -> int:
    import torch

    result = {"ray": child_ray, "plain": child_plain}[args.child](args)
    result["torch_threads_driver"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent: CPU accounting of a child's process tree


def process_label(proc: Any, child_pid: int) -> str:
    if proc.pid == child_pid:
        return "driver"
    try:
        name = proc.name()
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 (gone)
        return "gone"
    title = cmd[0] if cmd else name
    if title.startswith("ray::"):
        if "TrainWorker" in title:
            return "train worker"
        if "MapBatches" in title or "decode_rows" in title or "ReadRange" in title:
            return "decode tasks"
        if title.startswith("ray::IDLE"):
            return "idle Ray workers"
        return title.split("(")[0].split(".")[0]
    for known in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "agent.py", "monitor.py"):
        if known in " ".join(cmd[:3]):
            return "ray system: " + known.replace(".py", "")
    if "torch" in name or "python" in name:
        return "python: " + (" ".join(cmd[1:3])[-40:] if len(cmd) > 1 else name)
    return name


class TreeCpu:
    """Samples (wall time, {pid: (label, cpu s)}) of a child's process tree every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        import psutil

        self.psutil, self.pid, self.interval = psutil, pid, interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._labels: dict[int, str] = {}

    def _sample(self) -> None:
        psutil = self.psutil
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        out = {}
        for proc in procs:
            try:
                times = proc.cpu_times()
                out[proc.pid] = (process_label(proc, self.pid), times.user + times.system)
            except psutil.Error:
                continue
        self.samples.append((time.time(), out))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU-seconds per label over the sampling intervals that lie inside [start, end]."""
        totals: dict[str, float] = {}
        for (t0, s0), (t1, s1) in zip(self.samples, self.samples[1:], strict=False):
            if t0 < start or t1 > end:
                continue
            for pid, (label, cpu) in s1.items():
                before = s0[pid][1] if pid in s0 else 0.0  # a new process: all its CPU so far
                totals[label] = totals.get(label, 0.0) + max(0.0, cpu - before)
        return totals

    def span(self, start: float, end: float) -> float:
        inside = [t for t, _ in self.samples if start <= t <= end]
        return inside[-1] - inside[0] if len(inside) > 1 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Parent: data, model, the children in turn, the summary


def steady(stamps: list[tuple[int, float]], warmup: int) -> dict[str, float]:
    """Steps/s over the stamps of steps W..N (N the last step): (N - W) / (t_N - t_W)."""
    by_step = dict(stamps)
    last = max(by_step)
    first = min(s for s in by_step if s >= warmup) if any(s >= warmup for s in by_step) else last
    seconds = by_step[last] - by_step[first]
    steps = last - first
    return {"first": first, "last": last, "steps": steps, "seconds": seconds,
            "steps_per_s": steps / seconds if seconds > 0 else float("nan"), "t_first": by_step[first],
            "t_last": by_step[last]}


def launch(args: argparse.Namespace, arm: str, *, tag: str, lock: bool, zero: int, steps: int,
           plain_threads: int = 0) -> dict[str, Any]:
    attempts = []
    for attempt in range(1 + max(0, args.retries)):
        got = launch_once(args, arm, tag=f"{tag}_try{attempt}", lock=lock, zero=zero, steps=steps,
                          plain_threads=plain_threads)
        attempts.append(got)
        if got["ok"] and (args.max_foreign is None or got["foreign_cores"] <= args.max_foreign):
            break
        why = "failed" if not got["ok"] else f"ran beside {got['foreign_cores']:.2f} cores of other processes"
        print(f"  {tag} {why}: run again", file=sys.stderr, flush=True)
    good = [a for a in attempts if a["ok"]]
    if not good:
        print(Path(attempts[-1]["log"]).read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"{tag} failed {len(attempts)} time(s); log {attempts[-1]['log']}")
    best = min(good, key=lambda r: r["foreign_cores"])
    return {**best, "attempts": len(attempts), "foreign_cores_attempts": [a["foreign_cores"] for a in attempts]}


def launch_once(args: argparse.Namespace, arm: str, *, tag: str, lock: bool, zero: int, steps: int,
                plain_threads: int) -> dict[str, Any]:
    waited = 0.0
    if args.wait_quiet > 0:
        waited, busy = wait_for_quiet(args.quiet_cores, args.wait_quiet)
        if waited > 5:
            print(f"  waited {waited:.0f} s for the host ({busy:.2f} cores busy now)", file=sys.stderr, flush=True)
    work = Path(args.out)
    result, log = work / f"{tag}.json", work / f"{tag}.log"
    child = "ray" if arm.startswith("ray") else "plain"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--synth", str(args.synth),
           "--model-dir", str(args.model_dir), "--runs", str(args.runs), "--result", str(result),
           "--run-id", tag, "--arm-steps", str(steps), "--zero-stage", str(zero), "--pairs", str(args.pairs),
           "--batch", str(args.batch), "--seed", str(args.seed), "--worker-cpus", str(args.worker_cpus),
           "--decode-cpus", str(args.decode_cpus), "--loader-workers", str(args.loader_workers),
           "--plain-threads", str(plain_threads)]
    if lock:
        cmd.append("--lock")
    if args.no_order_fix:
        cmd.append("--no-order-fix")
    print(f"  {tag} ...", file=sys.stderr, flush=True)
    load_before = host_load()
    start = time.time()
    with open(log, "w") as sink, ForeignLoad() as foreign:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        with TreeCpu(proc.pid) as tree:
            try:
                code = proc.wait(timeout=args.arm_timeout)
            except subprocess.TimeoutExpired:  # a hung pipeline: stop the child (its reaper stops its Ray)
                proc.terminate()
                try:
                    code = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                print(f"  {tag}: no result after {args.arm_timeout:.0f} s, stopped", file=sys.stderr, flush=True)
                code = code or -1
    wall = time.time() - start
    out: dict[str, Any] = {"ok": code == 0, "exit": code, "wall_s": wall, "load_before": load_before,
                           "load_after": host_load(), "foreign_cores": foreign.cores(), "waited_s": waited,
                           "log": str(log), "launched": start}
    if code == 0:
        got = json.loads(result.read_text())
        out.update(got)
        rate = steady([tuple(s) for s in got["stamps"]], args.warmup)
        out["steady"] = rate
        cpu = tree.window(rate["t_first"], rate["t_last"])
        span = tree.span(rate["t_first"], rate["t_last"])
        out["cpu_per_step"] = {k: v / max(1, rate["steps"]) * (rate["seconds"] / span if span == span and span
                                                                else 1.0)
                               for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}
        first_stamp = got["stamps"][0][1]
        out["startup_s"] = first_stamp - (got["called"] if child == "ray" else got["started"])
        out["after_last_step_s"] = (got["returned"] if child == "ray" else start + wall) - got["stamps"][-1][1]
    return out


def describe(sizes: dict[str, int]) -> str:
    return (f"open_clip ViT {sizes['width']}w x {sizes['layers']}L @ {sizes['image_size']}px/{sizes['patch_size']}, "
            f"text {sizes['text_width']}w x {sizes['text_layers']}L (vocab 49,408, context 77)")


CPU_GROUPS = ("main", "data", "ray", "other")


def cpu_group(label: str) -> str:
    """main: the process that trains (Ray's train worker / the plain loop's process); data: image decoding (Ray Data
    tasks and the pooled Ray workers that run them, the DataLoader worker); ray: every other Ray process (the Ray
    driver waiting in ``trainer.fit``, controller, system actors, GCS, raylet, agents)."""
    if label in ("train worker",) or label == "driver:plain":
        return "main"
    if label in ("decode tasks", "idle Ray workers", "pt_data_worker"):
        return "data"
    if label.startswith(("ray", "driver")):
        return "ray"
    return "other"


def grouped_cpu(result: dict[str, Any], plain: bool) -> dict[str, float]:
    out = dict.fromkeys(CPU_GROUPS, 0.0)
    for label, value in result["cpu_per_step"].items():
        out[cpu_group("driver:plain" if plain and label == "driver" else label)] += value
    return out


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], digits: int = 3) -> str:
    """median (min-max) of the finite values."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "nan"
    med = f"{statistics.median(values):.{digits}f}"
    return med if len(values) == 1 else f"{med} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings for checking that it runs (tiny model, batch 8, 6 steps, warm-up 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 40; quick 6)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steady state starts at the stamp of this step (default 5; quick 2)")
    parser.add_argument("--full-steps", type=int, default=None,
                        help="steps of the unlocked run (checkpoint size; default 3; quick 2)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 32; quick 8)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="synthetic pairs: 8 image samples each (default 32 = 256 samples; quick 4)")
    parser.add_argument("--zero", default=None, help="DeepSpeed ZeRO stage(s) of the Ray arm, comma-separated; the "
                        "first one gives ray_vs_plain and the checkpoint sizes (default 2,0: the recipe's 2 first; "
                        "quick 2)")
    parser.add_argument("--worker-cpus", type=float, default=1.0,
                        help="resources.cpus_per_worker (default 1.0: 1 torch thread, as 1.5 would give; 1.5 + "
                             "decode 0.5 on a 2-core host leaves no CPU for Ray Data's 1-CPU ReadRange tasks)")
    parser.add_argument("--decode-cpus", type=float, default=0.5, help="data.decode_cpus (default 0.5)")
    parser.add_argument("--loader-workers", type=int, default=1,
                        help="DataLoader workers of the plain loop (default 1; 0 = decode inline)")
    parser.add_argument("--plain-default-threads", action="store_true",
                        help="also time the plain loop with torch's default thread count (information)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="repeat the timed arms; medians (min-max) are reported, ray_vs_plain is the median of "
                             "the per-repeat ratios")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated from ray,plain,ray_full")
    for key, value in MODEL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"model size (default {value}; quick {QUICK_MODEL[key]})")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each arm, wait up to this many seconds for a quiet host (default: no wait)")
    parser.add_argument("--quiet-cores", type=float, default=0.15)
    parser.add_argument("--max-foreign", type=float, default=None,
                        help="re-run an arm while other processes used more than this many cores during it")
    parser.add_argument("--retries", type=int, default=1, help="re-runs per arm (failures, --max-foreign)")
    parser.add_argument("--no-order-fix", action="store_true",
                        help="do not set preserve_order in the driver's DataContext before run_train (shows the "
                             "library's ordering bug: 'a batch spans steps')")
    parser.add_argument("--arm-timeout", type=float, default=900.0, help="stop an arm after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("ray", "plain"), help=argparse.SUPPRESS)
    for name in ("--synth", "--model-dir", "--runs", "--result", "--run-id"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--arm-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--zero-stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--lock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (6 if quick else 40)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 5)
    args.full_steps = args.full_steps or (2 if quick else 3)
    args.batch = args.batch or (8 if quick else 32)
    args.pairs = args.pairs or (4 if quick else 32)
    args.zero = args.zero or ("2" if quick else "2,0")
    if args.child:
        return run_child(args)

    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be below --steps")
    if 8 * args.pairs < args.batch:
        parser.error(f"--pairs {args.pairs} gives {8 * args.pairs} samples, fewer than the batch {args.batch}")
    zeros = [int(z) for z in args.zero.split(",") if z.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if bad := [a for a in arms if a not in ARMS]:
        parser.error(f"unknown arms {bad}")
    sizes = {k: getattr(args, k) or (QUICK_MODEL if quick else MODEL)[k] for k in MODEL}
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    stamp = datetime.now(timezone.utc)
    began = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="train_overhead_") as tmp:
        work = (args.out or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        args.out, args.synth, args.runs = work, work / "synth", work / "runs"
        args.model_dir = work / "clip_model"
        from perceive_ray.data.synthetic import ensure_generated
        from perceive_ray.models.tiny import save_clip

        summary = ensure_generated(args.synth, seed=args.seed, pairs=args.pairs)
        if summary.pairs < args.pairs:
            raise SystemExit(f"{args.synth} holds a synthetic tree of {summary.pairs} pairs; use another --out")
        if not (args.model_dir / "open_clip_config.json").is_file():
            save_clip(args.model_dir, seed=args.seed, image_size=sizes["image_size"], patch_size=sizes["patch_size"],
                      width=sizes["width"], layers=sizes["layers"], head_width=64, text_width=sizes["text_width"],
                      text_layers=sizes["text_layers"], text_heads=max(1, sizes["text_width"] // 64),
                      embed_dim=256)
        nonce = stamp.strftime("%H%M%S")
        z0 = zeros[0]
        timed = [f"ray_z{z}" for z in zeros] if "ray" in arms else []
        timed += ["plain"] if "plain" in arms else []
        timed += ["plain_default_threads"] if "plain" in arms and args.plain_default_threads else []
        for repeat in range(args.repeats):
            for name in timed:
                print(f"[repeat {repeat + 1}/{args.repeats}] {name}", file=sys.stderr, flush=True)
                tag = f"{name}_{nonce}_r{repeat}"
                if name.startswith("ray_z"):
                    got = launch(args, "ray", tag=tag, lock=True, zero=int(name[5:]), steps=args.steps)
                elif name == "plain":
                    got = launch(args, "plain", tag=tag, lock=True, zero=z0, steps=args.steps)
                else:
                    import torch

                    got = launch(args, "plain", tag=tag, lock=True, zero=z0, steps=args.steps,
                                 plain_threads=torch.get_num_threads())
                runs.setdefault(name, []).append(got)
        if "ray_full" in arms:
            print("ray_full (checkpoint size)", file=sys.stderr, flush=True)
            runs["ray_full"] = [launch(args, "ray", tag=f"ray_full_z{z0}_{nonce}", lock=False, zero=z0,
                                       steps=args.full_steps)]
    elapsed = time.perf_counter() - began

    # -- summary -----------------------------------------------------------------------------------------------
    every = [r for rs in runs.values() for r in rs]
    foreign = [r["foreign_cores"] for r in every]
    loads = [v for r in every for v in (r["load_before"], r["load_after"])]
    print(f"Training overhead, clip_finetune NegCLIP (lock_image, grad checkpointing) on a random-init "
          f"{describe(sizes)}; synthetic LLaVA {8 * args.pairs} image samples; global batch {args.batch} in one "
          f"chunk; {args.steps} steps, steady from the stamp of step {args.warmup}; Ray: 1 worker x "
          f"{args.worker_cpus:g} CPU + decode tasks {args.decode_cpus:g} CPU; plain: DataLoader "
          f"{args.loader_workers} worker(s); repeats {args.repeats}; {stamp:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s; host "
          f"{os.cpu_count()} cores, 1-min load {min(loads):.2f}-{max(loads):.2f}; cores used by other processes "
          f"during the arms {min(foreign):.2f}-{max(foreign):.2f} (~0 on a quiet host)")
    print(f"{'arm':<22} {'thr':>3} {'steady steps/s':>22} {'s/step':>6} {'start-up s':>18} {'after last s':>12} "
          f"{'wall s':>6} {'foreign':>7} | CPU-s per steady step: train / data / Ray other")
    for name in timed:
        rs = runs[name]
        last = rs[-1]
        rates = [r["steady"]["steps_per_s"] for r in rs]
        cpu = grouped_cpu(last, plain=name.startswith("plain"))
        threads = last.get("threads", int(args.worker_cpus) or 1)
        print(f"{name:<22} {threads:>3} {spread(rates):>22} {1 / median(rates):>6.3f} "
              f"{spread([r['startup_s'] for r in rs], 1):>18} {median([r['after_last_step_s'] for r in rs]):>12.1f} "
              f"{median([r['wall_s'] for r in rs]):>6.1f} {max(r['foreign_cores'] for r in rs):>7.2f} | {cpu['main']:.3f} / {cpu['data']:.3f} / "
              f"{cpu['ray']:.3f}")
    plain = runs.get("plain")
    if plain:
        waits = [w for r in plain for w in r["wait_s"][args.warmup:]]
        computes = [c for r in plain for c in r["compute_s"][args.warmup:]]
        print(f"plain loop, steady steps: compute {sum(computes) / len(computes):.3f} s/step, waiting on the "
              f"DataLoader {sum(waits) / len(waits):.4f} s/step, torch threads {plain[-1]['threads']}")
    plain_cpu = median([grouped_cpu(r, plain=True)["main"] for r in plain]) if plain else float("nan")
    for name in timed:
        if not name.startswith("ray_z"):
            continue
        for r in runs[name]:
            times = [t for s, t in r["step_time_s"] if s > r["steady"]["first"]]
            cpu = grouped_cpu(r, plain=False)
            line = (f"{name}: train/step_time_s mean {sum(times) / len(times):.3f} s (min {min(times):.3f}, max "
                    f"{max(times):.3f}); worker process CPU (all its threads) {cpu['main']:.3f} s/step = the loop's "
                    f"{plain_cpu:.3f} {cpu['main'] - plain_cpu:+.3f}")
            if plain:
                diffs = [abs(a[1] - b[1]) for a, b in zip(r["losses"], plain[-1]["losses"], strict=False)]
                line += f"; loss vs plain, {len(diffs)} steps: max |diff| {max(diffs):.1e}"
            print(line)
    ratio_ckpt = ratio_ds = float("nan")
    ray_main = runs.get(f"ray_z{z0}")
    if "ray_full" in runs and ray_main:
        full, lock = runs["ray_full"][0]["checkpoint"], ray_main[-1]["checkpoint"]
        ratio_ckpt = lock["bytes"] / full["bytes"]
        ratio_ds = (lock["bytes"] - lock["export_bytes"]) / (full["bytes"] - full["export_bytes"])
        print(f"checkpoint (final ray/step_* dir, ZeRO {z0}): lock_image {lock['bytes'] / 1e6:.1f} MB vs full "
              f"{full['bytes'] / 1e6:.1f} MB; DeepSpeed files alone (without export/): "
              f"{(lock['bytes'] - lock['export_bytes']) / 1e6:.1f} vs "
              f"{(full['bytes'] - full['export_bytes']) / 1e6:.1f} MB = {ratio_ds:.3f}")
        for label, r in (("lock", lock), ("full", full)):
            print(f"  {label}: " + ", ".join(f"{k.split('/')[-1]} {v / 1e6:.1f} MB" for k, v in r["files"].items()
                                             if v > 1e5))
    ratios = ([a["steady"]["steps_per_s"] / b["steady"]["steps_per_s"] for a, b in zip(ray_main, plain, strict=True)]
              if ray_main and plain else [])
    others = {z: [a["steady"]["steps_per_s"] / b["steady"]["steps_per_s"]
                  for a, b in zip(runs[f"ray_z{z}"], plain, strict=True)] for z in zeros[1:] if plain}
    for z, values in others.items():
        print(f"ZeRO {z}: ray / plain = {spread(values)} (information; the headline uses ZeRO {z0})")
    if ratios:
        print(f"ZeRO {z0}: ray / plain per repeat = {spread(ratios)} (target >= 0.85)")
    ratio = median(ratios)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "model": sizes,
                                         "date": stamp.isoformat(), "elapsed_s": elapsed, "runs": runs,
                                         "ray_vs_plain": ratio, "ray_vs_plain_repeats": ratios,
                                         "ray_vs_plain_other_zero": others,
                                         "checkpoint_lock_vs_full": ratio_ckpt,
                                         "checkpoint_lock_vs_full_deepspeed_only": ratio_ds}, indent=2,
                                        default=str))
    print(f"checkpoint_lock_vs_full={ratio_ckpt:.3f}")
    print(f"ray_vs_plain={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
