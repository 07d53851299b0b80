"""CLIP / SigLIP / EVA-CLIP fine-tuning on LLaVA-1.5 data, +- NegCLIP left/right negatives (PROTOCOLS §5.1).

Reads top to bottom: the open_clip model is loaded by the project's one CLIP loader (any open_clip name + tag, or
a local open_clip directory: the tests' tiny model), put in train mode with the vision tower locked or not; a batch
is the worker's rows: images from the seeded open_clip train transform (decoded in Ray Data tasks), the B captions
followed by the H hard negatives of this worker's rows (H varies per worker and step); the forward runs the whole
``CLIP.forward`` (so ZeRO-3 gathers every parameter, ``logit_scale`` included); the loss is CLIP InfoNCE, NegCLIP
(negatives as extra image->text columns, ignored text->image rows) or SigLIP with negatives, over the global batch.
After each optimiser step ``logit_scale`` is clamped to ln(100), as open_clip's launcher does.

Export: an open_clip local directory (``open_clip_config.json`` + ``open_clip_model.safetensors``), the layout
``models/clip.py::load_clip`` reads, so ``model.source: train:<run id>`` evaluates the fine-tuned model.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perceive_ray.config import ModelConfig
from perceive_ray.train import losses
from perceive_ray.train.jobs.base import DataSpec, ImageTransformSpec, count_parameters, split_weight_decay
from perceive_ray.training_config import TrainExperimentConfig, resolve_hard_negatives, resolve_loss_kind

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"


def resolve_model_cfg(model: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(open_clip model_cfg, preprocess_cfg) of the starting model, read without loading any weights."""
    import open_clip

    from perceive_ray.models.clip import resolve_open_clip_args

    args = resolve_open_clip_args(model)
    if args.model_name.startswith("local-dir:"):
        data = json.loads((Path(args.model_name.removeprefix("local-dir:")) / CONFIG_FILE).read_text("utf-8"))
        model_cfg, preprocess = dict(data["model_cfg"]), dict(data.get("preprocess_cfg") or {})
    else:
        model_cfg = dict(open_clip.get_model_config(args.model_name))
        tag = open_clip.get_pretrained_cfg(args.model_name, args.pretrained) if args.pretrained else {}
        preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
        if args.force_quick_gelu:
            model_cfg["quick_gelu"] = True
    size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess.setdefault("size", size)
    preprocess.setdefault("mean", open_clip.OPENAI_DATASET_MEAN)
    preprocess.setdefault("std", open_clip.OPENAI_DATASET_STD)
    return model_cfg, preprocess


def data_spec(config: TrainExperimentConfig) -> DataSpec:
    _, pre = resolve_model_cfg(config.model)
    size = pre["size"] if isinstance(pre["size"], (list, tuple)) else (pre["size"], pre["size"])
    transform = ImageTransformSpec("clip_train", (int(size[0]), int(size[1])), tuple(pre["mean"]), tuple(pre["std"]))
    return DataSpec(transform=transform, hard_negatives=resolve_hard_negatives(config),
                    caption_turn=config.data.caption_turn)


