"""``--smoke`` preparation: the synthetic data and tiny models an experiment's smoke block points at.

Smoke blocks name synthetic roots under ``synth/`` (``perceive-ray data synth --out synth``) and tiny models under
``runs/tiny/<tiny name>[/part]`` (``perceive-ray model tiny <name> --out runs/tiny/<name>``), relative to the working
directory. ``prepare_smoke`` creates whichever of them is missing, so ``perceive-ray eval ANY.yaml --smoke`` works
in a fresh clone with no manual steps.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

from perceive_ray import registry
from perceive_ray.config import ExperimentConfig

SYNTH_DIR = "synth"
TINY_DIR = "runs/tiny"
SMOKE_SEED = 0
SMOKE_PAIRS = 4  # object pairs per What'sUp subset; other benchmarks scale with it


def _relative_parts(value: str | Path | None) -> tuple[str, ...]:
    if value is None or Path(value).is_absolute():
        return ()
    return PurePosixPath(Path(value).as_posix()).parts


def tiny_name(value: str | Path | None) -> str | None:
    """``runs/tiny/<name>[/...]`` with a registered tiny model -> ``<name>``."""
    parts = _relative_parts(value)
    prefix = PurePosixPath(TINY_DIR).parts
    if len(parts) > len(prefix) and parts[: len(prefix)] == prefix and parts[len(prefix)] in registry.names("tiny"):
        return parts[len(prefix)]
    return None


def smoke_paths(config: ExperimentConfig) -> dict[str, list[str]]:
    """What ``prepare_smoke`` would create for ``config`` (eval or train): {"synth": [roots], "tiny": [names]}."""
    values = [config.model.source, config.model.pretrained]
    if getattr(config, "kind", "eval") == "train":
        roots = [p for s in config.data.sources for p in (s.path, s.image_root)]
        if config.data.text_embeddings is not None:
            values.append(config.data.text_embeddings)
        if config.job == "llava" and config.train.llava.vision_tower:
            values.append(config.train.llava.vision_tower)
    else:
        roots = [b.root for b in config.benchmarks]
        options = registry.resolve_options(config.scorer.name)
        values += [config.scorer.options.get(name) for name in options.weight_fields]
    synth = sorted({str(root) for root in roots if _relative_parts(root)[:1] == (SYNTH_DIR,)})
    tiny = sorted({name for name in map(tiny_name, values) if name})
    return {"synth": synth, "tiny": tiny}


def preparable(config: ExperimentConfig) -> list[str]:
    """Paths that ``--smoke`` prepares (the preflight does not require them to exist yet)."""
    paths = smoke_paths(config)
    return ([SYNTH_DIR] if paths["synth"] else []) + [f"{TINY_DIR}/{name}" for name in paths["tiny"]]


def prepare_smoke(config: ExperimentConfig) -> list[str]:
    """Create the missing synthetic data and tiny models ``config`` needs; returns what was created."""
    paths = smoke_paths(config)
    made = []
    if paths["synth"] and any(not Path(root).exists() for root in paths["synth"]):
        from perceive_ray.data.synthetic import ensure_generated

        summary = ensure_generated(Path(SYNTH_DIR), seed=SMOKE_SEED, pairs=SMOKE_PAIRS)
        made.append(f"synthetic benchmarks in {SYNTH_DIR}/ (seed {summary.seed}, {summary.pairs} pairs)")
    for name in paths["tiny"]:
        target = Path(TINY_DIR) / name
        if not target.exists():
            registry.resolve("tiny", name)(target, seed=SMOKE_SEED)
            made.append(f"tiny model {name} in {target}")
    store = getattr(getattr(config, "data", None), "text_embeddings", None)
    if store is not None and tiny_name(store) and not Path(store).exists():
        from perceive_ray.training import build_text_embedding_store

        count = build_text_embedding_store(config, store)
        made.append(f"text embedding store of {count} captions in {store}")
    for line in made:
        print(f"smoke: prepared {line}", file=sys.stderr)
    return made
