"""Name -> entry registry, resolved lazily: benchmarks, scorers, model families, training jobs and tiny models.

Config files name things by these keys, never by import path. An entry holds "module:attr" strings and plain facts;
nothing is imported until ``resolve``/``load_target`` is called, so listing and validating names is cheap and has no
side effects (a scorer's options model lives in the light ``perceive_ray.scoring.options`` module, which imports no
torch, so ``perceive-ray validate`` checks options in well under a second).

Adding a benchmark = an adapter + one ``BenchmarkEntry`` here (+ a synthetic writer, a YAML and a test); adding a
scorer = a module + one ``ScorerEntry`` + a tiny-model test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from perceive_ray.metrics.policies import GENERIC_TIE_POLICIES, TIE_POLICIES


@dataclass(frozen=True)
class BenchmarkEntry:
    """One benchmark: how to read it, how to score it, and what its metric accepts.

    adapter       -- ``load_*(root, *, strict_sizes=False) -> Manifest``
    metric        -- ``compute_*(manifest, grids, *, tie_policy, label_errata, **options) -> MetricReport``
    tie_policies  -- the policies its metric implements (``mmvp_reference`` is MMVP's own rule)
    nan_tolerant  -- NaN scores are counted and excluded by item id (SeeTRUE, PROTOCOLS §2.5) instead of an error
    """

    adapter: str
    metric: str
    tie_policies: tuple[str, ...] = GENERIC_TIE_POLICIES
    nan_tolerant: bool = False

    @property
    def target(self) -> str:
        return self.adapter


@dataclass(frozen=True)
class ScorerEntry:
    """One scorer: the callable class, its typed options model and the model families it accepts.

    mmvp_logit_scale -- the factor the reference multiplies scores by before its float32 softmax over MMVP's two
                        images (``tie_policy: mmvp_reference``), read off each reference MMVP script (comments
                        below): 100 where it scales cosines like CLIP, 1 where it softmaxes raw scores.
    """

    target: str
    options: str
    families: tuple[str, ...]
    mmvp_logit_scale: float = 1.0


@dataclass(frozen=True)
class ModelEntry:
    """A model family: ``load_*(model: ModelConfig, ...) -> bundle``; ``remote_code`` opts in to hub code."""

    target: str
    remote_code: bool = False


@dataclass(frozen=True)
class JobEntry:
    """A training job: ``build_job(config, context) -> Job`` (pure setup + ``forward_loss`` + export, no Ray)."""

    target: str


@dataclass(frozen=True)
class TinyEntry:
    """A tiny random-init model in the layout its family's loader reads: ``save_tiny_*(path, *, seed=0) -> Path``."""

    target: str


_ADAPTERS = "perceive_ray.data.benchmarks"
_METRICS = "perceive_ray.metrics"
_OPTIONS = "perceive_ray.scoring.options"
_CONTROLLED = f"{_METRICS}.whatsup:compute_whatsup_controlled"
_QA = f"{_METRICS}.whatsup:compute_whatsup_qa"
_WINO = f"{_METRICS}.winoground:compute_winoground_family"
_MMVP_POLICIES = TIE_POLICIES

_ENTRIES: dict[str, dict[str, Any]] = {
    "benchmarks": {
        "whatsup_controlled_a": BenchmarkEntry(f"{_ADAPTERS}.whatsup:load_controlled_a", _CONTROLLED),
        "whatsup_controlled_b": BenchmarkEntry(f"{_ADAPTERS}.whatsup:load_controlled_b", _CONTROLLED),
        "whatsup_coco_one": BenchmarkEntry(f"{_ADAPTERS}.whatsup:load_coco_one", _QA),
        "whatsup_coco_two": BenchmarkEntry(f"{_ADAPTERS}.whatsup:load_coco_two", _QA),
        "whatsup_vg_one": BenchmarkEntry(f"{_ADAPTERS}.whatsup:load_vg_one", _QA),
        "whatsup_vg_two": BenchmarkEntry(f"{_ADAPTERS}.whatsup:load_vg_two", _QA),
        "mmvp": BenchmarkEntry(f"{_ADAPTERS}.mmvp:load_mmvp", f"{_METRICS}.mmvp:compute_mmvp", _MMVP_POLICIES),
        "mmvp_vlm": BenchmarkEntry(f"{_ADAPTERS}.mmvp:load_mmvp_vlm", f"{_METRICS}.mmvp:compute_mmvp",
                                   _MMVP_POLICIES),
        "winoground": BenchmarkEntry(f"{_ADAPTERS}.winoground:load_winoground", _WINO),
        "eqben_mini": BenchmarkEntry(f"{_ADAPTERS}.winoground:load_eqben_mini", _WINO),
        "naturalbench": BenchmarkEntry(f"{_ADAPTERS}.winoground:load_naturalbench", _WINO),
        "coco_cf": BenchmarkEntry(f"{_ADAPTERS}.winoground:load_coco_cf", _WINO),
        "sugarcrepe": BenchmarkEntry(f"{_ADAPTERS}.sugarcrepe:load_sugarcrepe",
                                     f"{_METRICS}.sugarcrepe:compute_sugarcrepe"),
        "seetrue": BenchmarkEntry(f"{_ADAPTERS}.seetrue:load_seetrue", f"{_METRICS}.auc:compute_seetrue",
                                  nan_tolerant=True),
    },
    # mmvp_logit_scale sources: the reference's eval_MMVP functions at commit 1c73a50 (paths under
    # Patch-Aligned-Contrastive-Learning/ unless a path is given).
    "scorers": {
        # eval_clip.py:323  (100.0 * text_features @ image_features.T).softmax(dim=-1)
        "clip_cosine": ScorerEntry("perceive_ray.scoring.clip_cosine:ClipCosineScorer",
                                   f"{_OPTIONS}:ClipCosineOptions", ("clip",), mmvp_logit_scale=100.0),
        # eval_vqa_score.py:270-273  text_probs.T.softmax(dim=-1) on the raw VQAScores
        "vqascore": ScorerEntry("perceive_ray.scoring.vqascore:VQAScoreScorer", f"{_OPTIONS}:VQAScoreOptions",
                                ("llava",), mmvp_logit_scale=1.0),
        # VLM2Vec/eval_llava15.py:386-399  softmax of raw compute_similarity (VLM2Vec/src/model.py:247-248, a
        # plain matmul; no temperature)
        "vlm2vec": ScorerEntry("perceive_ray.scoring.vlm2vec:Vlm2VecScorer", f"{_OPTIONS}:Vlm2VecOptions",
                               ("vlm2vec",), mmvp_logit_scale=1.0),
        # [U] the reference has no LLM2CLIP MMVP path (open_clip/src/llm2clip-test.py covers What'sUp/COCO/VG
        # only); 100 by analogy with its own 100.0 * image @ text.T there (llm2clip-test.py:69)
        "llm2clip": ScorerEntry("perceive_ray.scoring.llm2clip:Llm2ClipScorer", f"{_OPTIONS}:Llm2ClipOptions",
                                ("llm2clip",), mmvp_logit_scale=100.0),
        # eval_pacl.py:306-312  100.0 * image_feature @ text_features.T, diagonal, .float(), softmax
        "pacl": ScorerEntry("perceive_ray.scoring.heads:PaclScorer", f"{_OPTIONS}:PaclOptions", ("clip",),
                            mmvp_logit_scale=100.0),
        # eval_pacl.py:306-312 (the same script evaluates pacl_rope_all.pth)
        "pacl_rope": ScorerEntry("perceive_ray.scoring.heads:PaclRopeScorer", f"{_OPTIONS}:PaclOptions", ("clip",),
                                 mmvp_logit_scale=100.0),
        # eval_sparc.py:300-305  model.scoring(...) unscaled (model/pacl.py:446,450 "# * self.logit_scale")
        "sparc": ScorerEntry("perceive_ray.scoring.heads:SparcScorer", f"{_OPTIONS}:SparcOptions", ("clip",),
                             mmvp_logit_scale=1.0),
        # eval_sparc.py:300-305 (the same script evaluates sparc_rope.pth)
        "sparc_rope": ScorerEntry("perceive_ray.scoring.heads:SparcRopeScorer", f"{_OPTIONS}:SparcOptions",
                                  ("clip",), mmvp_logit_scale=1.0),
        # eval_llm2pacl.py:315-321  100.0 * image_feature @ text_features.T, diagonal, .float(), softmax
        "pacl_llm_text": ScorerEntry("perceive_ray.scoring.heads:PaclLlmTextScorer",
                                     f"{_OPTIONS}:PaclLlmTextOptions", ("llm2clip",), mmvp_logit_scale=100.0),
    },
    "models": {
        "clip": ModelEntry("perceive_ray.models.clip:load_clip"),
        "llava": ModelEntry("perceive_ray.models.llava:load_llava"),
        "vlm2vec": ModelEntry("perceive_ray.models.vlm2vec:load_vlm2vec"),
        # LLM2CLIP ships its vision model as hub code: the only family that may set trust_remote_code.
        "llm2clip": ModelEntry("perceive_ray.models.llm2clip:load_llm2clip", remote_code=True),
    },
    "jobs": {
        # CLIP / SigLIP / EVA-CLIP fine-tuning on LLaVA-1.5 data, +- NegCLIP left/right negatives (PROTOCOLS §5.1)
        "clip_finetune": JobEntry("perceive_ray.train.jobs.clip_finetune:build_job"),
        # PACL / PACL+RoPE / SPARC(+RoPE) / LLM-text PACL heads on a frozen encoder (PROTOCOLS §5.2-5.5)
        "heads": JobEntry("perceive_ray.train.jobs.heads:build_job"),
        # LLaVA-1.5 stage 1 (projector) / stage 2 (LoRA), patch or cls features (PROTOCOLS §5.7, TRAINING.md §3)
        "llava": JobEntry("perceive_ray.train.jobs.llava:build_job"),
        # LLaVA-1.5 -> contrastive embedder: DoRA + InfoNCE over the global batch with GradCache (PROTOCOLS §5.6)
        "vlm2vec": JobEntry("perceive_ray.train.jobs.vlm2vec:build_job"),
    },
    "tiny": {
        "clip": TinyEntry("perceive_ray.models.clip:save_tiny_clip"),
        "siglip": TinyEntry("perceive_ray.models.clip:save_tiny_siglip"),
        "llava": TinyEntry("perceive_ray.models.llava:save_tiny_llava"),
        "llava_phi3": TinyEntry("perceive_ray.models.llava:save_tiny_llava_phi3"),
        "llava_llama3": TinyEntry("perceive_ray.models.llava:save_tiny_llava_llama3"),
        "llava_cls": TinyEntry("perceive_ray.models.llava:save_tiny_llava_cls"),
        "llava_parts": TinyEntry("perceive_ray.models.llava:save_tiny_llava_parts"),
        "vlm2vec": TinyEntry("perceive_ray.models.vlm2vec:save_tiny_vlm2vec"),
        "llm2clip": TinyEntry("perceive_ray.models.llm2clip:save_tiny_llm2clip"),
        "pacl": TinyEntry("perceive_ray.models.heads.tiny:save_tiny_pacl"),
        "pacl_rope": TinyEntry("perceive_ray.models.heads.tiny:save_tiny_pacl_rope"),
        "sparc_rope": TinyEntry("perceive_ray.models.heads.tiny:save_tiny_sparc_rope"),
        "pacl_llm_text": TinyEntry("perceive_ray.models.heads.tiny:save_tiny_pacl_llm_text"),
    },
}

KINDS = tuple(_ENTRIES)

# Model families whose real checkpoints need the hub's remote code; only these may set model.trust_remote_code.
REMOTE_CODE_FAMILIES = frozenset(name for name, entry in _ENTRIES["models"].items() if entry.remote_code)


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def names(kind: str) -> list[str]:
    return list(_entries(kind))


def entry(kind: str, name: str) -> Any:
    entries = _entries(kind)
    if name not in entries:
        known = ", ".join(sorted(entries)) or "(none registered yet)"
        raise RegistryError(f"unknown {kind[:-1]} {name!r}; known: {known}")
    return entries[name]


def target(kind: str, name: str) -> str:
    """The entry's main "module:attr" (a benchmark's adapter, a scorer's class, a family's loader, ...)."""
    return entry(kind, name).target


def load_target(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def resolve(kind: str, name: str) -> Any:
    return load_target(target(kind, name))


def benchmark(name: str) -> BenchmarkEntry:
    return entry("benchmarks", name)


def scorer(name: str) -> ScorerEntry:
    return entry("scorers", name)


def resolve_metric(benchmark_name: str) -> Any:
    return load_target(benchmark(benchmark_name).metric)


def resolve_options(scorer_name: str) -> Any:
    """The scorer's typed options model (pydantic; imports no torch)."""
    return load_target(scorer(scorer_name).options)


def summary(kind: str, name: str) -> str:
    """First line of the registered object's docstring (imports its module)."""
    doc = getattr(resolve(kind, name), "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _entries(kind: str) -> dict[str, Any]:
    if kind not in _ENTRIES:
        raise RegistryError(f"unknown registry kind {kind!r}; known: {', '.join(KINDS)}")
    return _ENTRIES[kind]
