"""LLaVA-1.5 training JSON (LCS-558K, mix-665K) -> validated samples, a memory-mapped sample table, keyed draws.

PROTOCOLS §5.1 (CLIP fine-tuning), §5.2 (PACL) and §5.4 (SPARC) train on the same two files:

- ``load_llava_source`` reads one JSON array and validates every row BEFORE any training starts (malformed JSON,
  rows, conversations, image paths escaping the image root, missing image files). Errors are ``LlavaDataError``
  (a ``ConfigError``) naming the file, the row index and the record ``id``.
- ``write_sample_table`` / ``open_sample_table`` / ``take_samples``: one Arrow IPC file, memory-mapped by every
  worker, so 1.2M samples never sit in per-worker Python objects.
- ``draw_caption``, ``make_hard_negative``, ``augment_pacl_caption``: pure, deterministic text draws keyed by
  (seed, epoch, sample key, purpose) (§0), independent of Ray worker count and order.
- ``epoch_order`` / ``rank_rows``: the epoch plan; rank r of R takes a contiguous slice of the global batch, so the
  union over ranks of a step is the single-process global batch whatever R is.
- ``decode_train_images``: the seeded train transforms (OpenCLIP's ``clip_train`` and PACL's ``pacl_train``) for
  Ray Data CPU tasks; a bad image file gives ``ok=False``, never an exception.

Layering (tests/unit/test_import_graph.py): ``data`` imports nothing of ours but ``perceive_ray.config``, so the
keyed generator of ``perceive_ray.randomness`` is repeated here (``_keyed_seed``; a test pins the two equal) and
the crop draw of ``models.clip.SeededRandomResizedCrop`` is repeated in ``ClipTrainTransform`` (same torchvision
algorithm; a test pins them equal). torch/torchvision/PIL are imported only inside the image functions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from perceive_ray.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

Format = Literal["pretrain", "mix"]
CaptionTurn = Literal["random", "first"]
FORMATS: tuple[str, ...] = ("pretrain", "mix")
CAPTION_TURNS: tuple[str, ...] = ("random", "first")
ROLES = ("human", "gpt")
MAX_LISTED = 5  # rows quoted in one error message

# §5.1 hard negatives: checked in this exact order; the first key found has all its occurrences replaced.
HARD_NEGATIVE_SWAPS: tuple[tuple[str, str], ...] = (
    ("on the left", "on the right"),
    ("on the right", "on the left"),
    ("to the left", "to the right"),
    ("to the right", "to the left"),
    ("at the left", "at the right"),
    ("at the right", "at the left"),
)
# §5.2 noun-chunk templates (exact strings).
PACL_TEMPLATES: tuple[str, ...] = (
    "a picture of {}.",
    "itap of {}.",
    "a photograph of {}.",
    "this picture contains {}.",
    "a good photo of {}.",
)
PACL_AUGMENT_PROBABILITY = 0.5
SPACY_MODEL = "en_core_web_sm"
SPACY_INSTALL = "pip install spacy && python -m spacy download en_core_web_sm"
PACL_AUGMENT_KEY = "data.pacl_augment"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_TRAIN_SCALE = (0.9, 1.0)  # open_clip image_transform(is_train=True) default
CLIP_TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default
PACL_BRIGHTNESS = 0.2
PACL_HUE = 0.1

TABLE_COLUMNS = ("key", "source", "row", "id", "image", "human_turns", "gpt_turns")
TABLE_VERSION = "1"
META_VERSION = b"perceive_ray.llava_table_version"
META_SHA256 = b"perceive_ray.llava_table_sha256"
TABLE_BATCH_ROWS = 65536


class LlavaDataError(ConfigError):
    """A LLaVA training file or its images are wrong; the message names the file, the row index and the id."""


# ---------------------------------------------------------------------------------------------------------------
# Keyed randomness (the same bytes as perceive_ray.randomness, which `data` may not import).


def _keyed_seed(seed: int, *keys: object) -> int:
    """= ``perceive_ray.randomness.keyed_seed``: a 64-bit seed from SHA-256 of (seed, keys)."""
    text = "\x1f".join([str(int(seed)), *(repr(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _keyed_rng(seed: int, *keys: object) -> np.random.Generator:
    """= ``perceive_ray.randomness.keyed_rng``: an independent Philox generator for one (seed, keys) tuple."""
    return np.random.Generator(np.random.Philox(key=_keyed_seed(seed, *keys)))


def augment_seed(seed: int, epoch: int, key: str, purpose: str) -> int:
    """The torch generator seed of one image augmentation: keyed by (seed, epoch, sample key, purpose) (§0)."""
    return _keyed_seed(seed, int(epoch), str(key), purpose)


# ---------------------------------------------------------------------------------------------------------------
# Samples and validation


@dataclass(frozen=True)
class LlavaSource:
    """One LLaVA JSON file: ``name`` prefixes the sample keys; ``image`` paths are relative to ``image_root``.

    ``format="pretrain"`` (LCS-558K): every row has an image and exactly one human + one gpt turn.
    ``format="mix"`` (mix-665K): multi-turn; rows without ``image`` are text-only samples.
    ``limit``: only the first N rows (smoke runs). The field names are those of the training config's
    ``data.sources[]`` entries, so ``LlavaSource(**entry.model_dump())`` works.
    """

    name: str
    path: str | Path
    image_root: str | Path
    format: Format
    limit: int | None = None


@dataclass(frozen=True)
class Sample:
    """One validated record. ``human_turns[i]`` precedes ``gpt_turns[i]`` in the conversation."""

    key: str  # f"{source}:{row}": stable and unique across sources
    source: str
    row: int  # index in the JSON array
    id: str | None  # the record's ``id`` (not unique in the real mix-665K)
    image: str | None  # absolute path, or None for a text-only row
    human_turns: tuple[str, ...]
    gpt_turns: tuple[str, ...]

    @property
    def text_only(self) -> bool:
        return self.image is None

    @property
    def conversations(self) -> list[tuple[str, str]]:
        """The (from, value) turns in order."""
        turns: list[tuple[str, str]] = []
        for i, human in enumerate(self.human_turns):
            turns.append(("human", human))
            if i < len(self.gpt_turns):
                turns.append(("gpt", self.gpt_turns[i]))
        return turns


def _where(path: Path, row: int, rid: object = None) -> str:
    return f"{path}: row {row}" + (f" (id {rid!r})" if rid is not None else "")


def _read_json(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LlavaDataError(f"{path}: LLaVA JSON file not found") from None
    except OSError as exc:
        raise LlavaDataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LlavaDataError(f"{path}: line {line} (byte {exc.start}): not UTF-8 ({exc.reason})") from exc
    del data  # the 665K file is ~1 GB: do not hold the bytes and the text at once while parsing
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LlavaDataError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}"
        ) from exc


def _check_image_ref(image: object) -> str | None:
    """The problem with an ``image`` value (relative POSIX path under the root), or None."""
    if not isinstance(image, str):
        return f"'image' must be a string path, got {type(image).__name__}"
    if not image or "\x00" in image:
        return f"'image' {image!r} is empty or contains NUL"
    if image.startswith(("/", "\\")) or PurePosixPath(image).is_absolute() or (len(image) > 1 and image[1] == ":"):
        return f"'image' {image!r} is an absolute path; it must be relative to the image root"
    if ".." in PurePosixPath(image.replace("\\", "/")).parts:
        return f"'image' {image!r} escapes the image root ('..')"
    return None


def _check_row(record: object, fmt: str) -> tuple[str | None, list[str], list[str], str | None]:
    """(problem, human turns, gpt turns, image) of one record; problem is None when the record is valid."""
    if not isinstance(record, dict):
        return f"a row must be a JSON object, got {type(record).__name__}", [], [], None
    rid = record.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        return f"'id' must be a string or an integer, got {type(rid).__name__}", [], [], None
    image = record.get("image")
    if "image" in record:
        problem = _check_image_ref(image)
        if problem:
            return problem, [], [], None
    elif fmt == "pretrain":
        return "no 'image': every row of a pretrain (558K) file has one", [], [], None
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        got = "missing" if "conversations" not in record else f"{type(conversations).__name__} {conversations!r:.60}"
        return f"'conversations' must be a non-empty list of turns, got {got}", [], [], None
    human: list[str] = []
    gpt: list[str] = []
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            return f"conversations[{t}] must be an object, got {type(turn).__name__}", [], [], None
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            return f"conversations[{t}]['from'] must be 'human' or 'gpt', got {role!r}", [], [], None
        if not isinstance(value, str):
            return f"conversations[{t}]['value'] must be a string, got {type(value).__name__}", [], [], None
        expected = ROLES[t % 2]
        if role != expected:
            return (f"conversations[{t}] is from {role!r} but turns must alternate human/gpt starting with human",
                    [], [], None)
        (human if role == "human" else gpt).append(value)
    if image is not None and not gpt:
        return "an image row has no gpt turn (nothing to use as its caption)", [], [], None
    if fmt == "pretrain" and (len(human), len(gpt)) != (1, 1):
        return (f"a pretrain (558K) row has exactly one human and one gpt turn, got {len(conversations)} turns",
                [], [], None)
    return None, human, gpt, image


def load_llava_source(
    path: str | Path,
    image_root: str | Path,
    *,
    source_name: str,
    fmt: Format,
    limit: int | None = None,
    check_images: bool = True,
) -> list[Sample]:
    """Validate and read one LLaVA JSON array (the first ``limit`` rows) into ``Sample``s, text-only rows included.

    Every malformed row is reported in ONE ``LlavaDataError`` (count + the first few, each with file, row index and
    id); then, with ``check_images``, every missing image file likewise. Image paths are resolved lexically under
    ``image_root`` (symlinked folders under the root are fine); absolute paths and ``..`` are refused.
    """
    path = Path(path).expanduser().absolute()
    if fmt not in FORMATS:
        raise LlavaDataError(f"{path}: unknown LLaVA format {fmt!r}; expected one of {list(FORMATS)}")
    if not source_name or ":" in source_name:
        raise LlavaDataError(f"{path}: source name {source_name!r} must be non-empty and contain no ':'")
    if limit is not None and limit < 0:
        raise LlavaDataError(f"{path}: limit must be >= 0, got {limit}")
    root = os.path.abspath(os.path.expanduser(os.fspath(image_root)))
    data = _read_json(path)
    if not isinstance(data, list):
        raise LlavaDataError(f"{path}: the top level must be a JSON array of records, got {type(data).__name__}")
    rows = data if limit is None else data[:limit]

    samples: list[Sample] = []
    problems: list[str] = []
    n_bad = 0
    for index, record in enumerate(rows):
        problem, human, gpt, image = _check_row(record, fmt)
        rid = record.get("id") if isinstance(record, dict) else None
        if problem:
            n_bad += 1
            if len(problems) < MAX_LISTED:
                problems.append(f"{_where(path, index, rid)}: {problem}")
            continue
        samples.append(
            Sample(
                key=f"{source_name}:{index}",
                source=source_name,
                row=index,
                id=None if rid is None else str(rid),
                image=None if image is None else os.path.normpath(os.path.join(root, image)),
                human_turns=tuple(human),
                gpt_turns=tuple(gpt),
            )
        )
    if n_bad:
        more = f"\n  ... and {n_bad - len(problems)} more" if n_bad > len(problems) else ""
        raise LlavaDataError(
            f"{path}: {n_bad} malformed row(s) of {len(rows)}:\n  " + "\n  ".join(problems) + more
        )
    if check_images:
        check_images_exist(samples, path, root)
    return samples


def check_images_exist(samples: Sequence[Sample], path: str | Path, image_root: str | Path) -> None:
    """One ``LlavaDataError`` with the count and the first few missing image files (file, row, id, path)."""
    missing = [s for s in samples if s.image is not None and not os.path.isfile(s.image)]
    if not missing:
        return
    shown = "\n  ".join(f"{_where(Path(path), s.row, s.id)}: {s.image}" for s in missing[:MAX_LISTED])
    more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    n_images = sum(s.image is not None for s in samples)
    raise LlavaDataError(
        f"{path}: {len(missing)} of {n_images} image file(s) missing under image root {image_root}:\n  {shown}{more}"
    )


def drop_text_only(samples: Iterable[Sample]) -> tuple[list[Sample], int]:
    """(image samples, number of text-only samples dropped): CLIP/PACL/SPARC training keeps image rows only (§5.1)."""
    kept: list[Sample] = []
    dropped = 0
    for sample in samples:
        if sample.image is None:
            dropped += 1
        else:
            kept.append(sample)
    return kept, dropped


@dataclass(frozen=True)
class LoadedSamples:
    """Samples of several sources in source order, with per-source counts for the run record."""

    samples: list[Sample]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> rows, kept, text_only_dropped


def load_llava_sources(
    sources: Sequence[LlavaSource],
    *,
    require_image: bool = True,
    check_images: bool = True,
) -> LoadedSamples:
    """Load several sources (distinct names) in order; ``require_image`` drops text-only rows and counts them."""
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LlavaDataError(f"LLaVA source names must be distinct (they prefix sample keys): {duplicates}")
    samples: list[Sample] = []
    counts: dict[str, dict[str, int]] = {}
    for source in sources:
        loaded = load_llava_source(source.path, source.image_root, source_name=source.name, fmt=source.format,
                                   limit=source.limit, check_images=check_images)
        kept, dropped = drop_text_only(loaded) if require_image else (loaded, 0)
        if dropped:
            log.info("%s: dropped %d text-only sample(s) of %d", source.path, dropped, len(loaded))
        counts[source.name] = {"rows": len(loaded), "kept": len(kept), "text_only_dropped": dropped}
        samples.extend(kept)
    return LoadedSamples(samples=samples, counts=counts)


# ---------------------------------------------------------------------------------------------------------------
# Columnar sample table (Arrow IPC, memory-mapped)


def _schema(pa_mod: Any) -> pa.Schema:
    return pa_mod.schema(
        [
            ("key", pa_mod.string()),
            ("source", pa_mod.string()),
            ("row", pa_mod.int64()),
            ("id", pa_mod.string()),
            ("image", pa_mod.string()),
            ("human_turns", pa_mod.list_(pa_mod.string())),
            ("gpt_turns", pa_mod.list_(pa_mod.string())),
        ]
    )


def _batch(pa_mod: Any, schema: pa.Schema, chunk: Sequence[Sample]) -> pa.RecordBatch:
    return pa_mod.record_batch(
        [
            pa_mod.array([s.key for s in chunk], pa_mod.string()),
            pa_mod.array([s.source for s in chunk], pa_mod.string()),
            pa_mod.array([s.row for s in chunk], pa_mod.int64()),
            pa_mod.array([s.id for s in chunk], pa_mod.string()),
            pa_mod.array([s.image for s in chunk], pa_mod.string()),
            pa_mod.array([list(s.human_turns) for s in chunk], pa_mod.list_(pa_mod.string())),
            pa_mod.array([list(s.gpt_turns) for s in chunk], pa_mod.list_(pa_mod.string())),
        ],
        schema=schema,
    )


def _hash_rows(digest: Any, rows: Iterable[dict[str, Any]]) -> None:
    for r in rows:
        record = [r["key"], r["source"], r["row"], r["id"], r["image"], list(r["human_turns"]), list(r["gpt_turns"])]
        digest.update(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")


def sample_table_sha256(table: pa.Table) -> str:
    """SHA-256 of the table's content in row order (one canonical JSON line per row; independent of the Arrow
    version and chunking). Row order is included because the epoch plan indexes rows by position."""
    digest = hashlib.sha256()
    for batch in table.select(list(TABLE_COLUMNS)).to_batches():
        _hash_rows(digest, batch.to_pylist())
    return digest.hexdigest()


def write_sample_table(samples: Sequence[Sample], path: str | Path) -> str:
    """Write ``samples`` (in order) as one Arrow IPC file at ``path`` (atomically); returns the content SHA-256,
    which is also stored in the schema metadata (``table_sha256``)."""
    import pyarrow as pa

    keys = set()
    for s in samples:
        if s.key in keys:
            raise LlavaDataError(f"{path}: duplicate sample key {s.key!r}")
        keys.add(s.key)
    digest = hashlib.sha256()
    for start in range(0, len(samples), TABLE_BATCH_ROWS):
        _hash_rows(digest, (
            {"key": s.key, "source": s.source, "row": s.row, "id": s.id, "image": s.image,
             "human_turns": s.human_turns, "gpt_turns": s.gpt_turns}
            for s in samples[start:start + TABLE_BATCH_ROWS]
        ))
    sha = digest.hexdigest()
    schema = _schema(pa).with_metadata({META_VERSION: TABLE_VERSION.encode(), META_SHA256: sha.encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start in range(0, len(samples), TABLE_BATCH_ROWS):
                writer.write_batch(_batch(pa, schema, samples[start:start + TABLE_BATCH_ROWS]))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return sha


def open_sample_table(path: str | Path, *, verify: bool = False) -> pa.Table:
    """The sample table, memory-mapped (zero-copy: pages are shared by every worker on a node).

    ``verify`` recomputes the content hash and compares it with the one stored at write time.
    """
    import pyarrow as pa

    path = Path(path)
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except FileNotFoundError:
        raise LlavaDataError(f"{path}: sample table not found") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise LlavaDataError(f"{path}: not a readable Arrow IPC sample table: {exc}") from exc
    meta = table.schema.metadata or {}
    if meta.get(META_VERSION) != TABLE_VERSION.encode():
        raise LlavaDataError(f"{path}: not a LLaVA sample table of version {TABLE_VERSION} (metadata {meta!r:.200})")
    if not _schema(pa).equals(table.schema, check_metadata=False):
        raise LlavaDataError(f"{path}: sample table schema {table.schema} differs from {_schema(pa)}")
    if verify:
        actual = sample_table_sha256(table)
        if actual != table_sha256(table):
            raise LlavaDataError(f"{path}: content hash {actual} differs from the stored {table_sha256(table)}")
    return table


def table_sha256(table: pa.Table) -> str:
    """The content hash stored in the table's metadata at write time (for the run record)."""
    return (table.schema.metadata or {}).get(META_SHA256, b"").decode()


