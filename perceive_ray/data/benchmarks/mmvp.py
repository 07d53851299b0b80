"""MMVP and MMVP-VLM adapters: statement CSVs + image folders -> one 2x2 item per pair (PROTOCOLS §1.3-1.4).

Dataset roots:
- ``mmvp``: ``MMVP Images/{q}.jpg`` (or ``MMVP_Images/``), ``Questions.csv`` (``Index,Question,Options,Correct
  Answer``) and the reference's converted statements ``Questions-clip.csv`` (``Question ID,Type,Statement``).
- ``mmvp_vlm``: ``MLLM_VLM Images/<Type>/<Question ID>.jpg`` (or ``MLLM_VLM_Images``, ``MMVP_VLM_Images``),
  ``Questions.csv`` (``Question ID,Type,Statement``) and optionally the reference's ``Questions-llava.csv``.

Rows (2k-1, 2k) form pair k (item_id ``str(k)``): images = the two rows' images, texts = ``'a photo of ' +
statement`` for the two rows, byte-exact (statement 249 of MMVP ends with a space). Ground truth is text j <->
image j; the MMVP errata swap is applied by the metric, never here. Row numbers in messages are 1-based *data*
rows (the header is not counted), which is how upstream numbers them ("rows 99/100").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceive_ray.data.manifest import Item, Manifest, ManifestError, check_size
from perceive_ray.data.sources import SourceFiles

TEXT_PREFIX = "a photo of "

MMVP_QUESTIONS_HEADER = ("Index", "Question", "Options", "Correct Answer")
STATEMENTS_HEADER = ("Question ID", "Type", "Statement")
# "lndex" (lower-case L) is the upstream typo; the file is read positionally anyway.
LLAVA_HEADER = ("lndex", "Question", "Options", "Correct Answer")

MMVP_IMAGE_DIRS = ("MMVP Images", "MMVP_Images")
MMVP_VLM_IMAGE_DIRS = ("MLLM_VLM Images", "MLLM_VLM_Images", "MMVP_VLM_Images")
# The reference keeps its converted files in additional_questions/; users copy them into the dataset root.
# Accepting the sub-folder too is a convenience choice ([U] in spirit: the brief names only the root).
MMVP_STATEMENT_FILES = ("Questions-clip.csv", "additional_questions/Questions-clip.csv")
LLAVA_FILES = ("Questions-llava.csv", "additional_questions/Questions-llava.csv")

MMVP_ROWS, MMVP_PAIRS = 300, 150
MMVP_VLM_ROWS, MMVP_VLM_PAIRS = 270, 135
PAIRS_PER_CATEGORY = 15

# Type (= image sub-folder) -> (category slug used in metric keys, reported display name), in the reference's
# row-block order: pair p (0-based) belongs to block p // 15. The Type <-> name pairing is [U] (PROTOCOLS
# §1.4); the block rule is asserted against Type on full-size files.
MMVP_VLM_CATEGORIES: dict[str, tuple[str, str]] = {
    "Orientation": ("orientation", "Orientation and Direction"),
    "Presence": ("presence", "Presence of Specific Features"),
    "State": ("state", "State and Condition"),
    "Quantity": ("quantity", "Quantity and Count"),
    "Spatial": ("spatial", "Positional and Relational Context"),
    "Color": ("color", "Color and Appearance"),
    "Structural Character": ("structural_character", "Structural Characteristics"),
    "Text": ("text", "Texts"),
    "Camera Perspective": ("camera_perspective", "Viewpoint and Perspective"),
}
CATEGORY_ORDER = tuple(slug for slug, _ in MMVP_VLM_CATEGORIES.values())
CATEGORY_NAMES = dict(MMVP_VLM_CATEGORIES.values())

_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class StatementRow:
    row: int  # 1-based data row
    qid: int
    type: str
    statement: str


def load_mmvp(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """MMVP (150 pairs): ``Questions-clip.csv`` statements are scored; ``Questions.csv`` goes into meta."""
    src = SourceFiles(root, "mmvp")
    warnings: list[str] = []
    image_dir = _image_dir(src, MMVP_IMAGE_DIRS)
    statements_path = src.find(*MMVP_STATEMENT_FILES)
    questions_path = src.find("Questions.csv")
    rows = _read_statements(src, statements_path)
    questions = src.read_csv(questions_path, header=MMVP_QUESTIONS_HEADER, row_label=_data_row)
    # Questions.csv is aligned with the statements by position, as the reference reads it (row[1] per row).
    if len(questions) != len(rows):
        raise ManifestError(
            f"{questions_path}: {len(questions)} data rows, but {statements_path} has {len(rows)}; "
            "the two files are aligned by position and must have the same rows"
        )
    for row, question in zip(rows, questions, strict=True):
        if question["Index"] != str(row.qid):
            warnings.append(
                f"{questions_path}: data row {row.row} has Index {question['Index']!r} but "
                f"{statements_path.name} row {row.row} has Question ID {row.qid}; aligned by position"
            )
    _check_sizes(warnings, f"mmvp: {src.rel(statements_path)}", len(rows), MMVP_ROWS, MMVP_PAIRS, strict_sizes)

    items = []
    for k, (first, second) in enumerate(_pairs(rows, statements_path, warnings), start=1):
        pair_questions = (questions[first.row - 1], questions[second.row - 1])
        images = tuple(
            src.image(f"{image_dir}/{r.qid}.jpg", where=_where(statements_path, r)) for r in (first, second)
        )
        meta: dict[str, Any] = {
            "question_ids": [first.qid, second.qid],
            "rows": [first.row, second.row],
            "statements": [first.statement, second.statement],
            "types": [first.type, second.type],
            "question_indices": [q["Index"] for q in pair_questions],
            "questions": [q["Question"] for q in pair_questions],
            "options": [q["Options"] for q in pair_questions],
            "answers": [q["Correct Answer"] for q in pair_questions],
        }
        items.append(Item(item_id=str(k), images=images, texts=_texts(first, second), meta=meta))
    return Manifest("mmvp", str(src.root), tuple(items), dict(src.hashes), tuple(warnings))


def load_mmvp_vlm(root: str | Path, *, strict_sizes: bool = False) -> Manifest:
    """MMVP-VLM (135 pairs, 9 categories x 15): ``Questions.csv`` statements, ``Questions-llava.csv`` meta."""
    src = SourceFiles(root, "mmvp_vlm")
    warnings: list[str] = []
    image_dir = _image_dir(src, MMVP_VLM_IMAGE_DIRS)
    statements_path = src.find("Questions.csv")
    rows = _read_statements(src, statements_path)
    for row in rows:
        if row.type not in MMVP_VLM_CATEGORIES:
            known = ", ".join(repr(t) for t in MMVP_VLM_CATEGORIES)
            raise ManifestError(f"{_where(statements_path, row)}: unknown Type {row.type!r}; known: {known}")
    llava = _read_llava(src, len(rows), statements_path, warnings)
    _check_sizes(warnings, f"mmvp_vlm: {src.rel(statements_path)}", len(rows), MMVP_VLM_ROWS, MMVP_VLM_PAIRS, strict_sizes)
    # The reference assigns categories by row block (pair_index // 15), meaningful on the full file only.
    full_size = len(rows) == MMVP_VLM_ROWS

    items = []
    for k, (first, second) in enumerate(_pairs(rows, statements_path, warnings), start=1):
        if first.type != second.type:
            raise ManifestError(
                f"{_where(statements_path, second)}: Type {second.type!r} differs from {first.type!r} of "
                f"data row {first.row}; both rows of pair {k} must share one Type"
            )
        slug, name = MMVP_VLM_CATEGORIES[first.type]
        if full_size:
            block = CATEGORY_ORDER[(k - 1) // PAIRS_PER_CATEGORY]
            if block != slug:
                raise ManifestError(
                    f"{_where(statements_path, first)}: Type {first.type!r} (category {slug!r}) disagrees "
                    f"with the reference row-block rule, which puts pair {k} in {block!r} "
                    f"({CATEGORY_NAMES[block]!r})"
                )
        # The reference opens both images from the first row's Type folder; the Types are equal here.
        images = tuple(
            src.image(f"{image_dir}/{first.type}/{r.qid}.jpg", where=_where(statements_path, r))
            for r in (first, second)
        )
        meta: dict[str, Any] = {
            "question_ids": [first.qid, second.qid],
            "rows": [first.row, second.row],
            "statements": [first.statement, second.statement],
            "type": first.type,
            "category": slug,
            "category_name": name,
        }
        if llava is not None:
            pair_llava = (llava[first.row - 1], llava[second.row - 1])
            meta.update(
                llava_indices=[q["lndex"] for q in pair_llava],
                questions=[q["Question"] for q in pair_llava],
                options=[q["Options"] for q in pair_llava],
                answers=[q["Correct Answer"] for q in pair_llava],
            )
        items.append(Item(item_id=str(k), images=images, texts=_texts(first, second), group=slug, meta=meta))
    return Manifest("mmvp_vlm", str(src.root), tuple(items), dict(src.hashes), tuple(warnings))


def _image_dir(src: SourceFiles, candidates: tuple[str, ...]) -> str:
    """The image folder's name relative to the root (not resolved: SourceFiles.image guards escapes)."""
    return src.find_dir(*candidates).relative_to(src.root).as_posix()


