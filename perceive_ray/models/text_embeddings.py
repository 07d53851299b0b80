"""Precomputed text embeddings on disk: a float32 (N, D) ``.npy`` memmap keyed by text SHA-256, never by position.

A store is a directory written once by ``write_text_embeddings`` (the Ray Data job of the training work writes the
same layout at scale; PROTOCOLS §5.5 "Production"):

- ``embeddings.npy``: float32 (N, D), opened memory-mapped, so a 558K x 4096 array (~9 GB) costs no RAM up front;
- ``index.json``: ``{text_sha256: row}`` for the N distinct texts;
- ``manifest.json``: the encoder that produced the vectors (model, revision, pooling, max length, template, ...)
  plus ``dim``, ``count`` and the per-row text hashes, so a reader can refuse vectors from another encoder.

The directory is built under a temporary sibling name and renamed into place, so a reader never sees a half-written
store. Text is hashed byte-exactly (UTF-8, nothing stripped; PROTOCOLS §0).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.json"
FORMAT = "perceive_ray.text_embeddings/v1"
RESERVED_META = ("format", "dim", "count", "text_sha256", "dtype")


class TextEmbeddingError(ValueError):
    """A text embedding store is missing, malformed, or does not fit the encoder it is used with."""


class MissingTextEmbeddingError(LookupError):
    """A looked-up text has no row in the store; the message names the text (first 60 chars) and the store."""

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0])


def compute_text_sha256(text: str) -> str:
    """Hex SHA-256 of the UTF-8 bytes of ``text`` (byte-exact: trailing spaces count)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def preview_text(text: str, limit: int = 60) -> str:
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def write_text_embeddings(
    directory: str | Path,
    texts: Sequence[str],
    vectors: Any,
    *,
    meta: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``vectors`` (N, D) for ``texts`` (N) as a store at ``directory`` (atomic) and return its path.

    Repeated texts are stored once; their vectors must agree exactly (one encoder gives one vector per text).
    ``meta`` describes the encoder (e.g. ``Llm2ClipBundle.text_meta``) and must be JSON-serialisable.
    """
    directory = Path(directory)
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, D), got shape {array.shape}")
    if len(texts) != array.shape[0]:
        raise ValueError(f"{len(texts)} texts but {array.shape[0]} vectors")
    if not np.isfinite(array).all():
        raise ValueError("vectors contain NaN or inf")
    clash = sorted(set(meta) & set(RESERVED_META))
    if clash:
        raise ValueError(f"meta must not set {clash}: the writer computes them")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory}: a text embedding store already exists (pass overwrite=True)")

    rows: dict[str, int] = {}
    keep: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        key = compute_text_sha256(text)
        if key in rows:
            if not np.array_equal(array[keep[rows[key]]], array[i]):
                raise ValueError(f"text {preview_text(text)} appears twice with different vectors")
            continue
        rows[key] = len(keep)
        keep.append(i)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        out = np.lib.format.open_memmap(staging / EMBEDDINGS_FILE, mode="w+", dtype=np.float32,
                                        shape=(len(keep), array.shape[1]))
        out[:] = array[keep].astype(np.float32)  # (N_distinct, D)
        out.flush()
        del out
        hashes = list(rows)  # insertion order == row order
        manifest = {**dict(meta), "format": FORMAT, "dtype": "float32", "dim": int(array.shape[1]),
                    "count": len(keep), "text_sha256": hashes}
        (staging / INDEX_FILE).write_text(json.dumps(rows) + "\n", encoding="utf-8")
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                             encoding="utf-8")
        _replace_dir(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _replace_dir(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    if not target.exists():
        os.replace(staging, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, trash / target.name)
    os.replace(staging, target)
    shutil.rmtree(trash, ignore_errors=True)


class TextEmbeddingStore:
    """Read-only view of a store written by ``write_text_embeddings``; vectors stay memory-mapped."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        for name in (MANIFEST_FILE, INDEX_FILE, EMBEDDINGS_FILE):
            if not (self.directory / name).is_file():
                raise TextEmbeddingError(f"{self.directory}: not a text embedding store ({name} missing)")
        try:
            self.manifest: dict[str, Any] = json.loads((self.directory / MANIFEST_FILE).read_text("utf-8"))
            self.index: dict[str, int] = json.loads((self.directory / INDEX_FILE).read_text("utf-8"))
            self.vectors = np.load(self.directory / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TextEmbeddingError(f"{self.directory}: unreadable text embedding store: {exc}") from exc
        self._check()

    def _check(self) -> None:
        m, where = self.manifest, self.directory
        if m.get("format") != FORMAT:
            raise TextEmbeddingError(f"{where}: unknown store format {m.get('format')!r} (expected {FORMAT!r})")
        if self.vectors.dtype != np.float32 or self.vectors.ndim != 2:
            raise TextEmbeddingError(f"{where}: {EMBEDDINGS_FILE} must be float32 (N, D), got "
                                     f"{self.vectors.dtype} {self.vectors.shape}")
        if self.vectors.shape != (m.get("count"), m.get("dim")):
            raise TextEmbeddingError(f"{where}: {EMBEDDINGS_FILE} has shape {self.vectors.shape}, manifest says "
                                     f"({m.get('count')}, {m.get('dim')})")
        expected = {h: i for i, h in enumerate(m.get("text_sha256", []))}
        if self.index != expected:
            raise TextEmbeddingError(f"{where}: {INDEX_FILE} disagrees with the manifest's text hashes")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def __contains__(self, text: str) -> bool:
        return compute_text_sha256(text) in self.index

    def rows(self, texts: Iterable[str]) -> list[int]:
        out = []
        for text in texts:
            row = self.index.get(compute_text_sha256(text))
            if row is None:
                raise MissingTextEmbeddingError(
                    f"text {preview_text(text)} has no embedding in the store {self.directory} "
                    f"({len(self)} texts); recompute the store over this benchmark's texts"
                )
            out.append(row)
        return out

    def lookup(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) float32 copy of the stored vectors of ``texts`` (any order, repeats allowed)."""
        rows = self.rows(texts)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.vectors[rows], dtype=np.float32)

    def check_compatible(self, expected: Mapping[str, Any], *, source: str = "text_embeddings") -> None:
        """Every key of ``expected`` (e.g. model, revision, pooling, max_length, dim) must equal the manifest's."""
        diffs = [f"{key}: store {self.manifest.get(key)!r}, encoder {value!r}"
                 for key, value in expected.items() if self.manifest.get(key) != value]
        if diffs:
            raise TextEmbeddingError(f"{source}: store {self.directory} was written by another text encoder:\n  "
                                     + "\n  ".join(diffs))
