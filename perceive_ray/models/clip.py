"""CLIP-family loader: open_clip models by name + pretrained tag, or a local open_clip directory, plus a tiny one.

One code path loads the paper's ``ViT-L-14-336`` / ``openai`` (and SigLIP / EVA-CLIP names such as ``EVA01-g-14`` /
``laion400m_s11b_b41k``) on a real machine and the tiny random-init model the tests write with ``save_tiny_clip``:
``ModelConfig.source`` is either an open_clip model name, an ``hf-hub:org/repo`` id, or a local directory holding
``open_clip_config.json`` + ``open_clip_model.safetensors`` (open_clip's ``local-dir:`` schema).

The bundle carries both image transforms of PROTOCOLS §3.1: open_clip's deterministic eval transform (``val``) and
the reference's RandomResizedCrop(scale 0.9-1.0) train transform as a *seeded* callable (``train_compat``) that draws
from an explicit ``torch.Generator`` instead of torch's global RNG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from perceive_ray.config import ConfigError, ModelConfig

DEFAULT_NAME = "ViT-L-14-336"
DEFAULT_PRETRAINED = "openai"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
# The reference's train transform (open_clip AugmentationCfg defaults): scale (0.9, 1.0), torchvision's ratio.
COMPAT_SCALE = (0.9, 1.0)
COMPAT_RATIO = (3.0 / 4.0, 4.0 / 3.0)

_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class OpenClipArgs:
    """What ``load_clip`` passes to ``open_clip.create_model``; resolved without touching the network."""

    model_name: str
    pretrained: str | None
    precision: str
    force_quick_gelu: bool


@dataclass(frozen=True)
class ClipBundle:
    """A loaded CLIP model in eval mode with its tokenizer and both image transforms of PROTOCOLS §3.1."""

    model: torch.nn.Module
    preprocess_val: Callable[[Image.Image], torch.Tensor]
    preprocess_train_compat: SeededRandomResizedCrop
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    name: str
    pretrained: str | None
    context_length: int
    embed_dim: int
    image_size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: torch.dtype
    device: torch.device


class SeededRandomResizedCrop:
    """torchvision ``RandomResizedCrop`` + ToTensor + Normalize, drawing from a caller-supplied generator.

    ``get_params`` repeats torchvision 0.2x's algorithm call for call (10 tries, log-uniform aspect ratio, centre
    fallback), so with a generator seeded like torch's global RNG it picks the same crop as open_clip's train
    transform; resizing is torchvision's own ``resized_crop`` (PIL bicubic, antialiased).
    """

    def __init__(self, size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float], *,
                 scale: tuple[float, float] = COMPAT_SCALE, ratio: tuple[float, float] = COMPAT_RATIO) -> None:
        from torchvision.transforms import InterpolationMode, Normalize

        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.scale = scale
        self.ratio = ratio
        self.interpolation = InterpolationMode.BICUBIC
        self.normalize = Normalize(mean=list(mean), std=list(std))

    def get_params(self, image: Image.Image, generator: torch.Generator) -> tuple[int, int, int, int]:
        from perceive_ray.data.llava_data import random_resized_crop_params  # the one seeded implementation

        width, height = image.size
        return random_resized_crop_params(width, height, self.scale, self.ratio, generator)

    def __call__(self, image: Image.Image, generator: torch.Generator | int) -> torch.Tensor:
        """(3, H, W) float tensor for one RGB PIL image; ``generator`` may be a seed."""
        import torchvision.transforms.functional as F

        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(int(generator))
        image = image.convert("RGB")
        i, j, h, w = self.get_params(image, generator)
        crop = F.resized_crop(image, i, j, h, w, list(self.size), self.interpolation, antialias=True)
        return self.normalize(F.to_tensor(crop))


def resolve_open_clip_args(model: ModelConfig) -> OpenClipArgs:
    """Map a ModelConfig onto open_clip's (model_name, pretrained) convention; config errors name ``model.*``.

    - a local directory -> ``local-dir:<abs path>`` (open_clip ignores ``pretrained`` there, so it must be unset);
    - ``hf-hub:org/repo`` -> passed through;
    - a built-in open_clip name -> that name + ``pretrained`` (default ``openai``), which must be a known tag for
      the name or an existing checkpoint file. Tags trained with QuickGELU (all OpenAI ones) force QuickGELU: open_clip
      3.x only warns on the mismatch, whereas the reference's OpenCLIP 2.32 loaded ``openai`` through its
      QuickGELU OpenAI path.
    """
    import open_clip

    if model.dtype not in _PRECISION:
        raise ConfigError(f"model.dtype: {model.dtype!r} is not supported for CLIP; use one of {sorted(_PRECISION)}")
    if model.revision is not None:
        raise ConfigError("model.revision: open_clip cannot pin a revision; use a local directory as model.source")
    precision = _PRECISION[model.dtype]
    source = model.source.strip()
    if source.startswith(LOCAL_DIR_PREFIX):
        source = source[len(LOCAL_DIR_PREFIX):]
    if source.startswith(HF_HUB_PREFIX):
        if model.pretrained is not None:
            raise ConfigError(f"model.pretrained: must be unset for {source!r} (the hub repo holds the weights)")
        return OpenClipArgs(source, None, precision, False)

    path = Path(source).expanduser()
    if path.is_dir():
        check_local_dir(path)
        if model.pretrained is not None:
            raise ConfigError(f"model.pretrained: must be unset when model.source is a local directory ({path})")
        return OpenClipArgs(LOCAL_DIR_PREFIX + str(path.resolve()), None, precision, False)

    name = source.replace("/", "-")  # open_clip accepts the old 'ViT-L/14' spelling the same way
    if name not in open_clip.list_models():
        if path.exists() or "/" in source or source.startswith((".", "~")):
            raise ConfigError(f"model.source: {source!r} is not a directory holding {CONFIG_FILE} + weights")
        raise ConfigError(
            f"model.source: {source!r} is neither a local directory nor an open_clip model name "
            f"(e.g. {DEFAULT_NAME!r}; see open_clip.list_models())"
        )
    pretrained = model.pretrained or DEFAULT_PRETRAINED
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg and not Path(pretrained).expanduser().is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(
            f"model.pretrained: {pretrained!r} is neither a pretrained tag of {name!r} nor a checkpoint file; "
            f"known tags: {', '.join(tags) or '(none)'}"
        )
    if not tag_cfg:
        pretrained = str(Path(pretrained).expanduser())
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and not open_clip.get_model_config(name).get("quick_gelu")
    return OpenClipArgs(name, pretrained, precision, quick_gelu)


def check_local_dir(path: Path) -> None:
    """Fail early, naming the file, if ``path`` is not an open_clip local directory with a model config."""
    config = path / CONFIG_FILE
    if not config.is_file():
        raise ConfigError(f"model.source: {path} has no {CONFIG_FILE} (expected an open_clip local directory)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model.source: {config} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "model_cfg" not in data:
        raise ConfigError(f"model.source: {config} lacks the 'model_cfg' key")
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
        raise ConfigError(f"model.source: {path} holds no weights ({WEIGHTS_FILE} expected)")


def load_clip(model: ModelConfig, *, device: str | torch.device | None = None) -> ClipBundle:
    """Load an open_clip model (eval mode, no grad), its tokenizer and the val / train_compat transforms."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    args = resolve_open_clip_args(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    clip = open_clip.create_model(
        args.model_name,
        pretrained=args.pretrained,
        precision=args.precision,
        device=device,
        force_quick_gelu=args.force_quick_gelu,
        require_pretrained=True,  # never score with silently random weights
        weights_only=True,
    )
    clip.eval().requires_grad_(False)
    preprocess = PreprocessCfg(**clip.visual.preprocess_cfg)
    tokenizer = open_clip.get_tokenizer(args.model_name)
    embed_dim = _embed_dim(clip, open_clip.get_model_config(args.model_name))
    return ClipBundle(
        model=clip,
        preprocess_val=image_transform_v2(preprocess, is_train=False),
        preprocess_train_compat=SeededRandomResizedCrop(preprocess.size, preprocess.mean, preprocess.std),
        tokenizer=tokenizer,
        name=args.model_name,
        pretrained=args.pretrained,
        context_length=int(getattr(tokenizer, "context_length", None) or clip.context_length),
        embed_dim=embed_dim,
        image_size=preprocess.size,
        mean=tuple(preprocess.mean),
        std=tuple(preprocess.std),
        dtype=_TORCH_DTYPE[model.dtype],
        device=device,
    )