def _data_row(index: int) -> str:
    """How messages name the 0-based data row ``index``: 1-based, header not counted (upstream's numbering)."""
    return f"data row {index + 1}"


def _where(path: Path, row: StatementRow) -> str:
    return f"{path}: data row {row.row} (Question ID {row.qid})"


def _read_statements(src: SourceFiles, path: Path) -> list[StatementRow]:
    """``Question ID,Type,Statement`` rows; ids must be unique decimal integers, statements non-empty, raw."""
    rows: list[StatementRow] = []
    seen: dict[int, int] = {}
    for n, record in enumerate(src.read_csv(path, header=STATEMENTS_HEADER, row_label=_data_row), start=1):
        raw_id = record["Question ID"]
        # Image file names are built from the id ({id}.jpg, as the reference's int(qid) does), so only digits
        # are accepted: that also keeps path tricks such as "../x" out of the image path. (The length cap keeps
        # int() within Python's digit limit; no real id comes near it.)
        if not _DIGITS.fullmatch(raw_id) or len(raw_id) > 18:
            raise ManifestError(f"{path}: data row {n}: Question ID {raw_id!r} is not a decimal integer")
        qid = int(raw_id)
        if qid in seen:
            raise ManifestError(f"{path}: data row {n}: Question ID {qid} repeats data row {seen[qid]}")
        seen[qid] = n
        if record["Statement"] == "":
            raise ManifestError(f"{path}: data row {n} (Question ID {qid}): empty Statement")
        rows.append(StatementRow(row=n, qid=qid, type=record["Type"], statement=record["Statement"]))
    if not rows:
        raise ManifestError(f"{path}: no data rows")
    return rows


