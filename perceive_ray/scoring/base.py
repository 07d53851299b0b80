"""The Scorer contract shared by the in-process runner and Ray Data's ``map_batches``.

A scorer is a callable class: ``__init__(model: ModelConfig, scorer: ScorerConfig)`` loads weights once;
``__call__(batch) -> batch`` scores a batch of *scoring rows* (one (item, image) each, with all candidate texts,
see ``perceive_ray.data.images.scoring_rows``) whose ``image`` column holds decoded RGB uint8 arrays (H, W, 3).

Input columns: ``benchmark``, ``item_id``, ``image_index``, ``image``, ``texts`` (list of str), ``subset``,
``group``, ``meta`` (JSON string). Values may be lists or numpy arrays (Ray Data's numpy batches).
Output columns: ``item_id``, ``image_index``, ``text_index``, ``score`` (float64), one row per (image, text), plus
any scorer-specific extras (e.g. ``lm_tokens``) that the scores table keeps as extra columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig

INPUT_COLUMNS = ("benchmark", "item_id", "image_index", "image", "texts", "subset", "group", "meta")
OUTPUT_COLUMNS = ("item_id", "image_index", "text_index", "score")


class Scorer(Protocol):
    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None: ...

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]: ...


class ScorerOptions(BaseModel):
    """Base for a scorer's typed ``scorer.options`` block: frozen, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


OptionsT = TypeVar("OptionsT", bound=ScorerOptions)


def parse_options(kind: type[OptionsT], options: Mapping[str, Any], *, scorer: str) -> OptionsT:
    """Validate ``scorer.options`` into the scorer's own options model; errors name ``scorer.options.<key>``."""
    try:
        return kind.model_validate(dict(options))
    except ValidationError as exc:
        lines = [f"scorer {scorer!r}: {exc.error_count()} option error(s)"]
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            message = "unknown option" if error["type"] == "extra_forbidden" else error["msg"]
            lines.append(f"  scorer.options.{key}: {message}")
        raise ConfigError("\n".join(lines)) from None


def iter_rows(batch: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Rows of a column batch (lists or numpy arrays) as dicts of plain Python values where cheap."""
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    for i in range(n):
        row = {}
        for name in columns:
            value = batch[name][i]
            if name == "texts":
                value = [str(t) for t in value]
            elif name in ("item_id", "benchmark", "subset", "group", "meta"):
                value = str(value)
            elif name == "image_index":
                value = int(value)
            row[name] = value
        yield row


class ScoreRows:
    """Accumulates output rows column-wise; ``extra`` columns must be given for every row."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}

    def add(self, item_id: str, image_index: int, text_index: int, score: float, **extra: Any) -> None:
        if self.columns["item_id"] and set(extra) != set(self.columns) - set(OUTPUT_COLUMNS):
            raise ValueError(f"extra score columns changed within a batch: {sorted(extra)}")
        for name, value in (("item_id", item_id), ("image_index", image_index), ("text_index", text_index),
                            ("score", float(score))):
            self.columns[name].append(value)
        for name, value in extra.items():
            self.columns.setdefault(name, []).append(value)

    def to_batch(self) -> dict[str, list]:
        return self.columns


def score_by_cosine(batch: Mapping[str, Any], embed_images, embed_texts) -> dict[str, list]:
    """Dual-encoder scoring: every row's image once, every distinct text once per batch, cosine of unit vectors.

    ``embed_images(rows) -> (B, D)`` and ``embed_texts(texts) -> (T, D)`` return L2-normalised float tensors.
    """
    rows = list(iter_rows(batch))
    out = ScoreRows()
    if not rows:
        return out.to_batch()
    text_index: dict[str, int] = {}
    for row in rows:
        for text in row["texts"]:
            text_index.setdefault(text, len(text_index))
    images = embed_images(rows)  # (B, D)
    texts = embed_texts(list(text_index))  # (T, D)
    cosines = (images @ texts.T).double().cpu()  # (B, T)
    for b, row in enumerate(rows):
        for t, text in enumerate(row["texts"]):
            out.add(row["item_id"], row["image_index"], t, float(cosines[b, text_index[text]]))
    return out.to_batch()
