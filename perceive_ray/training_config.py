"""The training experiment schema (``kind: train``): every hyperparameter of PROTOCOLS §5 is a dotted key.

One schema family with ``config.py``: the same loader, ``base:``, smoke blocks and dotted overrides, so a Tune sweep
varies ``train.optim.lr`` or ``train.clip.lock_image`` exactly as the command line does. The global batch is part
of the experiment, never of the cluster: ``train.batch.global`` is kept under any worker count, as
micro-batch x workers x accumulation chunks (contrastive losses see all ``global`` rows at once: the chunks are
GradCache chunks, not gradient accumulation, so the number of negatives does not depend on the hardware).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from perceive_ray import registry
from perceive_ray.config import ModelConfig, StrictModel, TrackingConfig

LossKind = Literal["clip", "negclip", "siglip", "pacl", "sparc", "lm", "infonce"]
HeadsKind = Literal["pacl", "pacl_rope", "sparc", "sparc_rope", "pacl_llm_text"]
# Which loss each job accepts; the heads job's loss follows from the head kind.
# lm: LLaVA's next-token cross-entropy on the supervised tokens; infonce: VLM2Vec's query->target InfoNCE (§5.6).
JOB_LOSSES: dict[str, tuple[str, ...]] = {"clip_finetune": ("clip", "negclip", "siglip"), "heads": ("pacl", "sparc"),
                                          "llava": ("lm",), "vlm2vec": ("infonce",)}
JOB_FAMILIES: dict[str, tuple[str, ...]] = {"clip_finetune": ("clip",), "heads": ("clip", "llm2clip"),
                                            "llava": ("llava",), "vlm2vec": ("llava",)}
DEFAULT_LOSS = {"clip_finetune": "clip", "llava": "lm", "vlm2vec": "infonce"}


class DataSourceConfig(StrictModel):
    """One LLaVA-1.5 JSON file: ``pretrain`` = LCS-558K layout, ``mix`` = mix-665K layout (routed by file)."""

    name: str
    path: Path
    image_root: Path
    format: Literal["pretrain", "mix"]
    limit: int | None = Field(default=None, gt=0, description="Use only the first N rows (smoke runs).")


class TrainDataConfig(StrictModel):
    sources: list[DataSourceConfig] = Field(min_length=1)
    # §5.1: a uniformly random gpt turn per epoch; §5.5 allows the first turn for the 665K text embeddings.
    caption_turn: Literal["random", "first"] = "random"
    # §5.2 PACL caption augmentation: needs spaCy's en_core_web_sm noun chunker.
    pacl_augment: bool = False
    noun_chunker: str = "en_core_web_sm"
    # §5.5: precomputed LLM text embeddings keyed by text (pacl_llm_text heads only).
    text_embeddings: Path | None = None
    decode_cpus: float = Field(default=0.5, gt=0, description="Ray CPUs per image-decoding task.")
    # At most this many decoding tasks at once (Ray Data TaskPoolStrategy(size=n)); null: as many as CPUs allow. Each
    # task is a worker process (a LLaVA job's holds torch + transformers for the image processor, ~1 GB): a cap bounds
    # the run's memory on a small machine. 0: no decoding tasks and no Ray Data dataset, each training worker makes
    # its own row ids and decodes them: the same pixels, bit for bit, for tiny images on a few cores where a decoding
    # process costs more than it saves; on a GPU cluster keep tasks, so decoding overlaps the steps.
    decode_tasks: int | None = Field(default=None, ge=0)
    # A missing image found mid-epoch is skipped and counted; more than this fraction of a step's rows fails the run.
    max_missing_fraction: float = Field(default=0.01, ge=0.0, le=1.0)


class BatchConfig(StrictModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    global_: int = Field(alias="global", gt=0, description="Rows per optimiser step, whatever the worker count.")
    micro: int | None = Field(default=None, gt=0, description="Rows per forward chunk per worker (null: all).")
    # VLM2Vec only: GradCache chunk of the targets (null: ``micro``); ``micro`` is then the query chunk (§5.6: 1/1).
    micro_target: int | None = Field(default=None, gt=0)


class OptimConfig(StrictModel):
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


class ScheduleConfig(StrictModel):
    # cosine / const: open_clip_train's schedules (CLIP jobs, §5.1); hf_cosine / linear: transformers' warmup +
    # cosine / linear decay to 0 (LLaVA's HF Trainer, VLM2Vec), which scale every parameter group's own lr.
    kind: Literal["cosine", "const", "hf_cosine", "linear"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    # LLaVA's --warmup_ratio 0.03: ceil(ratio x total steps) warmup steps, overriding warmup_steps when set.
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)


class LossConfig(StrictModel):
    kind: LossKind | None = None  # null: the job's default (clip for clip_finetune, the head's loss for heads)
    # NegCLIP/SigLIP left/right negatives (§5.1); null: leftright for negclip, none otherwise.
    hard_negatives: Literal["none", "leftright"] | None = None
    temperature: float = Field(default=0.1, gt=0, description="Fixed tau of the PACL / SPARC losses.")
    sparc_global_weight: float = 0.5
    sparc_local_weight: float = 1.0
    sparc_mask_padding: bool = False


class ClipTrainConfig(StrictModel):
    lock_image: bool = True
    lock_text: bool = False
    grad_checkpointing: bool = True
    clamp_logit_scale: float = Field(default=100.0, gt=0, description="logit_scale.exp() <= this after each step.")


class HeadsTrainConfig(StrictModel):
    kind: HeadsKind = "pacl"
    embed_dim: int = Field(default=768, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    pacl_pooling: Literal["uniform", "sigmoid"] = "uniform"
    sparc_sigma: float | None = Field(default=None, ge=0, lt=1, description="null: 1 / number of patches")


class AdapterTrainConfig(StrictModel):
    """A peft LoRA / DoRA adapter on the LLM's linear layers (the vision tower and projector never get one)."""

    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    use_dora: bool = False
    init: Literal["default", "gaussian"] = "default"  # peft init_lora_weights: True (kaiming A, zero B) | gaussian


