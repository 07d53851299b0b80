"""CLIP cosine scorer (PROTOCOLS §3.1): cosine of L2-normalised open_clip image and text embeddings.

Texts are scored verbatim (benchmark adapters already apply e.g. MMVP's ``'a photo of '``). Each image is encoded once
per scoring row and each distinct text once per batch; embeddings are cast to fp32 before normalising, whatever the
model dtype, so scores are comparable across precisions (the reference's 100·cos -> softmax is monotone, so
decisions match). ``clip_transform=train_compat`` reproduces the reference's random-crop transform, seeded per
(seed, item_id, image_index) so a score never depends on batch size, order or worker count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from perceive_ray.config import ModelConfig, ScorerConfig
from perceive_ray.data.images import to_pil
from perceive_ray.models.clip import ClipBundle, load_clip
from perceive_ray.randomness import keyed_rng
from perceive_ray.scoring.base import check_family, device_name, score_by_cosine
from perceive_ray.scoring.options import ClipCosineOptions, parse_options

COMPAT_PURPOSE = "clip_train_compat"


def compat_generator(seed: int, item_id: str, image_index: int) -> torch.Generator:
    """The torch generator for one image's compat crop, keyed by (seed, purpose, item, image) (PROTOCOLS §0)."""
    torch_seed = int(keyed_rng(seed, COMPAT_PURPOSE, item_id, image_index).integers(0, 2**63 - 1))
    return torch.Generator().manual_seed(torch_seed)


class ClipCosineScorer:
    """Cosine similarity of open_clip image and text embeddings, one score per (image, text)."""

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_family(model, scorer)
        self.options = parse_options(ClipCosineOptions, scorer.options, scorer=scorer.name)
        self.bundle: ClipBundle = load_clip(model)

    def describe(self) -> dict[str, Any]:
        """What decides these scores besides the weights (PROTOCOLS §8.13)."""
        bundle = self.bundle
        return {"scorer": "clip_cosine", "model_name": bundle.name, "pretrained": bundle.pretrained,
                "clip_transform": self.options.clip_transform, "compat_seed": self.options.seed,
                "image_size": list(_pair(bundle.image_size)), "mean": list(bundle.mean), "std": list(bundle.std),
                "context_length": bundle.context_length, "dtype": str(bundle.dtype).removeprefix("torch."),
                "device": device_name(bundle.device), "score": "cosine of L2-normalised fp32 embeddings"}

    def pixels(self, row: Mapping[str, Any]) -> torch.Tensor:
        """(3, H, W) normalised pixels of one scoring row under the configured transform."""
        image = to_pil(row["image"])
        if self.options.clip_transform == "val":
            return self.bundle.preprocess_val(image)
        generator = compat_generator(self.options.seed, row["item_id"], row["image_index"])
        return self.bundle.preprocess_train_compat(image, generator)

    @torch.inference_mode()
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit-norm fp32 image embeddings."""
        bundle = self.bundle
        features = bundle.model.encode_image(pixels.to(bundle.device, bundle.dtype))
        return F.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """T texts -> (T, D) unit-norm fp32 text embeddings (the tokenizer truncates to the context length)."""
        tokens = self.bundle.tokenizer(texts).to(self.bundle.device)  # (T, L)
        return F.normalize(self.bundle.model.encode_text(tokens).float(), dim=-1)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        return score_by_cosine(batch, lambda rows: self.embed_images(torch.stack([self.pixels(r) for r in rows])),
                               self.embed_texts)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
