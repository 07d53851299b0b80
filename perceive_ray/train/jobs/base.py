"""What every training job is: pure setup, ``collate`` + ``forward`` + ``compute_loss``, and an export (no Ray).

The per-worker training function (``run/training.py``) is the only code that knows Ray and DeepSpeed's engine; a
job only builds modules and computes. One step of a job:

    batch = job.collate(rows)                 # decoded rows of this worker -> tensors (+ frozen features)
    reps = engine(batch)                      # job.module.forward: the trainable forward pass -> representations
    loss, logs = job.compute_loss(reps)       # global-batch loss (features gathered across workers inside)

``forward_loss(job, model, batch)`` is the composition. Representations are a dict of tensors whose first dimension
is the rows of the batch, plus 0-dim tensors (e.g. CLIP's ``logit_scale``): that shape is what lets GradCache
(``train/gradcache.py``) split a step into chunks without knowing the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class ImageTransformSpec:
    """How training images are decoded (in Ray Data CPU tasks, before any worker sees them)."""

    kind: str  # "clip_train" (open_clip's RandomResizedCrop train transform) | "pacl_train" (§5.2)
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ConversationImageSpec:
    """LLaVA-style image decoding: the checkpoint's CLIP image processor (PIL backend) after an optional step
    (``pad``: expand to square with the processor's mean colour; ``resize``: to the crop size, aspect-distorting)."""

    processor_source: str  # a directory or hub id holding the CLIP preprocessor_config.json
    preprocess: str  # "processor" | "pad" | "resize"
    size: tuple[int, int]  # (H, W) of pixel_values


@dataclass(frozen=True)
class DataSpec:
    """What a job needs from the data pipeline, known on the driver without loading any weights.

    ``kind``: ``captions`` (CLIP-style: one caption turn, negatives, a seeded train transform) or ``conversations``
    (LLaVA / VLM2Vec: every turn goes to the worker, images through the checkpoint's processor; text-only rows kept
    when ``keep_text_only``). ``order``: ``random`` (the counter-based epoch order) or ``modality_length``
    (LLaVA's group_by_modality_length mega-batches)."""

    transform: ImageTransformSpec | None
    hard_negatives: str = "none"  # "leftright": a negative caption per row (empty string when none applies)
    pacl_augment: bool = False
    caption_turn: str = "random"
    kind: str = "captions"
    images: ConversationImageSpec | None = None
    keep_text_only: bool = False
    order: str = "random"
    extra: dict[str, Any] = field(default_factory=dict)


class Job(Protocol):
    name: str
    module: nn.Module  # what DeepSpeed wraps: every trainable parameter (frozen parts may live here too)

    def parameter_groups(self) -> list[dict[str, Any]]: ...

    def collate(self, rows: dict[str, Any], device: torch.device) -> dict[str, Any]: ...

    def compute_loss(self, reps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def after_step(self, module: nn.Module) -> None: ...

    def export(self, module: nn.Module, out_dir: Path) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...


def forward_loss(job: Job, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The job's loss on one batch: ``model`` is ``job.module`` or the DeepSpeed engine wrapping it."""
    return job.compute_loss(model(batch))


def split_weight_decay(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: decayed, and exempt (ndim < 2, norms, biases, ``logit_scale``/bias).

    The exclusion rule of open_clip's launcher, re-implemented: gains and biases of any layer, embeddings of rank
    < 2 and the learned temperature get no weight decay.
    """
    decay, exempt = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (exempt if no_decay else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the job has no trainable parameters")
    return groups


def count_parameters(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}