class LlavaTrainConfig(StrictModel):
    """LLaVA-1.5's two stages (TRAINING.md §3, PROTOCOLS §5.7)."""

    # projector: stage 1, projector only, ``plain`` conversation; lora: stage 2, LoRA + projector, vicuna ``v1``
    # (finetune_lora.sh); full: stage 2 as finetune.sh, the whole LLM + projector (vision tower frozen), ``v1``. full
    # may also assemble (vision_tower set): an LLM trained from scratch with its projector in one run (the demo).
    stage: Literal["projector", "lora", "full"] = "projector"
    # Stage 1 assembles the model when model.source is a plain causal LM: this CLIP vision tower + a new projector.
    # null: model.source is already a Llava checkpoint (stage 2: train:<stage-1 run id>).
    vision_tower: str | None = None
    select_feature: Literal["patch", "cls"] = "patch"  # assembly only; a Llava checkpoint carries its own
    image_preprocess: Literal["processor", "pad"] | None = None  # null: processor (stage 1), pad (stage 2)
    group_by_modality_length: bool | None = None  # null: false (stage 1), true (stage 2)
    max_length: int = Field(default=2048, gt=0, description="model_max_length: right truncation, never in the image")
    projector_lr: float | None = Field(default=None, gt=0, description="Stage 2: the projector's own lr (2e-5).")
    lora: AdapterTrainConfig = AdapterTrainConfig(r=128, alpha=256, dropout=0.05)
    grad_checkpointing: bool = True

    def conversation(self) -> str:
        return "plain" if self.stage == "projector" else "v1"

    def resolved_preprocess(self) -> str:
        return self.image_preprocess or ("processor" if self.stage == "projector" else "pad")

    def resolved_grouping(self) -> bool:
        return self.group_by_modality_length if self.group_by_modality_length is not None \
            else self.stage != "projector"


class Vlm2VecTrainConfig(StrictModel):
    """LLaVA-1.5 converted to a contrastive embedder (PROTOCOLS §5.6, TRAINING.md §4)."""

    adapter: AdapterTrainConfig = AdapterTrainConfig(r=8, alpha=64, dropout=0.1, use_dora=True, init="gaussian")
    temperature: float = Field(default=0.02, gt=0)
    max_length: int = Field(default=1024, gt=0)
    # §5.6: images resized to the processor's square size (aspect-distorting) before the processor.
    image_preprocess: Literal["resize", "pad", "processor"] = "resize"
    grad_checkpointing: bool = True