def take_samples(table: pa.Table, indices: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
    """Rows ``indices`` (in that order) as dicts with the table's columns."""
    import pyarrow as pa

    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= table.num_rows):
        raise IndexError(f"sample index out of range [0, {table.num_rows}): {idx.min()}..{idx.max()}")
    return table.take(pa.array(idx, pa.int64())).to_pylist()


# ---------------------------------------------------------------------------------------------------------------
# Keyed text draws


def draw_caption(gpt_turns: Sequence[str], *, seed: int, epoch: int, key: str, mode: CaptionTurn = "random") -> str:
    """The training caption: a uniformly random gpt turn, redrawn each epoch (§5.1; keyed by seed, epoch, key),
    or the first gpt turn (``mode="first"``: §5.2's 558K ``conversations[1]``)."""
    if not gpt_turns:
        raise ValueError(f"sample {key!r} has no gpt turn to use as a caption")
    if mode == "first":
        return gpt_turns[0]
    if mode != "random":
        raise ValueError(f"caption turn mode must be one of {list(CAPTION_TURNS)}, got {mode!r}")
    rng = _keyed_rng(seed, int(epoch), str(key), "caption")
    return gpt_turns[int(rng.integers(len(gpt_turns)))]


def make_hard_negative(caption: str) -> str | None:
    """§5.1 ``leftright``: the first key (in order) found as a case-sensitive substring has ALL its occurrences
    replaced; None when no key occurs."""
    for old, new in HARD_NEGATIVE_SWAPS:
        if old in caption:
            return caption.replace(old, new)
    return None


