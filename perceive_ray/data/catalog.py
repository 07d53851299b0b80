"""Load any registered benchmark by name into a Manifest."""

from __future__ import annotations

from pathlib import Path

from perceive_ray import registry
from perceive_ray.data.manifest import Manifest


def load_benchmark(name: str, root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """Run the registered adapter for ``name`` over the dataset folder ``root``."""
    loader = registry.resolve("benchmarks", name)
    manifest = loader(root, strict_sizes=strict_sizes)
    if manifest.benchmark != name:
        raise AssertionError(f"adapter for {name!r} produced a manifest for {manifest.benchmark!r}")
    return manifest