class DeepSpeedTrainConfig(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_clip: float | None = Field(default=None, gt=0)
    stage3_param_persistence_threshold: int | None = Field(default=None, ge=0)


class CheckpointTrainConfig(StrictModel):
    every_steps: int = Field(default=100, gt=0)
    num_to_keep: int | None = Field(default=2, gt=0)


class TrainConfig(StrictModel):
    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="Stop after this many steps (smoke runs).")
    batch: BatchConfig
    optim: OptimConfig
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    clip: ClipTrainConfig = ClipTrainConfig()
    heads: HeadsTrainConfig = HeadsTrainConfig()
    llava: LlavaTrainConfig = LlavaTrainConfig()
    vlm2vec: Vlm2VecTrainConfig = Vlm2VecTrainConfig()
    deepspeed: DeepSpeedTrainConfig = DeepSpeedTrainConfig()
    checkpoint: CheckpointTrainConfig = CheckpointTrainConfig()
    log_every_steps: int = Field(default=10, gt=0)


class TrainResourcesConfig(StrictModel):
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    max_failures: int = Field(default=1, ge=0, description="Worker-group restarts from the latest checkpoint.")
    local: bool = Field(default=False, description=(
        "Ray Train's local mode (ScalingConfig num_workers=0): the training function runs in the calling process "
        "(the driver, or a sweep's trial), one rank, no controller or worker actors. For small runs on few cores, "
        "where starting a worker group costs more than the training; checkpoints are kept by perceive_ray in the "
        "same place, so a rerun resumes. Needs num_workers 1 and data.decode_tasks 0; max_failures does not apply."))


