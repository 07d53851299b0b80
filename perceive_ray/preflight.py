"""Checks that an evaluation's inputs exist, run before Ray starts, a tracker run opens or a model loads.

``check_inputs`` looks at the filesystem (and the offline hub cache) only: the model source and its base, the weight
files named by scorer options, and every dataset through its adapter (which checks the annotation files and every
image reference). Each failure is a ConfigError or ManifestError naming the key or file; the CLI exits 2.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Collection
from pathlib import Path

from perceive_ray import registry
from perceive_ray.config import ConfigError, ExperimentConfig, ModelConfig
from perceive_ray.models.fingerprint import looks_like_hub_id


def open_clip_names() -> set[str]:
    """open_clip's built-in model names, read from its shipped config files without importing it (no torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return set()
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return {path.stem for path in folder.glob("*.json")}


def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cached(repo_id: str) -> bool:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache"
                                                        / "huggingface") / "hub")
    return (hub / f"models--{repo_id.replace('/', '--')}").is_dir()


def check_source(value: str | None, *, key: str, family: str, allow_name: bool = False) -> None:
    """A local path must exist; a hub id must be reachable (cached, when the hub is offline)."""
    if value is None:
        return
    source = value.strip()
    path = Path(source).expanduser()
    if path.exists():
        return
    if source.startswith("hf-hub:") or looks_like_hub_id(source):
        repo = source.removeprefix("hf-hub:")
        if _offline() and not _hub_cached(repo):
            raise ConfigError(f"{key}: {source!r} is not a local directory and the hub is offline "
                              f"(HF_HUB_OFFLINE) with no cached copy of it")
        return
    if allow_name and "/" not in source and not source.startswith((".", "~")):
        return  # a name the family's loader resolves (open_clip model name or pretrained tag)
    raise ConfigError(f"{key}: {source!r} not found (not an existing path{', nor a hub id org/name' if '/' in source else ''}"
                      f"; family {family!r})")


def check_model(model: ModelConfig) -> None:
    if model.family == "clip":
        source = model.source.strip()
        if "/" not in source and not source.startswith((".", "~", "hf-hub:")) and not Path(source).exists():
            names = open_clip_names()
            if names and source.replace("/", "-") not in names:
                raise ConfigError(f"model.source: {source!r} is neither a local directory nor an open_clip model name "
                                  "(e.g. 'ViT-L-14-336')")
        check_source(model.source, key="model.source", family=model.family, allow_name=True)
        check_source(model.pretrained, key="model.pretrained", family=model.family, allow_name=True)
        from perceive_ray.models.clip import resolve_open_clip_args

        resolve_open_clip_args(model)  # the loader's own checks (pretrained tag, local dir layout), no weights read
        return
    check_source(model.source, key="model.source", family=model.family)
    check_source(model.pretrained, key="model.pretrained", family=model.family)


def check_inputs(config: ExperimentConfig, *, skip: Collection[str] = (), datasets: bool = True) -> list:
    """Check the model, weight options and datasets of ``config``; returns the manifests it loaded.

    ``skip`` lists paths that ``--smoke`` would prepare (synthetic data, tiny models), not checked here.
    """
    skipped = {str(Path(p)) for p in skip}

    def wanted(value: str | None) -> bool:
        return value is not None and not any(str(Path(value)).startswith(s) for s in skipped)

    model = config.model
    if wanted(model.source) or wanted(model.pretrained):
        check_model(model)
    options_model = registry.resolve_options(config.scorer.name)
    for name in options_model.weight_fields:
        value = config.scorer.options.get(name)
        if value and wanted(str(value)) and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"scorer.options.{name}: {value} not found")
    manifests = []
    if datasets:
        from perceive_ray.data.catalog import load_benchmark

        for bench in config.benchmarks:
            if wanted(str(bench.root)):
                manifests.append(load_benchmark(bench.name, bench.root, strict_sizes=bench.strict_sizes))
    return manifests
