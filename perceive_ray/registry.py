"""Name -> "module:attr" registry, resolved lazily: one mechanism for benchmarks, metrics, scorers, models, jobs.

Config files name things by these keys, never by import path. Nothing is imported until ``resolve`` is called, so
listing and validating names is cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

BENCHMARKS = (
    "whatsup_controlled_a",
    "whatsup_controlled_b",
    "whatsup_coco_one",
    "whatsup_coco_two",
    "whatsup_vg_one",
    "whatsup_vg_two",
    "mmvp",
    "mmvp_vlm",
    "winoground",
    "eqben_mini",
    "naturalbench",
    "coco_cf",
    "sugarcrepe",
    "seetrue",
)

_ADAPTERS = "perceive_ray.data.benchmarks"
_METRICS = "perceive_ray.metrics"

_ENTRIES: dict[str, dict[str, str]] = {
    # Benchmark adapters: load_*(root, *, strict_sizes=False) -> Manifest.
    "benchmarks": {
        "whatsup_controlled_a": f"{_ADAPTERS}.whatsup:load_controlled_a",
        "whatsup_controlled_b": f"{_ADAPTERS}.whatsup:load_controlled_b",
        "whatsup_coco_one": f"{_ADAPTERS}.whatsup:load_coco_one",
        "whatsup_coco_two": f"{_ADAPTERS}.whatsup:load_coco_two",
        "whatsup_vg_one": f"{_ADAPTERS}.whatsup:load_vg_one",
        "whatsup_vg_two": f"{_ADAPTERS}.whatsup:load_vg_two",
        "mmvp": f"{_ADAPTERS}.mmvp:load_mmvp",
        "mmvp_vlm": f"{_ADAPTERS}.mmvp:load_mmvp_vlm",
        "winoground": f"{_ADAPTERS}.winoground:load_winoground",
        "eqben_mini": f"{_ADAPTERS}.winoground:load_eqben_mini",
        "naturalbench": f"{_ADAPTERS}.winoground:load_naturalbench",
        "coco_cf": f"{_ADAPTERS}.winoground:load_coco_cf",
        "sugarcrepe": f"{_ADAPTERS}.sugarcrepe:load_sugarcrepe",
        "seetrue": f"{_ADAPTERS}.seetrue:load_seetrue",
    },
    # Metric functions, keyed by benchmark: compute_*(manifest, grids, *, tie_policy, label_errata) -> MetricReport.
    "metrics": {
        "whatsup_controlled_a": f"{_METRICS}.whatsup:compute_whatsup_controlled",
        "whatsup_controlled_b": f"{_METRICS}.whatsup:compute_whatsup_controlled",
        "whatsup_coco_one": f"{_METRICS}.whatsup:compute_whatsup_qa",
        "whatsup_coco_two": f"{_METRICS}.whatsup:compute_whatsup_qa",
        "whatsup_vg_one": f"{_METRICS}.whatsup:compute_whatsup_qa",
        "whatsup_vg_two": f"{_METRICS}.whatsup:compute_whatsup_qa",
        "mmvp": f"{_METRICS}.mmvp:compute_mmvp",
        "mmvp_vlm": f"{_METRICS}.mmvp:compute_mmvp",
        "winoground": f"{_METRICS}.winoground:compute_winoground_family",
        "eqben_mini": f"{_METRICS}.winoground:compute_winoground_family",
        "naturalbench": f"{_METRICS}.winoground:compute_winoground_family",
        "coco_cf": f"{_METRICS}.winoground:compute_winoground_family",
        "sugarcrepe": f"{_METRICS}.sugarcrepe:compute_sugarcrepe",
        "seetrue": f"{_METRICS}.auc:compute_seetrue",
    },
    # Scorers: callable classes Scorer(model: ModelConfig, scorer: ScorerConfig); see perceive_ray.scoring.base.
    "scorers": {
        "clip_cosine": "perceive_ray.scoring.clip_cosine:ClipCosineScorer",
        "vqascore": "perceive_ray.scoring.vqascore:VQAScoreScorer",
        "vlm2vec": "perceive_ray.scoring.vlm2vec:Vlm2VecScorer",
        "llm2clip": "perceive_ray.scoring.llm2clip:Llm2ClipScorer",
        "pacl_llm_text": "perceive_ray.scoring.heads:PaclLlmTextScorer",
        "pacl": "perceive_ray.scoring.heads:PaclScorer",
        "pacl_rope": "perceive_ray.scoring.heads:PaclRopeScorer",
        "sparc": "perceive_ray.scoring.heads:SparcScorer",
        "sparc_rope": "perceive_ray.scoring.heads:SparcRopeScorer",
    },
    # Model families: load_*(model: ModelConfig) -> bundle (model, preprocess, tokenizer, ...).
    "models": {
        "clip": "perceive_ray.models.clip:load_clip",
        "llava": "perceive_ray.models.llava:load_llava",
        "vlm2vec": "perceive_ray.models.vlm2vec:load_vlm2vec",
        "llm2clip": "perceive_ray.models.llm2clip:load_llm2clip",
    },
    # Tiny random-init models, written in the same on-disk layout the family's loader reads:
    # save_tiny_*(path, *, seed=0) -> Path.
    "tiny": {
        "clip": "perceive_ray.models.clip:save_tiny_clip",
        "llava": "perceive_ray.models.llava:save_tiny_llava",
        "llava_phi3": "perceive_ray.models.llava:save_tiny_llava_phi3",
        "llava_llama3": "perceive_ray.models.llava:save_tiny_llava_llama3",
        "llava_cls": "perceive_ray.models.llava:save_tiny_llava_cls",
        "vlm2vec": "perceive_ray.models.vlm2vec:save_tiny_vlm2vec",
        "llm2clip": "perceive_ray.models.llm2clip:save_tiny_llm2clip",
        "pacl": "perceive_ray.models.heads.tiny:save_tiny_pacl",
        "pacl_rope": "perceive_ray.models.heads.tiny:save_tiny_pacl_rope",
        "sparc_rope": "perceive_ray.models.heads.tiny:save_tiny_sparc_rope",
        "pacl_llm_text": "perceive_ray.models.heads.tiny:save_tiny_pacl_llm_text",
    },
    # Filled by the training work; the mechanism is the same.
    "jobs": {},
}

KINDS = tuple(_ENTRIES)

# Model families whose real checkpoints need the hub's remote code (LLM2CLIP ships its vision model as custom
# code). Only these may set model.trust_remote_code: true; every other family loads with it off.
REMOTE_CODE_FAMILIES = frozenset({"llm2clip"})


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def names(kind: str) -> list[str]:
    return list(_entries(kind))


def target(kind: str, name: str) -> str:
    entries = _entries(kind)
    if name not in entries:
        known = ", ".join(sorted(entries)) or "(none registered yet)"
        raise RegistryError(f"unknown {kind[:-1]} {name!r}; known: {known}")
    return entries[name]


def resolve(kind: str, name: str) -> Any:
    module_name, _, attr = target(kind, name).partition(":")
    return getattr(importlib.import_module(module_name), attr)


def summary(kind: str, name: str) -> str:
    """First line of the registered object's docstring (imports its module)."""
    doc = getattr(resolve(kind, name), "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _entries(kind: str) -> dict[str, str]:
    if kind not in _ENTRIES:
        raise RegistryError(f"unknown registry kind {kind!r}; known: {', '.join(KINDS)}")
    return _ENTRIES[kind]