Chunker = Callable[[str], Sequence[str]]


def augment_pacl_caption(caption: str, *, seed: int, epoch: int, key: str, chunker: Chunker) -> str:
    """§5.2: with probability ½ (keyed coin), and only if ``chunker`` finds noun chunks, a random chunk, lowercased,
    in a random template of ``PACL_TEMPLATES``; otherwise ``caption`` unchanged.

    The coin, the chunk and the template are separate keyed draws (purposes ``pacl_coin``/``pacl_chunk``/
    ``pacl_template``), so a different chunker changes only which chunk is picked. The chunker runs only when the
    coin says augment.
    """
    epoch, key = int(epoch), str(key)
    if _keyed_rng(seed, epoch, key, "pacl_coin").random() >= PACL_AUGMENT_PROBABILITY:
        return caption
    chunks = list(chunker(caption))
    if not chunks:
        return caption
    chunk = chunks[int(_keyed_rng(seed, epoch, key, "pacl_chunk").integers(len(chunks)))]
    template = PACL_TEMPLATES[int(_keyed_rng(seed, epoch, key, "pacl_template").integers(len(PACL_TEMPLATES)))]
    return template.format(chunk.lower())


def load_spacy_chunker(model: str = SPACY_MODEL) -> Chunker:
    """A noun-chunk finder ``text -> [chunk.text, ...]`` from spaCy ``model`` (imported here, lazily)."""
    how = f"install it with `{SPACY_INSTALL}`" + (
        f" (model {model!r} instead of {SPACY_MODEL!r})" if model != SPACY_MODEL else "")
    try:
        import spacy
    except ImportError as exc:
        raise LlavaDataError(
            f"{PACL_AUGMENT_KEY}: PACL caption augmentation needs the spaCy package, which is not installed; "
            f"{how}, or set {PACL_AUGMENT_KEY}=false"
        ) from exc
    try:
        nlp = spacy.load(model)
    except OSError as exc:
        raise LlavaDataError(
            f"{PACL_AUGMENT_KEY}: the spaCy model {model!r} is not installed ({exc}); {how}, "
            f"or set {PACL_AUGMENT_KEY}=false"
        ) from exc

    def chunker(text: str) -> list[str]:
        return [chunk.text for chunk in nlp(text).noun_chunks]

    return chunker


