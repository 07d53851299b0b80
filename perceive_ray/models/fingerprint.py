"""A fingerprint of the weights an evaluation reads, so a resume can refuse weights swapped at the same path.

- Local directories and files: every weight, config and tokenizer file with its size and sha256. Hashes are cached
  by (absolute path, size, mtime_ns) in ``$PERCEIVE_RAY_CACHE`` (default ``~/.cache/perceive_ray``), so a 14 GB
  checkpoint is read once, not on every ``eval``.
- Hub ids: the id and the pinned ``revision``, else the commit the local hub cache resolves ``main`` to, else
  ``unpinned`` (nothing to hash offline).
- open_clip names: the name and the pretrained tag (a tag names fixed published weights); a checkpoint file given
  as ``pretrained`` is hashed.
- Scorer options named in the options model's ``weight_fields`` (head weights, text-embedding stores): hashed.

Pure Python and hashlib: no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Files whose content decides a model's outputs: weights, configs, tokenizers, processors, sidecars.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".json", ".model", ".txt", ".tiktoken",
                    ".f32", ".f16", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CACHE_FILE = "file-sha256.json"


def cache_dir() -> Path:
    return Path(os.environ.get("PERCEIVE_RAY_CACHE") or Path.home() / ".cache" / "perceive_ray")


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` with one slash that is not an existing path: a hub id (never a relative folder of ours)."""
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


class _HashCache:
    def __init__(self) -> None:
        self.path = cache_dir() / CACHE_FILE
        try:
            self.entries: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
        self.dirty = True
        return digest.hexdigest()

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_name(f"{CACHE_FILE}.{os.getpid()}.tmp")
            temp.write_text(json.dumps(self.entries, sort_keys=True))
            os.replace(temp, self.path)
        except OSError:  # a read-only home only costs re-hashing next time
            pass


def fingerprint_path(path: Path, cache: _HashCache) -> dict[str, Any]:
    """{relative file: {size, sha256}} for a file or every weight-like file under a directory."""
    if path.is_file():
        return {path.name: {"size": path.stat().st_size, "sha256": cache.sha256(path)}}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": cache.sha256(p)} for p in files}


def hub_revision(repo_id: str, revision: str | None) -> str:
    """The pinned revision, else the commit the local hub cache has for ``main``, else ``unpinned``."""
    if revision:
        return revision
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache"
                                                        / "huggingface") / "hub")
    ref = hub / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or "unpinned"
    except OSError:
        return "unpinned"


def fingerprint_source(source: str | None, *, revision: str | None = None, cache: _HashCache) -> dict[str, Any]:
    if source is None:
        return {}
    path = Path(source).expanduser()
    if path.exists():
        return {"files": fingerprint_path(path, cache)}
    if source.startswith("hf-hub:") or looks_like_hub_id(source):
        repo = source.removeprefix("hf-hub:")
        return {"hub": repo, "revision": hub_revision(repo, revision)}
    return {"name": source}  # an open_clip model name or pretrained tag: fixed published weights


def compute_weights_fingerprint(model: Any, options: Mapping[str, Any], weight_fields: Iterable[str]) -> dict:
    """What weights ``model`` (a ModelConfig) and the scorer options point at, with content hashes where local."""
    cache = _HashCache()
    try:
        result = {"source": fingerprint_source(model.source, revision=model.revision, cache=cache),
                  "pretrained": fingerprint_source(model.pretrained, cache=cache)}
        for name in weight_fields:
            value = options.get(name)
            if value:
                result[f"options.{name}"] = fingerprint_source(str(value), cache=cache)
        return result
    finally:
        cache.save()


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """One short digest of a fingerprint (for tags and messages)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
