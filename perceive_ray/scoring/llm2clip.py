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
from pydantic import Field

from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.models.llm2clip import Llm2ClipBundle, load_llm2clip
from perceive_ray.models.text_embeddings import MissingTextEmbeddingError
from perceive_ray.scoring.base import ScorerOptions, parse_options, score_by_cosine


class Llm2ClipTextOptions(ScorerOptions):
    """Where LLM2CLIP text vectors come from; shared by ``llm2clip`` and ``pacl_llm_text``."""

    text_embeddings: str | None = None
    text_model: str | None = None
    text_revision: str | None = None
    text_batch_size: int = Field(default=16, gt=0)


class Llm2ClipOptions(Llm2ClipTextOptions):
    """``scorer.options`` of ``llm2clip``."""

    image_processor: str | None = None


def check_llm2clip_family(model: ModelConfig, scorer: ScorerConfig) -> None:
    if model.family != "llm2clip":
        raise ConfigError(f"model.family: scorer {scorer.name!r} needs an 'llm2clip' model, got {model.family!r}")


def load_llm2clip_for(model: ModelConfig, options: Llm2ClipTextOptions, *,
                      image_processor: str | None = None) -> Llm2ClipBundle:
    """The bundle a scorer's options ask for (online LLM, or the store when ``text_embeddings`` is set)."""
    return load_llm2clip(model, text_embeddings=options.text_embeddings, text_model=options.text_model,
                         text_revision=options.text_revision, image_processor=image_processor)


def encode_llm_checked(bundle: Llm2ClipBundle, texts: list[str], batch_size: int) -> torch.Tensor:
    """(T, D_llm) LLM2Vec vectors; a text missing from the store is a configuration error, not a crash."""
    try:
        return bundle.encode_llm(texts, batch_size=batch_size)
    except MissingTextEmbeddingError as exc:
        raise ConfigError(f"scorer.options.text_embeddings: {exc}") from None


class Llm2ClipScorer:
    """Cosine of L2-normalised LLM2CLIP image and text features, one score per (image, text)."""

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_llm2clip_family(model, scorer)
        self.options = parse_options(Llm2ClipOptions, scorer.options, scorer=scorer.name)
        self.bundle = load_llm2clip_for(model, self.options, image_processor=self.options.image_processor)

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
