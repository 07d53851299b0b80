"""Shared tiny-CLIP fixture helper: a random-init open_clip local directory loadable through ``load_clip``."""

from __future__ import annotations

from pathlib import Path

from perceive_ray.config import ModelConfig
from perceive_ray.models.clip import save_tiny_clip


def build_tiny_clip_dir(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny CLIP (ViT 64-wide, 2 layers, patch 8, 32 px; text 32-wide, 2 layers, real BPE vocab) to ``path``."""
    return save_tiny_clip(path, seed=seed)


def tiny_clip_model_config(path: str | Path, *, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig that loads a directory written by ``build_tiny_clip_dir``."""
    return ModelConfig(family="clip", source=str(path), dtype=dtype)