class ClipContrastive(nn.Module):
    """The trainable module: one ``CLIP.forward`` over the images and [captions; negatives]."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.clip(batch["pixels"], batch["text_ids"])
        if not isinstance(out, dict):  # open_clip returns a tuple unless output_dict is set
            keys = ("image_features", "text_features", "logit_scale", "logit_bias")
            out = dict(zip(keys, out, strict=False))
        texts = out["text_features"]  # (B + H, D), L2-normalised by open_clip
        n_pos = batch["pixels"].shape[0]
        reps = {"image": out["image_features"], "text_pos": texts[:n_pos], "text_neg": texts[n_pos:],
                "logit_scale": out["logit_scale"].reshape(())}
        if out.get("logit_bias") is not None:
            reps["logit_bias"] = out["logit_bias"].reshape(())
        return reps


class ClipFinetuneJob:
    name = "clip_finetune"

    def __init__(self, config: TrainExperimentConfig, *, device: torch.device) -> None:
        from perceive_ray.models.clip import load_clip

        self.config = config
        self.loss_kind = resolve_loss_kind(config)
        self.hard_negatives = resolve_hard_negatives(config)
        bundle = load_clip(config.model.model_copy(update={"dtype": "float32"}), device=device)
        self.bundle = bundle
        clip = bundle.model
        clip.requires_grad_(True).train()
        opts = config.train.clip
        if opts.lock_image:
            clip.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
            clip.visual.requires_grad_(False)  # the whole tower, whatever the tower's own lock() covers
        if opts.lock_text:
            clip.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        if opts.grad_checkpointing:
            clip.set_grad_checkpointing(True)
        if self.loss_kind == "siglip" and getattr(clip, "logit_bias", None) is None:
            from perceive_ray.config import ConfigError

            raise ConfigError(f"train.loss.kind: siglip needs a model with a learned logit_bias; "
                              f"{bundle.name!r} has none (use a SigLIP open_clip model)")
        self.module = ClipContrastive(clip)
        self.model_cfg, self.preprocess_cfg = resolve_model_cfg(config.model)

    def parameter_groups(self) -> list[dict[str, Any]]:
        return split_weight_decay(self.module, self.config.train.optim.weight_decay)

    def collate(self, rows: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Rows -> pixels (B, 3, S, S) and token ids (B + H, L): captions first, then this worker's negatives."""
        captions = [str(c) for c in rows["caption"]]
        negatives = [str(n) for n in rows["negative"] if n] if self.hard_negatives != "none" else []
        ids = self.bundle.tokenizer(captions + negatives)
        pixels = torch.as_tensor(rows["pixels"])
        return {"pixels": pixels.to(device), "text_ids": ids.to(device)}

    def compute_loss(self, reps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scale = reps["logit_scale"]
        if self.loss_kind == "clip":
            loss = losses.compute_clip_loss(reps["image"], reps["text_pos"], scale)
        elif self.loss_kind == "negclip":
            loss = losses.compute_negclip_loss(reps["image"], reps["text_pos"], reps["text_neg"], scale)
        else:
            loss = losses.compute_siglip_loss(reps["image"], reps["text_pos"], reps["text_neg"], scale,
                                              reps["logit_bias"])
        return loss, {"logit_scale": scale.detach(), "negatives_local": torch.tensor(float(reps["text_neg"].shape[0]))}

    def after_step(self, module: nn.Module, gathered: Any = None) -> None:
        """logit_scale.clamp_(0, ln 100) (under ZeRO-3 inside ``gathered([param])`` so the full value is edited)."""
        param = module.clip.logit_scale
        with (gathered([param]) if gathered is not None else nullcontext()), torch.no_grad():
            param.clamp_(0, math.log(self.config.train.clip.clamp_logit_scale))

    def export(self, module: nn.Module, out_dir: Path) -> dict[str, Any]:
        """An open_clip local directory: config + full weights (fp32 safetensors). Call with full parameters."""
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in module.clip.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_FILE))
        preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess_cfg.items()}
        payload = {"model_cfg": self.model_cfg, "preprocess_cfg": preprocess}
        (out_dir / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        return {"layout": "open_clip local directory", "model_source": str(out_dir), "files": [CONFIG_FILE,
                                                                                              WEIGHTS_FILE]}

    def describe(self) -> dict[str, Any]:
        return {"job": self.name, "model": self.bundle.name, "pretrained": self.bundle.pretrained,
                "loss": self.loss_kind, "hard_negatives": self.hard_negatives,
                "lock_image": self.config.train.clip.lock_image, "lock_text": self.config.train.clip.lock_text,
                **count_parameters(self.module)}


def build_job(config: TrainExperimentConfig, *, device: torch.device) -> ClipFinetuneJob:
    return ClipFinetuneJob(config, device=device)
