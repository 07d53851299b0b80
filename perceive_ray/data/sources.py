"""Reading benchmark annotation files: hashing, strict CSV/JSON/JSONL parsing, safe image-path resolution.

Every failure is a ManifestError that names the file and, where there is one, the row or key.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Callable, Sequence
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
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        self.hashes[self.rel(path)] = hashlib.sha256(data).hexdigest()
        return data

    def rel(self, path: Path) -> str:
        """``path`` relative to the root, lexically: a symlinked file or folder under the root keeps its name."""
        try:
            return posixpath.normpath(path.relative_to(self.root).as_posix())
        except ValueError:  # not below the root (callers pass root / candidate): keep the full path
            return path.as_posix()

    def _text(self, path: Path, data: bytes) -> str:
        """UTF-8 (a leading BOM, which real exports carry, is dropped); invalid bytes are located by line."""
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raw = bytes(exc.object)
            line = raw[: exc.start].count(b"\n") + 1
            raise ManifestError(
                f"{path}: line {line}: not UTF-8: byte {raw[exc.start:exc.start + 1]!r} ({exc.reason})"
            ) from exc

    def read_json(self, path: Path) -> Any:
        """One JSON document. Duplicate keys and unpaired surrogates are errors located by row/key and field."""
        text = self._text(path, self._register(path))
        if not text.strip():
            raise ManifestError(f"{path}: empty file, expected a JSON document")
        data = _loads(text, where=f"{path}")
        _check_json(data, where=f"{path}", row_kind="row")
        return data

    def read_jsonl(self, path: Path) -> list[Any]:
        """JSON Lines: one value per ``\\n``-terminated line (CRLF accepted); blank lines are skipped."""
        text = self._text(path, self._register(path))
        rows = []
        # Only \n separates records: str.splitlines would also split at U+2028 and friends, which JSON strings
        # may hold unescaped.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip(" \t\r"):
                continue
            record = _loads(line, where=f"{path}: line {lineno}")
            _check_json(record, where=f"{path}: line {lineno} (row {len(rows)})", row_kind=None)
            rows.append(record)
        if not rows:
            raise ManifestError(f"{path}: empty file, expected one JSON object a line")
        return rows

    def read_csv(
        self,
        path: Path,
        *,
        header: Sequence[str] | None = None,
        min_header: Sequence[str] = (),
        row_label: Callable[[int], str] | None = None,
    ) -> list[dict[str, str]]:
        """RFC-4180 CSV with nothing stripped. ``header`` must match exactly; ``min_header`` must be present.

        ``row_label`` maps the 0-based data-row index to the adapter's name for it (e.g. ``data row 3``), used
        in errors together with the physical line; without it, errors say ``row N`` with the header as row 1.
        """
        text = self._text(path, self._register(path))
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            found = next(reader)
        except StopIteration:
            raise ManifestError(f"{path}: empty file, expected a header row") from None
        except csv.Error as exc:
            raise ManifestError(f"{path}: line 1 (header): malformed CSV: {exc}") from exc
        if not found:
            raise ManifestError(f"{path}: line 1: empty header row")
        if header is not None and list(found) != list(header):
            missing = [name for name in header if name not in found]
            unexpected = [name for name in found if name not in header]
            detail = "".join(
                [
                    f"; missing column(s) {missing!r}" if missing else "",
                    f"; unexpected column(s) {unexpected!r}" if unexpected else "",
                    "" if missing or unexpected else "; columns out of order or repeated",
                ]
            )
            raise ManifestError(f"{path}: header {found!r} does not match the expected {list(header)!r}{detail}")
        absent = [name for name in min_header if name not in found]
        if absent:
            raise ManifestError(f"{path}: header {found!r} lacks column(s) {absent!r}")
        repeated = sorted({name for name in found if found.count(name) > 1})
        if repeated:
            raise ManifestError(f"{path}: header {found!r} repeats column(s) {repeated!r}")
        rows: list[dict[str, str]] = []
        recno = 1
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                label = row_label(len(rows)) if row_label else f"row {recno + 1}"
                raise ManifestError(f"{path}: {label} (line {start}): malformed CSV: {exc}") from exc
            recno += 1
            if not values:
                continue
            if len(values) != len(found):
                label = f"{row_label(len(rows))} (line {start})" if row_label else f"row {recno}"
                if len(values) < len(found):
                    detail = f"no value for column(s) {', '.join(found[len(values):])}"
                else:
                    detail = f"{len(values) - len(found)} value(s) beyond the last column {found[-1]}"
                raise ManifestError(f"{path}: {label}: {len(values)} fields, header has {len(found)}; {detail}")
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


def describe(value: Any) -> str:
    """A short, one-line description of a JSON value for error messages (type and a clipped repr)."""
    kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kinds.get(type(value), type(value).__name__)} ({text})"


def check_fields(record: Any, fields: Sequence[str], *, where: str) -> dict[str, Any]:
    """``record`` must be a JSON object holding every name in ``fields`` (extra keys are fine)."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected an object with {', '.join(fields)}, got {describe(record)}")
    missing = [name for name in fields if name not in record]
    if missing:
        keys = [repr(k) for k in record][:12]
        raise ManifestError(
            f"{where}: missing field(s) {', '.join(missing)} (the object has {', '.join(keys) or 'no keys'})"
        )
    return record


class _DuplicateKeys(dict):
    """A parsed JSON object that repeated a key (``json`` keeps the last value silently)."""

    duplicate: str = ""


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    marked = _DuplicateKeys(out)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.duplicate = key
            break
        seen.add(key)
    return marked


def _loads(text: str, *, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except RecursionError:
        raise ManifestError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers beyond Python's digit limit
        raise ManifestError(f"{where}: invalid JSON: {exc}") from exc


def _check_json(data: Any, *, where: str, row_kind: str | None) -> None:
    """Reject repeated keys and strings that are not valid Unicode (unpaired surrogates), naming where.

    ``row_kind`` names the top level: ``row`` for an array's elements / ``key`` for an object's members.
    """
    try:
        problem = _find_problem(data, [])
    except RecursionError:
        raise ManifestError(f"{where}: invalid JSON: nested too deeply") from None
    if problem is None:
        return
    trail, what = problem
    parts = []
    for depth, step in enumerate(trail):
        if depth == 0 and row_kind is not None:
            parts.append(f"row {step}" if isinstance(step, int) else f"key {step!r}")
        else:
            parts.append(f"[{step}]" if isinstance(step, int) else f"field {step!r}")
    location = ": ".join([where, *parts])
    raise ManifestError(f"{location}: {what}")


def _find_problem(value: Any, trail: list[Any]) -> tuple[list[Any], str] | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return trail, f"string {value!r} is not valid Unicode (unpaired surrogate escape)"
        return None
    if isinstance(value, dict):
        if isinstance(value, _DuplicateKeys):
            return trail, f"key {value.duplicate!r} appears more than once in one object"
        for key, item in value.items():
            found = _find_problem(key, [*trail, key]) or _find_problem(item, [*trail, key])
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_problem(item, [*trail, index])
            if found:
                return found
    return None
