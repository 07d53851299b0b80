"""Reading benchmark annotation files: hashing, strict CSV/JSON/JSONL parsing, safe image-path resolution.

Every failure is a ManifestError that names the file and, where there is one, the row or key.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from perceive_ray.data.manifest import ManifestError


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SourceFiles:
    """Tracks the annotation files an adapter reads under one dataset root, with their hashes."""

    def __init__(self, root: str | Path, benchmark: str):
        self.root = Path(root).expanduser().resolve()
        self.benchmark = benchmark
        self.hashes: dict[str, str] = {}
        if not self.root.is_dir():
            raise ManifestError(f"{benchmark}: dataset root {self.root} is not a directory")

    def find(self, *candidates: str) -> Path:
        """The first existing file among ``candidates`` (relative to root); error listing all of them."""
        for rel in candidates:
            path = self.root / rel
            if path.is_file():
                return path
        names = ", ".join(repr(c) for c in candidates)
        raise ManifestError(f"{self.benchmark}: annotation file not found under {self.root}: expected {names}")

    def find_dir(self, *candidates: str) -> Path:
        for rel in candidates:
            path = self.root / rel
            if path.is_dir():
                return path
        names = ", ".join(repr(c) for c in candidates)
        raise ManifestError(f"{self.benchmark}: image folder not found under {self.root}: expected one of {names}")

    def _register(self, path: Path) -> bytes:
        data = path.read_bytes()
        self.hashes[self.rel(path)] = hashlib.sha256(data).hexdigest()
        return data

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def read_json(self, path: Path) -> Any:
        data = self._register(path)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: invalid JSON: {exc}") from exc

    def read_jsonl(self, path: Path) -> list[Any]:
        data = self._register(path)
        rows = []
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}: line {lineno}: invalid JSON: {exc}") from exc
        return rows

    def read_csv(self, path: Path, *, header: Sequence[str] | None = None, min_header: Sequence[str] = ()) -> list[dict[str, str]]:
        """RFC-4180 CSV with nothing stripped. ``header`` must match exactly; ``min_header`` must be present."""
        data = self._register(path)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{path}: not UTF-8: {exc}") from exc
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            found = next(reader)
        except StopIteration:
            raise ManifestError(f"{path}: empty file, expected a header row") from None
        if header is not None and list(found) != list(header):
            raise ManifestError(f"{path}: header {found!r} does not match the expected {list(header)!r}")
        absent = [name for name in min_header if name not in found]
        if absent:
            raise ManifestError(f"{path}: header {found!r} lacks column(s) {absent!r}")
        rows = []
        for lineno, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(found):
                raise ManifestError(f"{path}: row {lineno}: {len(values)} fields, header has {len(found)}")
            rows.append(dict(zip(found, values, strict=True)))
        return rows

    def image(self, rel: str, *, where: str, under: str | None = None) -> str:
        """Resolve an image reference relative to the root (or to the folder ``under``, which it may not leave).

        The file must exist and the reference must stay inside the root. Returns the normalised POSIX path relative
        to the root. ``where`` names the file and row for errors.
        """
        if under is not None:
            if not isinstance(rel, str) or not rel:
                raise ManifestError(f"{where}: image reference {rel!r} is not a non-empty string")
            joined = posixpath.normpath(posixpath.join(under, rel))
            if rel.startswith("/") or not joined.startswith(under.rstrip("/") + "/"):
                raise ManifestError(f"{where}: image path {rel!r} escapes {under}/")
            rel = joined
        return resolve_image(self.root, rel, where=where)


def resolve_image(root: Path, rel: str, *, where: str) -> str:
    """Lexical guard: the reference, normalised, must stay below the root (no absolute paths, no ``..`` escape).

    Symlinks placed by the user (a shared ``val2017/`` linked into several dataset roots) are followed on purpose:
    the guard is about what annotation files may point at, not about how the user arranges their disks.
    """
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{where}: image reference {rel!r} is not a non-empty string")
    if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or "\\" in rel:
        raise ManifestError(f"{where}: image path {rel!r} is absolute or not POSIX; it must be relative to the root")
    normalised = posixpath.normpath(rel)
    if normalised == ".." or normalised.startswith("../") or normalised == ".":
        raise ManifestError(f"{where}: image path {rel!r} resolves outside the dataset root {root}")
    if not (root / normalised).is_file():
        raise ManifestError(f"{where}: image {rel!r} not found under {root}")
    return normalised
