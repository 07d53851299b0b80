"""Tiny offline LLaVA checkpoints for tests: written by the real tiny builder, loaded back through load_llava."""

from __future__ import annotations

from pathlib import Path

from perceive_ray.models.llava import TINY_IMAGE_SIZE, TINY_PATCH_SIZE, save_tiny_llava


def build_tiny_llava_dir(path: str | Path, *, template: str = "chat", select_feature: str = "patch", seed: int = 0,
                         image_size: int = TINY_IMAGE_SIZE, patch_size: int = TINY_PATCH_SIZE) -> Path:
    """Write a random-init tiny LLaVA (default V = 64; image_size=48, patch_size=2 gives the real V = 576) to
    ``path`` and return it; use it as ``ModelConfig(family="llava", source=str(path))``."""
    return save_tiny_llava(path, template=template, select_feature=select_feature, seed=seed,
                           image_size=image_size, patch_size=patch_size)


def tiny_torch_offline():
    """Generator for a module-scoped fixture: hub offline, torch on 1 thread (the tiny ops are too small for
    thread hand-off to pay), thread count restored afterwards."""
    import pytest
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)
