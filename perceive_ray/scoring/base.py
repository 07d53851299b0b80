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
from typing import Any, Protocol

from perceive_ray import registry
from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig

INPUT_COLUMNS = ("benchmark", "item_id", "image_index", "image", "texts", "subset", "group", "meta")
OUTPUT_COLUMNS = ("item_id", "image_index", "text_index", "score")


class Scorer(Protocol):
    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None: ...

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]: ...

    def describe(self) -> dict[str, Any]:
        """Everything besides the weights that decides the scores (prompts, token ids, dtype, transforms, device):
        recorded in the run record, the MLflow tags and the scores' Parquet metadata; resume refuses a change."""
        ...


def check_family(model: ModelConfig, scorer: ScorerConfig) -> None:
    """The model family must be one the scorer's registry entry accepts (the config loader checks this too)."""
    families = registry.scorer(scorer.name).families
    if model.family not in families:
        raise ConfigError(f"model.family: scorer {scorer.name!r} needs a {' or '.join(repr(f) for f in families)} "
                          f"model, got {model.family!r}")


def device_name(device: Any) -> str:
    """``cpu``, or ``cuda:<card name>`` (the GPU type goes into every run record, PROTOCOLS §8.13)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


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
