"""Tiny head bundles for smoke runs: a tiny CLIP dir plus a random-init head sized for it, as a real run has them.

Layout: ``<path>/clip/`` (open_clip local dir, see ``models.clip.save_tiny_clip``) and ``<path>/head.safetensors``
(HeadSpec in the metadata, like trained heads). Experiments point ``model.source`` at the first and
``scorer.options.head_weights`` at the second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from perceive_ray.models.clip import save_tiny_clip, tiny_clip_config
from perceive_ray.models.heads.pacl import HeadSpec, PaclHead, save_head
from perceive_ray.models.heads.sparc import SparcHead

TINY_HEAD_EMBED = 16


def save_tiny_head_bundle(path: str | Path, *, kind: str, rope: bool, seed: int = 0) -> Path:
    path = Path(path)
    save_tiny_clip(path / "clip", seed=seed)
    cfg = tiny_clip_config()
    vision = cfg["vision_cfg"]
    grid = vision["image_size"] // vision["patch_size"]
    # PACL reads the projected pooled text (embed_dim); SPARC the ln_final token states (text width).
    text_dim = cfg["embed_dim"] if kind == "pacl" else cfg["text_cfg"]["width"]
    spec = HeadSpec(kind=kind, vision_dim=vision["width"], text_dim=text_dim, embed_dim=TINY_HEAD_EMBED, rope=rope,
                    num_patches=grid * grid, sigma=1.0 / (grid * grid) if kind == "sparc" else None,
                    pooling="uniform" if kind == "pacl" else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = PaclHead(spec) if kind == "pacl" else SparcHead(spec)
    save_head(head.eval(), path / "head.safetensors")
    return path


def save_tiny_pacl(path: str | Path, *, seed: int = 0) -> Path:
    """Tiny CLIP + random PACL head (patch tokens, uniform pooling)."""
    return save_tiny_head_bundle(path, kind="pacl", rope=False, seed=seed)


def save_tiny_pacl_rope(path: str | Path, *, seed: int = 0) -> Path:
    """Tiny CLIP + random PACL head with RoPE on the frozen patch features."""
    return save_tiny_head_bundle(path, kind="pacl", rope=True, seed=seed)


def save_tiny_sparc_rope(path: str | Path, *, seed: int = 0) -> Path:
    """Tiny CLIP + random SPARC head with RoPE (multiple text tokens), sigma = 1/num_patches."""
    return save_tiny_head_bundle(path, kind="sparc", rope=True, seed=seed)


def save_tiny_pacl_llm_text(path: str | Path, *, seed: int = 0) -> Path:
    """Tiny LLM2CLIP dir (``<path>/llm2clip``) + a random PACL head with RoPE sized for it (LLM-text PACL, §5.5)."""
    from perceive_ray.models.llm2clip import (
        TINY_IMAGE_SIZE,
        TINY_PATCH_SIZE,
        TINY_PROJECTION_DIM,
        TINY_VISION_DIM,
        save_tiny_llm2clip,
    )

    path = Path(path)
    save_tiny_llm2clip(path / "llm2clip", seed=seed)
    grid = TINY_IMAGE_SIZE // TINY_PATCH_SIZE
    spec = HeadSpec(kind="pacl", vision_dim=TINY_VISION_DIM, text_dim=TINY_PROJECTION_DIM, embed_dim=TINY_HEAD_EMBED,
                    rope=True, num_patches=grid * grid, pooling="uniform")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = PaclHead(spec)
    save_head(head.eval(), path / "head.safetensors")
    return path
