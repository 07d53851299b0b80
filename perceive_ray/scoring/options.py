"""Every scorer's typed ``scorer.options`` model, in one light module (pydantic only, no torch).

The config loader validates ``scorer.options`` against the model the scorer's registry entry names, with defaults
filled, so a typo (``scorer.options.mdoe``) or a bad value fails ``perceive-ray validate`` and ``eval``/``score``
in well under a second, naming the key, before Ray starts or a model loads. Resume compares options after defaults
are filled, so writing a default explicitly is not a change.

``weight_fields`` names the options that point at weight files (their content enters the run's weights fingerprint);
``placement_fields`` the ones that only place the work (device, batch sizes), left out of the resume comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from perceive_ray.config import ConfigError
from perceive_ray.scoring.prompts import (
    TEMPLATE_NAMES,
    VLM2VEC_GENERIC_PROMPT,
    VLM2VEC_QUERY_TEMPLATE,
    VQASCORE_ANSWER,
    VQASCORE_NEGATIVE_ANSWER,
    VQASCORE_QUESTION,
)


class ScorerOptions(BaseModel):
    """Base for a scorer's typed ``scorer.options`` block: frozen, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    weight_fields: ClassVar[tuple[str, ...]] = ()
    # Options that place the work but do not change the scores: left out of the resume comparison.
    placement_fields: ClassVar[tuple[str, ...]] = ("device", "text_batch_size")


def format_option_errors(exc: ValidationError, *, scorer: str) -> str:
    lines = [f"scorer {scorer!r}: {exc.error_count()} option error(s)"]
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"])
        message = "unknown option" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  scorer.options.{key}: {message}")
    return "\n".join(lines)


def parse_options(kind: type[ScorerOptions], options: Mapping[str, Any] | ScorerOptions, *, scorer: str):
    """Validate ``scorer.options`` into the scorer's own options model; errors name ``scorer.options.<key>``."""
    if isinstance(options, kind):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump()
    try:
        return kind.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError(format_option_errors(exc, scorer=scorer)) from None

class ClipCosineOptions(ScorerOptions):
    """``scorer.options`` of ``clip_cosine``."""

    clip_transform: Literal["val", "train_compat"] = "val"
    seed: int = 0


class VQAScoreOptions(ScorerOptions):
    """``scorer.options`` of ``vqascore`` (PROTOCOLS §3.2, §4)."""

    mode: Literal["t2v", "p_yes", "yes_no"] = "t2v"
    template: Literal[TEMPLATE_NAMES] | None = None  # default: the checkpoint's own
    question: str = VQASCORE_QUESTION
    answer: str = VQASCORE_ANSWER
    negative_answer: str = VQASCORE_NEGATIVE_ANSWER
    image_preprocess: Literal["pad", "none"] = "pad"
    sharing: Literal["shared", "none"] = "shared"
    # reference: softmax over the original model's vocabulary when the checkpoint records it (rows a port or the
    # converter appended, e.g. <image>, are left out); full: over every row of the loaded LM head.
    softmax_vocab: Literal["reference", "full"] = "reference"
    # llama3 template only: True keeps the template's literal <|begin_of_text|> plus the tokenizer's BOS (two BOS,
    # as the reference feeds; PROTOCOLS §3.2 step 3); False drops the tokenizer's extra BOS so exactly one remains.
    llama3_double_bos: bool = True
    max_length: int | None = None  # default: the LM's max_position_embeddings; longer sequences are an error
    device: str | None = None  # default: cuda if available, else cpu


class Vlm2VecOptions(ScorerOptions):
    """``scorer.options`` of ``vlm2vec``.

    whatsup_prompt: ``per_view`` (default, the reference): What'sUp Controlled is scored twice, 2-way keys from the
    2-way question of the image's relation group (the reference's ``eval``), 4-way keys from the subset's 4-way
    question (``eval_4``); ``two_way`` / ``four_way`` use one question for both views.
    """

    whatsup_prompt: Literal["per_view", "two_way", "four_way"] = "per_view"
    query_template: str = VLM2VEC_QUERY_TEMPLATE
    generic_prompt: str = VLM2VEC_GENERIC_PROMPT
    missing_question: Literal["error", "generic"] = "error"  # MMVP(-VLM) item without a question in meta
    seed: int = 0  # COCO/VG prompt coin
    image_preprocess: Literal["processor", "resize", "pad"] = "processor"
    merge: bool = True  # merge_and_unload an adapter on load (the reference merges)
    device: str | None = None  # default: cuda if available, else cpu


class Llm2ClipTextOptions(ScorerOptions):
    """Where LLM2CLIP text vectors come from; shared by ``llm2clip`` and ``pacl_llm_text``."""

    text_embeddings: str | None = None
    text_model: str | None = None
    text_revision: str | None = None
    text_batch_size: int = Field(default=16, gt=0)

    weight_fields: ClassVar[tuple[str, ...]] = ("text_embeddings",)


class Llm2ClipOptions(Llm2ClipTextOptions):
    """``scorer.options`` of ``llm2clip``."""

    image_processor: str | None = None


class PaclOptions(ScorerOptions):
    """``scorer.options`` of ``pacl`` / ``pacl_rope``."""

    weight_fields: ClassVar[tuple[str, ...]] = ("head_weights",)

    head_weights: str
    embed_dim: int = Field(default=768, gt=0)
    # None: the pooling stored with the weights, else ``uniform`` (the released forward); ``sigmoid`` = compat.
    pacl_pooling: Literal["uniform", "sigmoid"] | None = None


class SparcOptions(ScorerOptions):
    """``scorer.options`` of ``sparc`` / ``sparc_rope``."""

    weight_fields: ClassVar[tuple[str, ...]] = ("head_weights",)

    head_weights: str
    embed_dim: int = Field(default=768, gt=0)
    # sigma for weights that store none (released .pth); default 1/num_patches. Must match a stored sigma.
    sparc_sigma: float | None = Field(default=None, ge=0.0, lt=1.0)
    # Compatibility override at eval only: 1/625 reproduces the reference's shipped SPARC evaluation.
    sparc_eval_sigma: float | None = Field(default=None, ge=0.0, lt=1.0)
    sparc_mask_padding: bool = False
    sparc_local: bool = True


class PaclLlmTextOptions(PaclOptions, Llm2ClipTextOptions):
    """``scorer.options`` of ``pacl_llm_text``: the PACL options plus where the LLM2Vec text vectors come from."""

    weight_fields: ClassVar[tuple[str, ...]] = ("head_weights", "text_embeddings")