def _embed_dim(clip: torch.nn.Module, model_cfg: dict[str, Any] | None) -> int:
    if model_cfg and "embed_dim" in model_cfg:
        return int(model_cfg["embed_dim"])
    projection = getattr(clip, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return int(projection.shape[-1])
    raise ValueError("cannot determine the CLIP embedding size")


# The tests' tiny CLIP: ViT width 64, 2 layers, 32-wide heads, patch 8; text width 32, 2 heads, 2 layers.
TINY_CLIP_SIZES = {"patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "text_width": 32, "text_layers": 2,
                   "text_heads": 2}


def tiny_clip_config(*, image_size: int = 32, embed_dim: int = 32) -> dict[str, Any]:
    """A random-init-sized CLIP config (ViT width 64, 2 layers, patch 8; text width 32, 2 layers, context 77).

    It keeps the real vocabulary (49,408 tokens of open_clip's bundled BPE) so the real tokenizer drives it.
    """
    from perceive_ray.models.tiny import clip_model_config

    return clip_model_config(image_size=image_size, embed_dim=embed_dim, **TINY_CLIP_SIZES)


def save_tiny_clip(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Write a random-init tiny CLIP as an open_clip local directory (config + safetensors) and return it."""
    from perceive_ray.models.tiny import save_clip

    return save_clip(path, seed=seed, image_size=image_size, embed_dim=32, **TINY_CLIP_SIZES)
def save_tiny_siglip(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """The tiny CLIP with SigLIP's learned logit bias (init -10) and logit scale (init ln 10): a model the SigLIP
    loss can train (the sigmoid loss needs ``logit_bias``), with the built-in BPE tokenizer (no hub download)."""
    from perceive_ray.models.tiny import save_clip_config

    cfg = tiny_clip_config(image_size=image_size)
    cfg.update({"init_logit_bias": -10.0, "init_logit_scale": math.log(10.0)})
    return save_clip_config(path, cfg, seed=seed)


