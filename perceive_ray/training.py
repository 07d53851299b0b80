"""The Ray-free part of a training run: preflight, run directory, plan, record, tracking and the train -> eval link.

Everything here happens on the driver before any worker starts (a bad file, row, key or image is an exit-2 error
with nothing started), or after the trainer returns. ``run/training.py`` adds only the Ray pieces: the per-rank
Ray Data pipelines and the one ``train_fn_per_worker``.

Run directory ``<output_dir>/train/<run id>/``: ``config.yaml``, ``run_record.json`` (config hash, data hashes,
plan, versions; never rewritten), ``deepspeed.json``, ``samples.arrow`` (the memory-mapped sample table the decode
tasks read), ``tracking.json`` (the MLflow run id, so a rerun reopens the same run), ``ray/`` (Ray Train storage:
checkpoints ``step_XXXXXXXX`` and the checkpoint manager's snapshot, or for a ``resources.local`` run perceive_ray's
own list ``local_checkpoints.json``; rerunning the same run id resumes from it),
``export/`` (the trained model in the layout the loaders read) and ``result.json`` once finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perceive_ray import registry
from perceive_ray.config import ConfigError, config_record, dump_config
from perceive_ray.run_directory import RunMismatchError, read_record, write_record_once
from perceive_ray.train.deepspeed import build_deepspeed_config
from perceive_ray.training_config import TrainExperimentConfig, compute_accumulation

TRAIN_DIR = "train"
SAMPLES_FILE = "samples.arrow"
LENGTHS_FILE = "modality_lengths.npy"  # signed word counts (image > 0, text-only < 0): the modality-length order
DEEPSPEED_FILE = "deepspeed.json"
RESULT_FILE = "result.json"
EXPORT_DIR = "export"
STORAGE_NAME = "ray"
TRAIN_REF = "train:"
STEP_DIR = re.compile(r"step_(\d{8})")
LOCAL_CHECKPOINTS = "local_checkpoints.json"  # resources.local: the registered steps, in the Ray Train storage folder


@dataclass(frozen=True)
class TrainPlan:
    """How many steps, and how each step's global batch is laid out over workers and GradCache chunks."""

    num_samples: int
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    world_size: int
    local_rows: int
    chunks: int


def train_run_dir(output_dir: str | Path, run_id: str) -> Path:
    return Path(output_dir) / TRAIN_DIR / run_id