def _pairs(
    rows: list[StatementRow], path: Path, warnings: list[str]
) -> list[tuple[StatementRow, StatementRow]]:
    """Rows (2k-1, 2k) -> pair k; an odd row count leaves the last row without a partner (an error)."""
    if len(rows) % 2:
        last = rows[-1]
        raise ManifestError(
            f"{_where(path, last)}: {len(rows)} data rows, an odd number; this last row has no partner row"
        )
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]
    for first, second in pairs:
        # The reference derives ground truth from id parity (odd id -> first image); ids of the wrong parity
        # would make its labels differ from ours (positional), so say so.
        if first.qid % 2 != 1 or second.qid % 2 != 0:
            warnings.append(
                f"{path}: data rows {first.row}/{second.row} carry Question IDs {first.qid}/{second.qid}; "
                "the reference takes ground truth from id parity (odd = first image), this loader by position"
            )
    return pairs


def _texts(first: StatementRow, second: StatementRow) -> tuple[str, str]:
    return (TEXT_PREFIX + first.statement, TEXT_PREFIX + second.statement)


def _read_llava(
    src: SourceFiles, n_rows: int, statements_path: Path, warnings: list[str]
) -> list[dict[str, str]] | None:
    """The optional ``Questions-llava.csv``, read by position (rows 225-226 upstream carry ids 277/278)."""
    path = next((src.root / rel for rel in LLAVA_FILES if (src.root / rel).is_file()), None)
    if path is None:
        return None
    records = src.read_csv(path, header=LLAVA_HEADER, row_label=_data_row)
    if len(records) != n_rows:
        raise ManifestError(
            f"{path}: {len(records)} data rows, but {statements_path} has {n_rows}; the two files are "
            "aligned by position and must have the same rows"
        )
    for n, record in enumerate(records, start=1):
        if record["lndex"] != str(n):
            warnings.append(
                f"{path}: data row {n} carries lndex {record['lndex']!r}; read by position as row {n}"
            )
    return records


def _check_sizes(warnings: list[str], what: str, rows: int, published_rows: int, published_pairs: int,
                 strict: bool) -> None:
    """Row and pair counts against the published sizes (warnings, or errors under ``strict``)."""
    check_size(warnings, what=f"{what} rows", actual=rows, expected=published_rows, strict=strict)
    check_size(warnings, what=f"{what} pairs", actual=rows // 2, expected=published_pairs, strict=strict)
