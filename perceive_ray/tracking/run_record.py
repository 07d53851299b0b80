"""What ran: git SHA, package versions, platform, dataset file hashes; recorded at run start."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PACKAGES = ("perceive_ray", "torch", "torchvision", "transformers", "open_clip_torch", "peft", "deepspeed", "ray",
            "mlflow", "numpy", "pyarrow", "pillow", "pydantic")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_sha(directory: str | Path | None = None) -> str:
    """HEAD of the checkout holding this package (or ``directory``); ``unknown`` outside git. ``+dirty`` if changed."""
    where = Path(directory) if directory else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def build_run_record(dataset_hashes: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """The provenance stored with every run: ``dataset_hashes`` maps benchmark -> {annotation file: sha256}."""
    return {
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.node(),
        "packages": package_versions(),
        "dataset_hashes": {name: dict(hashes) for name, hashes in dataset_hashes.items()},
    }


def record_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """Flat string tags for a tracker: ``git_sha``, ``version.<pkg>``, ``dataset.<bench>.<file>``."""
    tags = {"git_sha": str(record["git_sha"]), "python": str(record["python"])}
    tags.update({f"version.{name}": str(v) for name, v in record["packages"].items()})
    for bench, hashes in record["dataset_hashes"].items():
        tags.update({f"dataset.{bench}.{file}": digest for file, digest in hashes.items()})
    return tags


def flatten_tags(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested values -> flat ``a.b.c`` string tags (lists and scalars as JSON where not strings)."""
    tags: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            tags.update(flatten_tags(value, prefix=f"{name}."))
        else:
            tags[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return tags


def experiment_tags(config: Any, identity: Mapping[str, Any], *, runner: str, run_id: str) -> dict[str, str]:
    """Tags of one tracked evaluation: the run record (git SHA, versions, dataset hashes), scorer/model ids, tie
    policy, errata, benchmarks and the weights digest. The scorer's describe() is added as ``describe.*`` tags once
    the scorer is built."""
    from perceive_ray.models.fingerprint import fingerprint_digest

    record = build_run_record(identity.get("datasets", {}))
    return record_tags(record) | {
        "benchmarks": ",".join(b.name for b in config.benchmarks),
        "scorer": config.scorer.name,
        "model.family": config.model.family,
        "model.source": config.model.source,
        "model.pretrained": str(config.model.pretrained),
        "weights": fingerprint_digest(identity.get("weights", {})),
        "tie_policy": config.metrics.tie_policy,
        "label_errata": config.metrics.label_errata,
        "runner": runner,
        "run_id": run_id,
    }
