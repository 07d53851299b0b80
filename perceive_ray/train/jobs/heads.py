"""PACL, PACL+RoPE, SPARC(+RoPE) and LLM-text PACL heads trained on a frozen encoder (PROTOCOLS §5.2-5.5).

Reads top to bottom: the frozen encoder (open_clip CLIP, or LLM2CLIP for ``pacl_llm_text``) stays OUTSIDE the
DeepSpeed module: ``collate`` turns the decoded rows into frozen features under ``no_grad`` (576 x 1024 post-
``ln_post`` patches; the pooled projected text for PACL, the 77 ``ln_final`` token states for SPARC; LLM2Vec vectors
from the precomputed store through LLM2CLIP's frozen adapter for the LLM-text head), so checkpoints hold only the
head and no rank ever partitions or saves the encoder. The DeepSpeed module is the head itself (RoPE, when the kind
has it, is applied to the frozen patch features before the trainable projection). Losses: PACL symmetric InfoNCE at
fixed tau 0.1 over the global batch; SPARC 0.5 x global + 1.0 x local, with the one stored sigma.

Export: ``head.safetensors`` (weights + HeadSpec metadata: kind, RoPE, sigma, pooling) and ``encoder.json`` (the
frozen encoder's model config), the files the head scorers load (``scorer.options.head_weights: train:<run id>``,
``model.source: train:<run id>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perceive_ray.models.clip_features import IMAGENET_MEAN, IMAGENET_STD
from perceive_ray.models.heads.pacl import HeadSpec, PaclHead, save_head
from perceive_ray.models.heads.sparc import SparcHead, SparcOutput
from perceive_ray.train import losses
from perceive_ray.train.jobs.base import DataSpec, ImageTransformSpec, count_parameters
from perceive_ray.training_config import TrainExperimentConfig

HEAD_FILE = "head.safetensors"
ENCODER_FILE = "encoder.json"
LLM2CLIP_IMAGE_SIZE = 336  # LLM2CLIP's ViT-L/14-336 (a tiny LLM2CLIP's size is read from its vision config)


def image_size(config: TrainExperimentConfig) -> tuple[int, int]:
    """The frozen encoder's input size, read without loading weights."""
    if config.model.family == "llm2clip":
        # A tiny LLM2CLIP directory keeps its vision tower's transformers config in vision/config.json.
        vision = Path(config.model.source).expanduser() / "vision" / "config.json"
        size = json.loads(vision.read_text())["image_size"] if vision.is_file() else LLM2CLIP_IMAGE_SIZE
        return int(size), int(size)
    from perceive_ray.train.jobs.clip_finetune import resolve_model_cfg

    size = resolve_model_cfg(config.model)[0]["vision_cfg"].get("image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def data_spec(config: TrainExperimentConfig) -> DataSpec:
    transform = ImageTransformSpec("pacl_train", image_size(config), IMAGENET_MEAN, IMAGENET_STD)
    return DataSpec(transform=transform, pacl_augment=config.data.pacl_augment, caption_turn=config.data.caption_turn)


class HeadModule(nn.Module):
    """The trainable module: the head on precomputed frozen features -> representations of this batch."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if isinstance(self.head, SparcHead):
            out = self.head(batch["patches"], batch["text_states"], batch["text_ids"])
            return {"patch_embed": out.patch_embed, "token_embed": out.token_embed, "grouped": out.grouped,
                    "language_mask": out.language_mask, "weights": out.weights}
        image, text = self.head(batch["patches"], batch["text"])  # (B, E) each, L2-normalised
        return {"image": image, "text": text}


class HeadsJob:
    name = "heads"

    def __init__(self, config: TrainExperimentConfig, *, device: torch.device) -> None:
        self.config = config
        heads = config.train.heads
        self.kind = heads.kind
        rope = heads.kind in ("pacl_rope", "sparc_rope", "pacl_llm_text")
        dtype_model = config.model.model_copy(update={"dtype": "float32"})
        if heads.kind == "pacl_llm_text":
            from perceive_ray.models.llm2clip import load_llm2clip

            self.llm2clip = load_llm2clip(dtype_model, text_embeddings=config.data.text_embeddings, device=device)
            self.encoder = None
            spec = HeadSpec(kind="pacl", vision_dim=self.llm2clip.vision_dim, text_dim=self.llm2clip.projection_dim,
                            embed_dim=heads.embed_dim, rope=True, num_patches=self.llm2clip.num_patches)
        else:
            from perceive_ray.models.clip_features import FrozenClipEncoder, load_encoder

            self.llm2clip = None
            self.encoder = FrozenClipEncoder(load_encoder(dtype_model))
            enc = self.encoder
            sparc = heads.kind.startswith("sparc")
            spec = HeadSpec(kind="sparc" if sparc else "pacl", vision_dim=enc.vision_dim,
                            text_dim=enc.text_width if sparc else enc.text_embed_dim, embed_dim=heads.embed_dim,
                            rope=rope, num_patches=enc.num_patches, sigma=heads.sparc_sigma if sparc else None)
        if spec.kind == "sparc":
            head: nn.Module = SparcHead(spec, dropout=heads.dropout)
        else:
            head = PaclHead(spec, dropout=heads.dropout, pooling=heads.pacl_pooling)
        self.module = HeadModule(head.to(device).train())

    def parameter_groups(self) -> list[dict[str, Any]]:
        # §5.2: Adam, no weight decay anywhere in the head.
        return [{"params": [p for p in self.module.parameters() if p.requires_grad],
                 "weight_decay": self.config.train.optim.weight_decay}]

    @torch.no_grad()
    def collate(self, rows: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Rows -> frozen features: patches (B, N, Dv) and pooled text (B, Dt) or token states (B, L, W) + ids."""
        pixels = torch.as_tensor(rows["pixels"])
        captions = [str(c) for c in rows["caption"]]
        if self.llm2clip is not None:
            from perceive_ray.models.llm2clip import encode_llm_checked

            bundle = self.llm2clip
            patches = bundle.vision_patches(pixels).clone()
            text = bundle.adapt_text(encode_llm_checked(bundle, captions, len(captions))).clone()
            return {"patches": patches.to(device), "text": text.to(device)}
        enc = self.encoder
        # The frozen encoder runs in inference mode; clones are ordinary tensors autograd may save.
        patches = enc.patch_tokens(pixels).clone()  # (B, N, Dv) fp32
        ids, pooled, states = (t.clone() for t in enc.text_features(captions))
        if self.kind.startswith("sparc"):
            return {"patches": patches.to(device), "text_states": states.to(device), "text_ids": ids.to(device)}
        return {"patches": patches.to(device), "text": pooled.to(device)}

    def compute_loss(self, reps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_cfg = self.config.train.loss
        if "grouped" in reps:
            out = SparcOutput(**reps)
            terms = losses.compute_sparc_loss_distributed(
                out, temperature=loss_cfg.temperature, global_weight=loss_cfg.sparc_global_weight,
                local_weight=loss_cfg.sparc_local_weight, mask_padding=loss_cfg.sparc_mask_padding)
            return terms.total, {"global_loss": terms.global_loss.detach(), "local_loss": terms.local_loss.detach()}
        return losses.compute_pacl_loss(reps["image"], reps["text"], temperature=loss_cfg.temperature), {}

    def after_step(self, module: nn.Module, gathered: Any = None) -> None:
        pass

    def export(self, module: nn.Module, out_dir: Path) -> dict[str, Any]:
        """``head.safetensors`` (+ HeadSpec metadata, sigma and pooling included) and ``encoder.json``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        head = module.head
        cpu = type(head)(head.spec) if isinstance(head, SparcHead) else PaclHead(head.spec, pooling=head.pooling)
        cpu.load_state_dict({k: v.detach().float().cpu() for k, v in head.state_dict().items()})
        save_head(cpu, out_dir / HEAD_FILE)
        encoder = self.config.model.model_dump(mode="json")
        (out_dir / ENCODER_FILE).write_text(json.dumps(encoder, indent=2) + "\n", encoding="utf-8")
        return {"layout": "head file + frozen encoder reference", "head_weights": str(out_dir / HEAD_FILE),
                "scorer": self.kind, "embed_dim": head.spec.embed_dim, "files": [HEAD_FILE, ENCODER_FILE]}

    def describe(self) -> dict[str, Any]:
        spec = self.module.head.spec
        return {"job": self.name, "head": self.kind, "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
                **count_parameters(self.module)}


def build_job(config: TrainExperimentConfig, *, device: torch.device) -> HeadsJob:
    return HeadsJob(config, device=device)