# ---------------------------------------------------------------------------------------------------------------
# Epoch plan


@functools.lru_cache(maxsize=4)
def _order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    order = _keyed_rng(seed, "order", epoch).permutation(num_samples)
    order.setflags(write=False)
    return order


def epoch_order(num_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of sample indices (``keyed_rng(seed, "order", epoch)``; read-only, cached)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return _order(int(num_samples), int(seed), int(epoch))


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}")
    return int(num_samples) // int(global_batch)


def global_batch_rows(num_samples: int, *, seed: int, epoch: int, step: int, global_batch: int) -> np.ndarray:
    """Sample indices of the global batch at ``step``: ``epoch_order[step*G:(step+1)*G]``."""
    steps = steps_per_epoch(num_samples, global_batch)
    if not 0 <= step < steps:
        raise ValueError(f"step {step} out of range: {num_samples} samples / global batch {global_batch} = "
                         f"{steps} step(s) per epoch")
    return epoch_order(num_samples, seed=seed, epoch=epoch)[step * global_batch:(step + 1) * global_batch]


def rank_rows(
    num_samples: int, *, seed: int, epoch: int, step: int, global_batch: int, world_size: int, rank: int
) -> np.ndarray:
    """Rank ``rank``'s contiguous slice ``[r*G/R, (r+1)*G/R)`` of the step's global batch (G divisible by R)."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    rows = global_batch_rows(num_samples, seed=seed, epoch=epoch, step=step, global_batch=global_batch)
    return rows[rank * per_rank:(rank + 1) * per_rank]


# ---------------------------------------------------------------------------------------------------------------
# Seeded train transforms and image decoding (torch/torchvision/PIL imported lazily)

TrainTransform = Callable[["Image.Image", "torch.Generator"], "torch.Tensor"]
Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    """(height, width) of an int or (H, W) size (the ``ImageTransformSpec.size`` convention)."""
    if isinstance(size, int):
        return int(size), int(size)
    height, width = (int(v) for v in size)
    return height, width


def random_resized_crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``, call for call, drawing from ``generator``."""
    import torch

    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = float(width) / float(height)  # fallback: central crop within the ratio bounds
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ClipTrainTransform:
    """OpenCLIP's train transform, seeded: RandomResizedCrop(S, scale=(0.9, 1), bicubic, antialias) -> RGB ->
    ToTensor -> Normalize(mean, std). Same order as ``open_clip.image_transform(is_train=True)`` (crop, then
    convert); the crop draw is torchvision's algorithm on the given generator."""

    purpose = "crop"

    def __init__(self, size: Size, mean: Sequence[float], std: Sequence[float], *,
                 scale: tuple[float, float] = CLIP_TRAIN_SCALE, ratio: tuple[float, float] = CLIP_TRAIN_RATIO):
        self.size = _hw(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = scale
        self.ratio = ratio

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        width, height = image.size
        i, j, h, w = random_resized_crop_params(width, height, self.scale, self.ratio, generator)
        crop = F.resized_crop(image, i, j, h, w, list(self.size), InterpolationMode.BICUBIC, antialias=True)
        return F.normalize(F.to_tensor(crop.convert("RGB")), list(self.mean), list(self.std))


class PaclTrainTransform:
    """§5.2: RGB -> Resize((S, S)) on PIL (bilinear, antialiased) -> ToTensor -> ColorJitter(brightness 0.2,
    hue 0.1) -> ImageNet Normalize.

    The jitter repeats torchvision ``ColorJitter.forward`` on the given generator: ``randperm(4)`` (the order of
    brightness/contrast/saturation/hue = 0/1/2/3), then the brightness factor U(0.8, 1.2), then the hue factor
    U(-0.1, 0.1); brightness and hue are applied in the permutation's order (contrast/saturation are off). With a
    generator seeded like torch's global RNG it gives torchvision's ColorJitter output exactly.
    """

    purpose = "color_jitter"

    def __init__(self, size: Size, *, brightness: float = PACL_BRIGHTNESS, hue: float = PACL_HUE,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.size = _hw(size)
        self.brightness = (max(0.0, 1.0 - brightness), 1.0 + brightness)
        self.hue = (-hue, hue)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def jitter_params(self, generator: torch.Generator) -> tuple[list[int], float, float]:
        """(application order of the four jitter ops, brightness factor, hue factor)."""
        import torch

        order = [int(i) for i in torch.randperm(4, generator=generator)]
        b = float(torch.empty(1).uniform_(self.brightness[0], self.brightness[1], generator=generator))
        h = float(torch.empty(1).uniform_(self.hue[0], self.hue[1], generator=generator))
        return order, b, h

    def jitter(self, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torchvision.transforms.functional as F

        order, b, h = self.jitter_params(generator)
        for op in order:
            if op == 0:
                tensor = F.adjust_brightness(tensor, b)
            elif op == 3:
                tensor = F.adjust_hue(tensor, h)
        return tensor

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        image = F.resize(image.convert("RGB"), list(self.size), InterpolationMode.BILINEAR, antialias=True)
        tensor = self.jitter(F.to_tensor(image), generator)
        return F.normalize(tensor, list(self.mean), list(self.std))


def build_train_transform(
    name: str, image_size: Size, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> TrainTransform:
    """``"clip_train"`` (needs the model's mean/std) or ``"pacl_train"`` (ImageNet statistics unless given);
    ``image_size`` is S or (H, W)."""
    if name == "clip_train":
        if mean is None or std is None:
            raise ValueError("clip_train needs the model's mean and std")
        return ClipTrainTransform(image_size, mean, std)
    if name == "pacl_train":
        return PaclTrainTransform(image_size, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)
    raise ValueError(f"unknown train transform {name!r}; expected 'clip_train' or 'pacl_train'")


def _image_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode_train_images(
    paths: Sequence[str | None],
    *,
    keys: Sequence[str],
    seed: int,
    epoch: int,
    transform: str | TrainTransform,
    image_size: Size,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    purpose: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (B, 3, H, W) pixels, bool ok mask) for one batch, each image augmented with a torch generator
    seeded by ``augment_seed(seed, epoch, key, purpose)`` (purpose: the transform's ``purpose``, e.g. ``"crop"``).

    ``transform`` is ``"clip_train"``/``"pacl_train"`` (built with ``image_size`` = S or (H, W), ``mean``, ``std``)
    or any callable ``(PIL image, torch.Generator) -> (3, H, W) tensor``. A missing, unreadable or undecodable file (or a None path)
    gives ``ok=False`` and zero pixels, never an exception; the caller drops or counts those rows.
    """
    import torch
    from PIL import Image

    if len(paths) != len(keys):
        raise ValueError(f"{len(paths)} paths but {len(keys)} keys")
    fn = build_train_transform(transform, image_size, mean, std) if isinstance(transform, str) else transform
    purpose = purpose or getattr(fn, "purpose", "augment")
    height, width = _hw(image_size)
    out = np.zeros((len(paths), 3, height, width), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    errors = _image_errors()
    first_error = None
    for b, (path, key) in enumerate(zip(paths, keys, strict=True)):
        if path is None:
            continue
        generator = torch.Generator().manual_seed(augment_seed(seed, epoch, key, purpose))
        try:
            with Image.open(path) as image:
                image.load()
                tensor = fn(image, generator)
        except errors as exc:
            first_error = first_error or f"{path}: {type(exc).__name__}: {exc}"
            continue
        if tuple(tensor.shape) != (3, height, width):
            raise ValueError(f"transform gave shape {tuple(tensor.shape)} for {path}, expected (3, {height}, {width})")
        out[b] = tensor.detach().to(torch.float32).numpy()
        ok[b] = True
    if first_error is not None:
        log.warning("%d of %d image(s) could not be decoded; first: %s", int((~ok).sum()), len(paths), first_error)
    return out, ok
