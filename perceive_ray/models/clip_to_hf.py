"""An open_clip ViT image tower as a transformers ``CLIPVisionModel`` (+ a matching ``CLIPImageProcessorPil``).

A LLaVA built here takes a transformers CLIP vision model as its tower. A CLIP trained with open_clip (a local
directory holding ``open_clip_config.json`` + ``open_clip_model.safetensors``, as ``perceive_ray.models.tiny.save_clip``
and the CLIP fine-tuning job's export write it) is converted tensor by tensor, without approximation:

- ``conv1`` -> ``embeddings.patch_embedding`` (both bias-free), ``class_embedding`` -> ``embeddings.class_embedding``,
  ``positional_embedding`` -> ``embeddings.position_embedding.weight``, ``ln_pre`` -> ``pre_layrnorm`` (HF's spelling);
- ``transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`` ->
  ``encoder.layers.i.{layer_norm1, self_attn.{q,k,v}_proj (in_proj split in three), self_attn.out_proj,
  layer_norm2, mlp.fc1, mlp.fc2}``;
- ``ln_post`` -> ``post_layernorm``: HF's ``pooler_output`` is open_clip's pooled token before ``proj``.

``visual.proj`` has no place in ``CLIPVisionModel`` and is dropped (``CLIPVisionModelWithProjection`` would hold it
as ``visual_projection.weight = proj.T``); LLaVA reads hidden states, never the projection.

Only configurations the HF model computes identically are accepted: a plain ViT (no timm / ModifiedResNet tower),
CLS-token pooling with ``ln_post`` before pooling, ``ln_pre`` present, learnable position embeddings, no LayerScale,
the default attention block, plain (Quick)GELU. Anything else raises ``ValueError`` naming the file and the key.
``patch_dropout`` is accepted: open_clip applies it in training mode only, so the eval computation is unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "open_clip_config.json"  # = perceive_ray.models.clip.CONFIG_FILE (kept import-light here)
WEIGHTS_FILE = "open_clip_model.safetensors"
LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm's default, which open_clip's LayerNorm keeps

# vision_cfg options that change the tower's computation, with the value that does not.
_MUST_BE = {
    "timm_model_name": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "pos_embed_type": "learnable",  # sin_cos_2d is fixed in open_clip; HF's position embedding is trainable
    "ls_init_value": None,
    "block_type": (None, "default"),
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": (None, {}),
}


def is_open_clip_dir(path: str | Path) -> bool:
    """True for a directory holding ``open_clip_config.json`` (an open_clip local directory)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _read_config(open_clip_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    config_path = Path(open_clip_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{config_path}: not found (expected an open_clip local directory)")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ValueError(f"{config_path}: lacks the 'model_cfg' object")
    return config_path, data


def _square(value: Any, config_path: Path, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{config_path}: {key}={value!r} is not square; CLIPVisionConfig holds one size")
        value = value[0]
    return int(value)


def _vision_cfg(config_path: Path, model_cfg: dict[str, Any]) -> Any:
    """open_clip's ``CLIPVisionCfg`` (its defaults filled in), checked for what ``CLIPVisionModel`` can represent."""
    from open_clip.model import CLIPVisionCfg

    raw = model_cfg.get("vision_cfg", {})
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: model_cfg.vision_cfg is not an object")
    known = {field.name for field in dataclasses.fields(CLIPVisionCfg)}
    for key in raw:
        if key not in known:
            raise ValueError(f"{config_path}: model_cfg.vision_cfg.{key} is not an open_clip CLIPVisionCfg option")
    cfg = CLIPVisionCfg(**raw)
    if isinstance(cfg.layers, (list, tuple)):
        raise ValueError(f"{config_path}: model_cfg.vision_cfg.layers={cfg.layers!r} is a ModifiedResNet tower, "
                         "not a ViT")
    for key, allowed in _MUST_BE.items():
        value = getattr(cfg, key)
        options = allowed if isinstance(allowed, tuple) else (allowed,)
        if value not in options:
            raise ValueError(f"{config_path}: model_cfg.vision_cfg.{key}={value!r} is not supported by the "
                             f"transformers CLIPVisionModel conversion (needs {' or '.join(map(repr, options))})")
    if cfg.norm_kwargs and set(cfg.norm_kwargs) != {"eps"}:
        raise ValueError(f"{config_path}: model_cfg.vision_cfg.norm_kwargs={cfg.norm_kwargs!r}: only 'eps' is "
                         "supported")
    if cfg.width % cfg.head_width:
        raise ValueError(f"{config_path}: model_cfg.vision_cfg.head_width={cfg.head_width} does not divide "
                         f"width {cfg.width}")
    mlp = cfg.width * cfg.mlp_ratio
    if mlp != int(mlp):
        raise ValueError(f"{config_path}: model_cfg.vision_cfg.mlp_ratio={cfg.mlp_ratio} gives a fractional MLP "
                         f"width ({mlp})")
    return cfg


def hf_vision_config(open_clip_dir: str | Path) -> Any:
    """The ``transformers.CLIPVisionConfig`` of an open_clip directory's ViT image tower (config file only)."""
    from transformers import CLIPVisionConfig

    config_path, data = _read_config(open_clip_dir)
    model_cfg = data["model_cfg"]
    cfg = _vision_cfg(config_path, model_cfg)
    if "embed_dim" not in model_cfg:
        raise ValueError(f"{config_path}: model_cfg.embed_dim is missing")
    image_size = _square(cfg.image_size, config_path, "model_cfg.vision_cfg.image_size")
    patch_size = _square(cfg.patch_size, config_path, "model_cfg.vision_cfg.patch_size")
    eps = float((cfg.norm_kwargs or {}).get("eps", LAYER_NORM_EPS))
    return CLIPVisionConfig(
        hidden_size=int(cfg.width),
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        num_hidden_layers=int(cfg.layers),
        num_attention_heads=int(cfg.width // cfg.head_width),
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        layer_norm_eps=eps,
        projection_dim=int(model_cfg["embed_dim"]),
        num_channels=3,
    )


def convert_open_clip_vision(open_clip_dir: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(CLIPVisionConfig, state dict) for ``transformers.CLIPVisionModel`` from an open_clip directory.

    The keys are ``CLIPVisionModel.state_dict()``'s (transformers 5: ``embeddings.*``, ``encoder.*``, ...); every converted tensor is used and nothing is missing
    (``CLIPVisionModel.load_state_dict(..., strict=True)`` accepts it). ``visual.proj`` is not part of
    ``CLIPVisionModel`` and is left out (``CLIPVisionModelWithProjection.visual_projection.weight`` would be its
    transpose). Weights are read with safetensors only."""
    from safetensors import safe_open

    config = hf_vision_config(open_clip_dir)
    weights_path = Path(open_clip_dir) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: not found (the open_clip weights must be safetensors)")
    with safe_open(str(weights_path), framework="pt") as handle:
        keys = [key for key in handle.keys() if key.startswith("visual.")]
        visual = {key.removeprefix("visual."): handle.get_tensor(key) for key in keys}
    width = config.hidden_size
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str) -> torch.Tensor:
        if src not in visual:
            raise ValueError(f"{weights_path}: missing visual.{src}")
        used.add(src)
        return visual[src]

    def copy(src: str, dst: str) -> None:
        out[dst] = take(src)

    def norm(src: str, dst: str) -> None:
        copy(f"{src}.weight", f"{dst}.weight")
        copy(f"{src}.bias", f"{dst}.bias")

    copy("conv1.weight", "embeddings.patch_embedding.weight")
    copy("class_embedding", "embeddings.class_embedding")
    copy("positional_embedding", "embeddings.position_embedding.weight")
    norm("ln_pre", "pre_layrnorm")
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        norm(f"{src}.ln_1", f"{dst}.layer_norm1")
        in_weight, in_bias = take(f"{src}.attn.in_proj_weight"), take(f"{src}.attn.in_proj_bias")
        if in_weight.shape != (3 * width, width) or in_bias.shape != (3 * width,):
            raise ValueError(f"{weights_path}: visual.{src}.attn.in_proj has shape {tuple(in_weight.shape)}, "
                             f"expected {(3 * width, width)}")
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), in_weight.chunk(3), in_bias.chunk(3),
                                      strict=True):
            out[f"{dst}.self_attn.{name}.weight"] = weight.contiguous()
            out[f"{dst}.self_attn.{name}.bias"] = bias.contiguous()
        norm(f"{src}.attn.out_proj", f"{dst}.self_attn.out_proj")
        norm(f"{src}.ln_2", f"{dst}.layer_norm2")
        norm(f"{src}.mlp.c_fc", f"{dst}.mlp.fc1")
        norm(f"{src}.mlp.c_proj", f"{dst}.mlp.fc2")
    norm("ln_post", "post_layernorm")
    left = sorted(set(visual) - used - {"proj"})
    if left:
        raise ValueError(f"{weights_path}: open_clip tensors the conversion would drop: "
                         f"{', '.join('visual.' + key for key in left[:5])}")
    return config, out


def load_hf_vision_model(open_clip_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """A ``CLIPVisionModel`` (eval mode) holding the converted open_clip weights, loaded with ``strict=True``."""
    from transformers import CLIPVisionModel
    from transformers.initialization import no_init_weights

    config, state = convert_open_clip_vision(open_clip_dir)
    with no_init_weights():  # every weight is loaded next
        model = CLIPVisionModel(config)
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def hf_image_processor(open_clip_dir: str | Path) -> Any:
    """A ``CLIPImageProcessorPil`` equal to open_clip's eval transform for the directory's ``preprocess_cfg``.

    open_clip (``image_transform_v2(..., is_train=False)``, what ``perceive_ray.models.clip.load_clip`` scores with):
    resize the shortest edge to the tower's image size (PIL bicubic, or bilinear), centre crop, /255, normalise with
    the config's mean / std (OpenAI CLIP's when absent). Only ``resize_mode: shortest`` maps onto the HF processor."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    config_path, data = _read_config(open_clip_dir)
    image_size = hf_vision_config(open_clip_dir).image_size  # open_clip sizes the transform from the tower too
    preprocess = data.get("preprocess_cfg") or {}
    resize_mode = preprocess.get("resize_mode") or "shortest"
    if resize_mode != "shortest":
        raise ValueError(f"{config_path}: preprocess_cfg.resize_mode={resize_mode!r}: only 'shortest' maps onto "
                         "CLIPImageProcessor")
    interpolation = preprocess.get("interpolation") or "bicubic"
    if interpolation not in ("bicubic", "bilinear", "random"):  # open_clip evaluates 'random' with bicubic
        raise ValueError(f"{config_path}: preprocess_cfg.interpolation={interpolation!r} is not an open_clip mode")
    mode = preprocess.get("mode") or "RGB"
    if mode != "RGB":
        raise ValueError(f"{config_path}: preprocess_cfg.mode={mode!r}: only RGB is supported")

    def triple(key: str, default: tuple[float, ...]) -> list[float]:
        value = preprocess.get(key) or default
        value = list(value) if isinstance(value, (list, tuple)) else [value] * 3
        if len(value) != 3:
            raise ValueError(f"{config_path}: preprocess_cfg.{key}={value!r} needs 3 channels")
        return [float(x) for x in value]

    resample = PILImageResampling.BILINEAR if interpolation == "bilinear" else PILImageResampling.BICUBIC
    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": image_size}, resample=resample,
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=triple("mean", OPENAI_DATASET_MEAN), image_std=triple("std", OPENAI_DATASET_STD),
        do_convert_rgb=True)


def save_hf_vision_tower(open_clip_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the converted ``CLIPVisionModel`` (safetensors) and its image processor to ``out_dir``; return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_hf_vision_model(open_clip_dir).save_pretrained(out_dir, safe_serialization=True)
    hf_image_processor(open_clip_dir).save_pretrained(out_dir)
    return out_dir