class TrainExperimentConfig(StrictModel):
    """A training experiment: a registered job, the model it starts from, LLaVA-format data and ``train.*``."""

    kind: Literal["train"] = "train"
    name: str
    description: str = ""
    seed: int = 0
    job: str
    model: ModelConfig
    data: TrainDataConfig
    train: TrainConfig
    resources: TrainResourcesConfig = TrainResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: Path = Path("runs")
    smoke: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> TrainExperimentConfig:
        jobs = registry.names("jobs")
        if self.job not in jobs:
            raise ValueError(f"job: unknown training job {self.job!r}; known: {', '.join(jobs)}")
        if self.model.family not in JOB_FAMILIES[self.job]:
            raise ValueError(f"model.family: job {self.job!r} accepts {', '.join(JOB_FAMILIES[self.job])}, "
                             f"not {self.model.family!r}")
        loss = resolve_loss_kind(self)
        if loss not in JOB_LOSSES[self.job]:
            raise ValueError(f"train.loss.kind: job {self.job!r} trains with {', '.join(JOB_LOSSES[self.job])}, "
                             f"not {loss!r}")
        if self.job == "heads" and loss != head_loss(self.train.heads.kind):
            raise ValueError(f"train.loss.kind: heads of kind {self.train.heads.kind!r} train with "
                             f"{head_loss(self.train.heads.kind)!r}, not {loss!r}")
        negatives = resolve_hard_negatives(self)
        if loss == "negclip" and negatives != "leftright":
            raise ValueError("train.loss.hard_negatives: negclip needs leftright negatives (use kind: clip for none)")
        if loss == "clip" and negatives != "none":
            raise ValueError("train.loss.hard_negatives: kind clip has no negatives; use kind: negclip")
        if negatives != "none" and self.job != "clip_finetune":
            raise ValueError("train.loss.hard_negatives: only the clip_finetune job uses hard negatives")
        if (self.train.heads.kind == "pacl_llm_text") != (self.model.family == "llm2clip") and self.job == "heads":
            raise ValueError("train.heads.kind: pacl_llm_text runs on the llm2clip family, the other heads on clip")
        if self.train.heads.kind == "pacl_llm_text" and self.job == "heads" and self.data.text_embeddings is None:
            raise ValueError("data.text_embeddings: pacl_llm_text heads need precomputed LLM text embeddings")
        if self.train.heads.kind == "pacl_llm_text" and self.job == "heads" and self.data.pacl_augment:
            raise ValueError("data.pacl_augment: the LLM-text head reads precomputed text vectors, which cannot cover "
                             "captions drawn at training time; set data.pacl_augment: false")
        if self.data.pacl_augment and self.job != "heads":
            raise ValueError("data.pacl_augment: the PACL caption augmentation belongs to the heads job")
        names = [s.name for s in self.data.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: source names must be unique, got {names}")
        ds = self.train.deepspeed
        if ds.offload_optimizer and ds.zero_stage < 1:
            raise ValueError("train.deepspeed.offload_optimizer: needs zero_stage >= 1")
        if ds.offload_param and ds.zero_stage != 3:
            raise ValueError("train.deepspeed.offload_param: needs zero_stage 3")
        if self.job == "vlm2vec" and ds.zero_stage == 3:
            raise ValueError("train.deepspeed.zero_stage: the VLM2Vec job runs ZeRO 0-2 (under ZeRO-3 a text-only "
                             "query skips the vision tower and hangs the other ranks, and DoRA needs gathered base "
                             "weights; TRAINING.md §4)")
        if self.train.batch.micro_target is not None and self.job != "vlm2vec":
            raise ValueError("train.batch.micro_target: only the VLM2Vec job has separate target chunks")
        if self.job == "llava":
            llava = self.train.llava
            if llava.stage == "projector" and llava.projector_lr is not None:
                raise ValueError("train.llava.projector_lr: stage projector trains only the projector, at "
                                 "train.optim.lr")
            if llava.projector_lr is not None and self.train.schedule.kind in ("cosine", "const"):
                raise ValueError("train.llava.projector_lr: the open_clip schedules (train.schedule.kind cosine / "
                                 "const) set every parameter group to train.optim.lr; use hf_cosine or linear")
            if llava.stage == "lora" and llava.vision_tower is not None:
                raise ValueError("train.llava.vision_tower: stage lora starts from a Llava checkpoint (model.source: "
                                 "train:<stage-1 run id>), it assembles nothing")
        if self.resources.local and self.resources.num_workers != 1:
            raise ValueError(f"resources.local: Ray Train's local mode runs one rank in the calling process; set "
                             f"resources.num_workers: 1 (got {self.resources.num_workers})")
        if self.resources.local and self.data.decode_tasks != 0:
            raise ValueError("resources.local: a local-mode run decodes its own rows; set data.decode_tasks: 0")
        compute_accumulation(self)  # raises on a global batch that does not split
        return self


def head_loss(kind: str) -> str:
    return "sparc" if kind.startswith("sparc") else "pacl"


def resolve_loss_kind(config: TrainExperimentConfig) -> str:
    if config.train.loss.kind is not None:
        return config.train.loss.kind
    return head_loss(config.train.heads.kind) if config.job == "heads" else DEFAULT_LOSS.get(config.job, "clip")


def resolve_hard_negatives(config: TrainExperimentConfig) -> str:
    if config.train.loss.hard_negatives is not None:
        return config.train.loss.hard_negatives
    return "leftright" if resolve_loss_kind(config) == "negclip" else "none"


def compute_accumulation(config: TrainExperimentConfig) -> tuple[int, int]:
    """(rows per worker per step, chunks per step) so that chunk x workers x chunks == train.batch.global.

    VLM2Vec cuts queries by ``micro`` and targets by ``micro_target``: a step has max of the two chunk counts
    (chunk i holds query part i and target part i, either may be empty), so rows per chunk = the smaller chunk."""
    batch, workers = config.train.batch, config.resources.num_workers
    if batch.global_ % workers:
        raise ValueError(f"train.batch.global: {batch.global_} rows do not split over {workers} workers "
                         "(resources.num_workers); the global batch is kept whatever the worker count")
    local = batch.global_ // workers
    micro = batch.micro or local
    if local % micro:
        raise ValueError(f"train.batch.micro: {micro} does not divide the {local} rows per worker "
                         f"(train.batch.global {batch.global_} / {workers} workers)")
    chunks = local // micro
    target = batch.micro_target
    if target is not None:
        if local % target:
            raise ValueError(f"train.batch.micro_target: {target} does not divide the {local} rows per worker")
        chunks = max(chunks, local // target)
    return local, chunks