def default_run_id(config: TrainExperimentConfig) -> str:
    return f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def config_hash(config: TrainExperimentConfig) -> str:
    """What must not change when a run resumes: the whole config except tracking and smoke."""
    data = config_record(config)
    for key in ("tracking", "smoke", "description"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def absolute_paths(config: TrainExperimentConfig) -> TrainExperimentConfig:
    """The config with relative paths made absolute: workers do not run in the driver's working directory."""
    def absolute(value: Any) -> Any:
        return Path(value).expanduser().resolve() if value is not None else None

    model = config.model
    if Path(model.source).expanduser().exists():
        model = model.model_copy(update={"source": str(absolute(model.source))})
    if model.pretrained and Path(model.pretrained).expanduser().is_file():
        model = model.model_copy(update={"pretrained": str(absolute(model.pretrained))})
    sources = [s.model_copy(update={"path": absolute(s.path), "image_root": absolute(s.image_root)})
               for s in config.data.sources]
    data = config.data.model_copy(update={"sources": sources, "text_embeddings": absolute(config.data.text_embeddings)})
    train = config.train
    tower = train.llava.vision_tower
    if tower and Path(tower).expanduser().exists():
        train = train.model_copy(update={"llava": train.llava.model_copy(update={"vision_tower": str(absolute(tower))})})
    return config.model_copy(update={"model": model, "data": data, "output_dir": absolute(config.output_dir),
                                     "train": train})


def build_plan(config: TrainExperimentConfig, num_samples: int, lengths: Any = None) -> TrainPlan:
    """Steps per epoch: full global batches of the epoch order (with ``lengths``: full single-modality mega-batches,
    as LLaVA's group_by_modality_length forms them; the partial ones are dropped)."""
    import numpy as np

    from perceive_ray.data.llava_data import steps_per_epoch

    global_batch = config.train.batch.global_
    if lengths is None:
        per_epoch = steps_per_epoch(num_samples, global_batch)
    else:
        lengths = np.asarray(lengths)
        per_epoch = int((lengths > 0).sum()) // global_batch + int((lengths < 0).sum()) // global_batch
    if per_epoch == 0 and lengths is not None:
        raise ConfigError(f"train.batch.global: neither the {int((lengths > 0).sum())} image rows nor the "
                          f"{int((lengths < 0).sum())} text-only rows of the {num_samples} training samples "
                          f"(data.sources) fill one single-modality mega-batch of {global_batch} "
                          "(train.llava.group_by_modality_length); no full step fits in an epoch")
    if per_epoch == 0:
        raise ConfigError(f"train.batch.global: {global_batch} is larger than the {num_samples} training samples "
                          "(data.sources); no full step fits in an epoch")
    total = per_epoch * config.train.epochs
    if config.train.max_steps is not None:
        total = min(total, config.train.max_steps)
    local, chunks = compute_accumulation(config)
    return TrainPlan(num_samples, per_epoch, total, global_batch, config.resources.num_workers, local, chunks)


def job_data_spec(config: TrainExperimentConfig) -> Any:
    """The job's DataSpec (transform, negatives, augmentation), computed without loading weights."""
    module = registry.resolve("jobs", config.job).__module__
    return registry.load_target(f"{module}:data_spec")(config)


def load_samples(config: TrainExperimentConfig, *, keep_text_only: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """Read and check every data source (errors name the file and row) -> samples + a summary.

    Text-only rows are dropped (§5.1) unless ``keep_text_only`` (LLaVA stage 2 and VLM2Vec train on them)."""
    from perceive_ray.data import llava_data
    from perceive_ray.data.sources import sha256_file

    samples, summary = [], {}
    for source in config.data.sources:
        loaded = llava_data.load_llava_source(source.path, source.image_root, source_name=source.name,
                                              fmt=source.format, limit=source.limit)
        images = loaded if keep_text_only else llava_data.drop_text_only(loaded)[0]
        summary[source.name] = {"path": str(source.path), "rows": len(loaded),
                                "image_rows": sum(1 for s in images if s.image is not None),
                                "text_only_dropped": len(loaded) - len(images), "sha256": sha256_file(source.path)}
        samples.extend(images)
    if not samples:
        raise ConfigError("data.sources: no samples to train on")
    return samples, summary


def candidate_captions(config: TrainExperimentConfig, samples: list[Any]) -> list[str]:
    """Every caption the data pipeline can draw (no augmentation): all gpt turns, or the first of each sample."""
    if config.data.caption_turn == "first":
        texts = {s.gpt_turns[0] for s in samples if s.gpt_turns}
    else:
        texts = {turn for s in samples for turn in s.gpt_turns}
    return sorted(texts)


def check_text_embeddings(config: TrainExperimentConfig, samples: list[Any]) -> None:
    """The precomputed LLM text vectors (``data.text_embeddings``) must exist and cover every drawable caption."""
    if config.data.text_embeddings is None:
        return
    from perceive_ray.models.text_embeddings import TextEmbeddingError, TextEmbeddingStore, preview_text

    try:
        store = TextEmbeddingStore(config.data.text_embeddings)
    except TextEmbeddingError as exc:
        raise ConfigError(f"data.text_embeddings: {exc}") from None
    missing = [text for text in candidate_captions(config, samples) if text not in store]
    if missing:
        shown = ", ".join(preview_text(t) for t in missing[:3])
        raise ConfigError(f"data.text_embeddings: {config.data.text_embeddings} lacks {len(missing)} of the captions "
                          f"training can draw (data.caption_turn: {config.data.caption_turn}), e.g. {shown}")


def build_text_embedding_store(config: TrainExperimentConfig, directory: str | Path) -> int:
    """Encode every drawable caption with the model's own LLM2Vec text encoder into a store at ``directory``.

    In-process: right for smoke data and small sets. At LLaVA scale (1.2M captions through an 8B LLM) the same
    layout is meant to be written by a Ray Data job over GPUs, which does not exist yet.
    """
    from perceive_ray.models.llm2clip import load_llm2clip
    from perceive_ray.models.text_embeddings import write_text_embeddings

    samples, _ = load_samples(config)
    texts = candidate_captions(config, samples)
    bundle = load_llm2clip(config.model, device="cpu")
    vectors = bundle.encode_llm(texts).float().numpy()
    write_text_embeddings(directory, texts, vectors, meta=bundle.text_meta)
    return len(texts)


def modality_lengths(samples: list[Any]) -> Any:
    """LLaVA's modality lengths (whitespace words; > 0 image rows, < 0 text-only rows), int64."""
    import numpy as np

    from perceive_ray.train.llava_labels import modality_length

    return np.asarray([modality_length(s.human_turns, s.gpt_turns, has_image=s.image is not None) for s in samples],
                      dtype=np.int64)


def check_job_samples(config: TrainExperimentConfig, samples: list[Any]) -> None:
    """The job's own per-sample check before anything starts (LLaVA: every sample labels exactly; VLM2Vec:
    every sample yields a query and a target). A job module without ``check_samples`` checks nothing more."""
    import importlib

    module = importlib.import_module(registry.resolve("jobs", config.job).__module__)
    check = getattr(module, "check_samples", None)
    if check is not None:
        check(config, samples)


def step_rows(plan: dict[str, int], *, order: str, lengths_path: str | None, seed: int, epoch: int, step: int,
              rank: int) -> Any:
    """Sample indices of rank ``rank`` at (epoch, step within the epoch): its contiguous slice of the global batch.

    ``random``: the counter-based epoch order (``llava_data.rank_rows``). ``modality_length``: mega-batch ``step`` of
    ``modality_length_groups`` (single-modality, length-balanced over contiguous rank slices)."""
    from perceive_ray.data import llava_data

    if order == "random":
        return llava_data.rank_rows(plan["num_samples"], seed=seed, epoch=epoch, step=step,
                                    global_batch=plan["global_batch"], world_size=plan["world_size"], rank=rank)
    stat = Path(lengths_path).stat()  # in the cache key: a run directory recreated under the same id is re-read
    groups = _modality_groups(str(lengths_path), stat.st_mtime_ns, stat.st_size, plan["global_batch"], seed, epoch)
    per_rank = plan["global_batch"] // plan["world_size"]
    block = groups[step]
    if len(block) != plan["global_batch"]:
        raise RuntimeError(f"modality mega-batch {step} of epoch {epoch} has {len(block)} rows, not "
                           f"{plan['global_batch']}")
    return block[rank * per_rank:(rank + 1) * per_rank]


@functools.lru_cache(maxsize=4)
def _modality_groups(lengths_path: str, mtime_ns: int, size: int, global_batch: int, seed: int,
                     epoch: int) -> list[Any]:
    import numpy as np

    from perceive_ray.train.llava_labels import modality_length_groups

    return modality_length_groups(np.load(lengths_path), global_batch=global_batch, seed=seed, epoch=epoch)


def check_chunker(config: TrainExperimentConfig) -> None:
    if config.data.pacl_augment:
        from perceive_ray.data.llava_data import load_spacy_chunker

        load_spacy_chunker(config.data.noun_chunker)


@dataclass
class PreparedRun:
    config: TrainExperimentConfig
    run_id: str
    run_dir: Path
    plan: TrainPlan
    data_spec: Any
    deepspeed: dict[str, Any]
    resumed: bool
    finished: bool


def prepare_training(config: TrainExperimentConfig, *, run_id: str | None = None) -> PreparedRun:
    """Check everything, then create (or reopen) the run directory: the only work before the trainer starts.

    ``model.source: train:<run id>`` (LLaVA stage 2 from stage 1, VLM2Vec from a trained LLaVA) is resolved here,
    not when the file is loaded, so the file of a later stage validates before the earlier stage has run."""
    config = resolve_model_ref(config)
    run_id = run_id or default_run_id(config)
    run_dir = train_run_dir(config.output_dir, run_id)
    stored = read_record(run_dir)
    chash = config_hash(config)
    if stored is not None and stored.get("config_hash") != chash:
        raise RunMismatchError(f"run directory {run_dir} was trained with another configuration (config hash "
                               f"{stored.get('config_hash')} vs {chash}); resuming would mix them: pick another "
                               "--run-id (diff its config.yaml against yours)")
    spec = job_data_spec(absolute_paths(config))
    check_chunker(config)
    deepspeed = build_deepspeed_config(config)
    if stored is not None and (run_dir / SAMPLES_FILE).is_file():
        plan = TrainPlan(**stored["plan"])
        finished = (run_dir / RESULT_FILE).is_file()
        return PreparedRun(config, run_id, run_dir, plan, spec, deepspeed, resumed=True, finished=finished)
    samples, summary = load_samples(config, keep_text_only=spec.keep_text_only)
    check_text_embeddings(config, samples)
    check_job_samples(config, samples)
    lengths = modality_lengths(samples) if spec.order == "modality_length" else None
    plan = build_plan(config, len(samples), lengths)
    import numpy as np

    from perceive_ray.data.llava_data import write_sample_table
    from perceive_ray.tracking.run_record import build_run_record

    run_dir.mkdir(parents=True, exist_ok=True)
    write_sample_table(samples, run_dir / SAMPLES_FILE)
    if lengths is not None:
        np.save(run_dir / LENGTHS_FILE, lengths)
    (run_dir / DEEPSPEED_FILE).write_text(json.dumps(deepspeed, indent=2) + "\n")
    record = {**build_run_record({name: {Path(s["path"]).name: s["sha256"]} for name, s in summary.items()}), "kind": "train",
              "run_id": run_id, "job": config.job, "config_hash": chash, "plan": asdict(plan), "data": summary,
              "data_spec": asdict(spec)}
    write_record_once(run_dir, record, dump_config(config))
    return PreparedRun(config, run_id, run_dir, plan, spec, deepspeed, resumed=False, finished=False)


def resolve_model_ref(config: TrainExperimentConfig) -> TrainExperimentConfig:
    """The config with ``model.source: train:<run id>`` replaced by that finished run's export (ConfigError if none)."""
    if not str(config.model.source).startswith(TRAIN_REF):
        return config
    data = resolve_train_refs({"model": config.model.model_dump()}, config.output_dir)
    return config.model_copy(update={"model": config.model.model_copy(update=data["model"])})


def latest_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest registered checkpoint, 0 when there is none: Ray Train's (its checkpoint manager's
    snapshot file), or a ``resources.local`` run's (``local_checkpoints.json``)."""
    snapshot = run_dir / STORAGE_NAME / "checkpoint_manager_snapshot.json"
    try:
        steps = [int(m) for m in STEP_DIR.findall(snapshot.read_text())]
    except OSError:
        steps = []
    return max(steps + local_checkpoint_steps(run_dir), default=0)


def local_checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of a ``resources.local`` run's registered checkpoints, oldest first ([] when there is none)."""
    try:
        return sorted(int(step) for step in json.loads((run_dir / STORAGE_NAME / LOCAL_CHECKPOINTS).read_text()))
    except (OSError, ValueError, TypeError):
        return []


def local_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / STORAGE_NAME / f"step_{step:08d}"


def register_local_checkpoint(source: Path, run_dir: Path, step: int, keep: int | None) -> Path:
    """``resources.local``: what Ray Train's storage and checkpoint manager do for a worker group's checkpoints,
    which its local mode only keeps in memory. Copies the checkpoint folder to ``ray/step_XXXXXXXX`` (the path a
    worker group's would have), then registers the step (the list is replaced atomically, so a process killed at
    any point leaves the previous checkpoint registered and whole), then deletes those beyond ``keep``."""
    target = local_checkpoint_dir(run_dir, step)
    temp = target.with_name(target.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    shutil.copytree(source, temp)
    shutil.rmtree(target, ignore_errors=True)
    temp.rename(target)
    steps = sorted(set(local_checkpoint_steps(run_dir)) | {step})
    kept = steps[-keep:] if keep else steps
    listing = run_dir / STORAGE_NAME / (LOCAL_CHECKPOINTS + ".tmp")
    listing.write_text(json.dumps(kept) + "\n")
    listing.replace(run_dir / STORAGE_NAME / LOCAL_CHECKPOINTS)
    for old in steps:
        if old not in kept:
            shutil.rmtree(local_checkpoint_dir(run_dir, old), ignore_errors=True)
    return target


def copy_export(checkpoint_dir: Path, run_dir: Path) -> Path:
    """Copy the final checkpoint's ``export/`` (written by rank 0) to ``<run dir>/export``."""
    source = Path(checkpoint_dir) / EXPORT_DIR
    if not source.is_dir():
        raise RuntimeError(f"{checkpoint_dir}: the final checkpoint holds no {EXPORT_DIR}/ (rank 0 writes it)")
    target = run_dir / EXPORT_DIR
    temp = run_dir / (EXPORT_DIR + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    shutil.copytree(source, temp)
    shutil.rmtree(target, ignore_errors=True)
    temp.rename(target)
    return target


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


# -- train -> eval ----------------------------------------------------------------------------------------------

def resolve_train_export(value: str, output_dir: str | Path) -> Path:
    """``train:<run id>`` -> ``<output_dir>/train/<run id>/export`` (which must exist: the run finished)."""
    run_id = value.removeprefix(TRAIN_REF)
    export = train_run_dir(output_dir, run_id) / EXPORT_DIR
    if not run_id or not export.is_dir():
        raise ConfigError(f"{value!r}: no finished training run {run_id!r} under {Path(output_dir) / TRAIN_DIR} "
                          f"(expected {export})")
    return export


def resolve_train_refs(data: dict[str, Any], output_dir: str | Path) -> dict[str, Any]:
    """Replace ``train:<id>`` references of an eval config (plain data) by the exported files they name.

    ``model.source``: the exported open_clip directory (CLIP fine-tunes), or the frozen encoder a head was trained
    on (head exports carry ``encoder.json``). Any scorer weight option (``head_weights``): the exported head file.
    """
    model = data.get("model") or {}
    source = model.get("source")
    if isinstance(source, str) and source.startswith(TRAIN_REF):
        export = resolve_train_export(source, output_dir)
        encoder = export / "encoder.json"
        if encoder.is_file():
            frozen = json.loads(encoder.read_text())
            model.update({"source": frozen["source"], "pretrained": frozen.get("pretrained")})
        else:
            model.update({"source": str(export), "pretrained": None})
    options = (data.get("scorer") or {}).get("options") or {}
    for key, value in list(options.items()):
        if isinstance(value, str) and value.startswith(TRAIN_REF):
            export = resolve_train_export(value, output_dir)
            heads = sorted(export.glob("*.safetensors"))
            if key == "head_weights" and (export / "head.safetensors").is_file():
                options[key] = str(export / "head.safetensors")
            elif len(heads) == 1:
                options[key] = str(heads[0])
            else:
                raise ConfigError(f"scorer.options.{key}: {value!r} names an export without one weights file")
    return data
