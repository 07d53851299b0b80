"""LLM2CLIP baseline scorer (PROTOCOLS §3.3): cosine of L2-normalised LLM2CLIP image and text features.

Image: the deterministic ``CLIPImageProcessor`` (resize shorter side, centre crop, CLIP mean/std) ->
``get_image_features``. Text: verbatim option text -> LLM2Vec mean-pooled LLM vector (online, or looked up in a
precomputed store with ``text_embeddings``) -> the frozen adapter ``get_text_features``. Features are cast to fp32
before normalising; each image is encoded once per scoring row and each distinct text once per batch. What'sUp,
COCO-QA and VG-QA are the reference's benchmarks (the reference has no MMVP path), but any manifest scores the same way.

Options (``scorer.options``): ``text_embeddings`` (store directory or null), ``text_model`` / ``text_revision`` /
``image_processor`` (overrides of the hub defaults, real checkpoints only), ``text_batch_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from perceive_ray.config import ModelConfig, ScorerConfig
from perceive_ray.models.llm2clip import encode_llm_checked, load_llm2clip
from perceive_ray.scoring.base import check_family, device_name, score_by_cosine
from perceive_ray.scoring.options import Llm2ClipOptions, parse_options


class Llm2ClipScorer:
    """Cosine of L2-normalised LLM2CLIP image and text features, one score per (image, text)."""

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_family(model, scorer)
        self.options = parse_options(Llm2ClipOptions, scorer.options, scorer=scorer.name)
        self.bundle = load_llm2clip(model, text_embeddings=self.options.text_embeddings,
                                    text_model=self.options.text_model, text_revision=self.options.text_revision,
                                    image_processor=self.options.image_processor)

    def describe(self) -> dict[str, Any]:
        """What decides these scores besides the weights."""
        bundle = self.bundle
        return {"scorer": "llm2clip", "image_size": list(bundle.image_size), "text_meta": bundle.text_meta,
                "text_store": bundle.text_store is not None, "dtype": str(bundle.dtype).removeprefix("torch."),
                "device": device_name(bundle.device), "score": "cosine of L2-normalised fp32 features"}

    def embed_images(self, images: list[Any]) -> torch.Tensor:
        """B RGB uint8 images -> (B, D) unit-norm fp32."""
        bundle = self.bundle
        return F.normalize(bundle.encode_image(bundle.pixel_values(images)), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """T texts -> (T, D) unit-norm fp32."""
        vectors = encode_llm_checked(self.bundle, texts, self.options.text_batch_size)  # (T, D_llm)
        return F.normalize(self.bundle.adapt_text(vectors), dim=-1)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        return score_by_cosine(batch, lambda rows: self.embed_images([r["image"] for r in rows]), self.embed_texts)
