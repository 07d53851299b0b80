"""Fuzzing every benchmark adapter with malformed annotation files (hypothesis).

A target is one annotation file of one adapter, written valid by the fixture writers in ``tests/fixtures/``.
Each example applies one generated malformation to that file (in place, restored afterwards) and loads the
benchmark. The contract:

- harmless variants (UTF-8 BOM, CRLF line endings, trailing blank lines, extra keys, extra CSV columns where
  the format allows them, a renamed or dropped optional column) load, with the same items as the valid file;
- everything else returns a ``Manifest`` or raises ``ManifestError`` whose one-line message names the file
  and, for row-level malformations, the row (in the adapter's own numbering: ``row i``, ``data row n``,
  ``key 'k'``, or the JSON Lines ``line n``) and the mutated field;
- any other exception fails the test.

Examples are derandomized (CI reproducible); the whole file runs in well under a minute.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from perceive_ray.cli import main
from perceive_ray.data.benchmarks import mmvp, seetrue, sugarcrepe, whatsup, winoground
from perceive_ray.data.manifest import Manifest, ManifestError
from tests.fixtures import mmvp_files, pairs_files
from tests.fixtures.whatsup_files import (
    controlled_records,
    numbered_pairs,
    qa_rows,
    write_controlled,
    write_qa,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

QA_FIELDS = ("image_id", "true_caption", "false_caption")


@dataclass(frozen=True)
class Target:
    """One annotation file of one adapter.

    kind: ``objects`` (JSON array of objects), ``tuples`` (JSON array of arrays), ``jsonl`` (one object a line),
    ``keyed`` (JSON object of objects), ``tag_lists`` (JSON object of string lists) or ``csv``.
    fields: the required fields (object kinds), element names (tuples) or required columns (csv).
    id_field: a field whose values must differ between rows; id_named: the error then names it.
    row: the adapter's name for the 0-based row i.
    """

    name: str
    write: Callable[[Path], object]
    load: Callable[[Path], Manifest]
    file: str
    kind: str
    fields: tuple[str, ...] = ()
    id_field: str | None = None
    id_named: bool = True
    row: Callable[[int], str] = lambda i: f"row {i}"
    exact_header: bool = False


def _data_row(i: int) -> str:
    return f"data row {i + 1}"


PAIR_FIELDS = ("image_0", "image_1", "caption_0", "caption_1")
TARGETS = [
    Target("controlled_a", lambda r: write_controlled(r, "a", numbered_pairs(2)), whatsup.load_controlled_a,
           "controlled_images_dataset.json", "objects", ("image_path", "caption_options"), "image_path",
           id_named=False),
    Target("controlled_b", lambda r: write_controlled(r, "b", numbered_pairs(1)), whatsup.load_controlled_b,
           "controlled_clevr_dataset.json", "objects", ("image_path", "caption_options"), "image_path",
           id_named=False),
    Target("coco_one", lambda r: write_qa(r, "coco_one", qa_rows("coco_one", {"lr": 3, "tb": 3})),
           whatsup.load_coco_one, "coco_qa_one_obj.json", "tuples", QA_FIELDS),
    Target("coco_two", lambda r: write_qa(r, "coco_two", qa_rows("coco_two", {"lr": 2, "ab": 2})),
           whatsup.load_coco_two, "coco_qa_two_obj.json", "tuples", QA_FIELDS),
    Target("vg_one", lambda r: write_qa(r, "vg_one", qa_rows("vg_one", {"lr": 2, "tb": 2, "fb": 1})),
           whatsup.load_vg_one, "vg_qa_one_obj.json", "tuples", QA_FIELDS),
    Target("vg_two", lambda r: write_qa(r, "vg_two", qa_rows("vg_two", {"lr": 2, "tb": 1, "fb": 2})),
           whatsup.load_vg_two, "vg_qa_two_obj.json", "tuples", QA_FIELDS),
    Target("mmvp_statements", lambda r: mmvp_files.write_mmvp(r, n_pairs=2), mmvp.load_mmvp, "Questions-clip.csv",
           "csv", mmvp.STATEMENTS_HEADER, "Question ID", row=_data_row, exact_header=True),
    Target("mmvp_questions", lambda r: mmvp_files.write_mmvp(r, n_pairs=2), mmvp.load_mmvp, "Questions.csv",
           "csv", mmvp.MMVP_QUESTIONS_HEADER, row=_data_row, exact_header=True),
    Target("mmvp_vlm_statements", lambda r: mmvp_files.write_mmvp_vlm(r, rows=mmvp_files.vlm_rows(1)),
           mmvp.load_mmvp_vlm, "Questions.csv", "csv", mmvp.STATEMENTS_HEADER, "Question ID", row=_data_row,
           exact_header=True),
    Target("mmvp_vlm_llava", lambda r: mmvp_files.write_mmvp_vlm(r, rows=mmvp_files.vlm_rows(1)),
           mmvp.load_mmvp_vlm, "Questions-llava.csv", "csv", mmvp.LLAVA_HEADER, row=_data_row, exact_header=True),
    Target("winoground_metadata", lambda r: pairs_files.write_winoground(r, 3), winoground.load_winoground,
           "winoground/metadata.csv", "csv", winoground.WINOGROUND_COLUMNS, "id"),
    Target("winoground_examples", lambda r: pairs_files.write_winoground(r, 3), winoground.load_winoground,
           "winoground/examples.jsonl", "jsonl", ("id", "num_main_preds", "collapsed_tag"), "id"),
    Target("winoground_why_hard", lambda r: pairs_files.write_winoground(r, 3), winoground.load_winoground,
           "winoground/why_winoground_hard.json", "tag_lists"),
    Target("eqben_mini", lambda r: pairs_files.write_eqben_mini(r), winoground.load_eqben_mini,
           "eqben_vllm/all_select.json", "objects", winoground.EQBEN_FIELDS),
    Target("naturalbench", lambda r: pairs_files.write_naturalbench(r, 3), winoground.load_naturalbench,
           "NaturalBench-Retrieval/metadata.json", "objects", ("index", *PAIR_FIELDS), "index"),
    Target("coco_cf", lambda r: pairs_files.write_coco_cf(r, 3), winoground.load_coco_cf,
           "cococounterfactuals.jsonl", "jsonl", PAIR_FIELDS),
    Target("sugarcrepe", lambda r: pairs_files.write_sugarcrepe(r), sugarcrepe.load_sugarcrepe,
           "sugar_crepe/add_obj.json", "keyed", sugarcrepe.FIELDS),
    Target("seetrue", lambda r: pairs_files.write_seetrue(r), seetrue.load_seetrue, "SeeTRUE.csv", "csv",
           seetrue.REQUIRED_COLUMNS),
]


# ---------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Mutation:
    """A malformed variant of the file. expect: ``load`` (harmless), ``error`` or ``either``.

    rows: acceptable row names (one must appear in an error); field: a name that must appear in an error.
    """

    op: str
    data: bytes
    expect: str
    rows: tuple[str, ...] = ()
    field: str | None = None


class Pairs(list):
    """A JSON object as a list of (key, value) pairs, so that a key can repeat."""


def dump(value: Any) -> str:
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def as_pairs(value: Any) -> Any:
    if isinstance(value, dict):
        return Pairs((k, as_pairs(v)) for k, v in value.items())
    if isinstance(value, list):
        return [as_pairs(v) for v in value]
    return value


def jtype(value: Any) -> str:
    return "pairs" if isinstance(value, Pairs) else type(value).__name__


WRONG_VALUES = (None, True, 0, 7, 1.5, "", "x", [], ["x"], [1, 2, 3, 4], Pairs(), Pairs([("k", "v")]))
WRONG_TAG_LISTS = (None, True, 7, 1.5, "x", Pairs(), [1, 2, 3, 4], [""], [None])
NON_RECORDS = (None, 3, "row", [], ["a", "b"], True)
NON_TUPLES = (None, 3, "row", Pairs([("image_id", 1)]))
CELL_VALUES = ("", "x", "0", "7", "-1", "1.5", " 1", "../x", 'a "quoted", value', "line\nbreak")
EXTRA_VALUES = (1, "x", None, [], Pairs())


def typos(name: str, taken: set[str]) -> list[str]:
    """Renamings a hand-edited or re-exported file shows: truncation, a dropped letter, case, dashes."""
    out = {name[:k] for k in range(1, len(name))} | {name[:k] + name[k + 1:] for k in range(len(name))}
    out |= {name.upper(), name + "s", name.replace("_", "-"), name + " "}
    return sorted(out - taken - {name, ""})


def other_index(draw, i: int, n: int) -> int:
    """A row index in range(n) other than i."""
    k = draw(st.integers(0, n - 2))
    return k if k < i else k + 1


def encode_json(kind: str, top: Any) -> bytes:
    if kind == "jsonl":
        return "".join(dump(r) + "\n" for r in top).encode()
    return dump(top).encode()


def encode_csv(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def byte_mutation(draw, original: bytes, kind: str) -> Mutation:
    ops = ["empty", "bom", "crlf", "blank_lines", "truncate", "invalid_utf8", "no_records"]
    if kind != "csv":
        ops.append("wrong_top")
    op = draw(st.sampled_from(ops))
    if op == "no_records":  # a well-formed file without a single record
        empty = {"csv": original.split(b"\n", 1)[0] + b"\n", "jsonl": b"\n", "keyed": b"{}", "tag_lists": b"{}"}
        return Mutation(op, empty.get(kind, b"[]"), "either")
    if op == "empty":
        return Mutation(op, draw(st.sampled_from([b"", b"\n", b" \r\n"])), "error")
    if op == "bom":
        return Mutation(op, b"\xef\xbb\xbf" + original, "load")
    if op == "crlf":
        return Mutation(op, original.replace(b"\n", b"\r\n"), "load")
    if op == "blank_lines":
        return Mutation(op, original + b"\n\n", "load")
    if op == "truncate":
        return Mutation(op, original[: draw(st.integers(1, len(original) - 1))], "either")
    if op == "invalid_utf8":
        at = draw(st.integers(0, len(original)))
        bad = draw(st.sampled_from([b"\xff", b"\x80", b"\xc3(", b"\xed\xa0\x80", b"\xe2\x82"]))
        return Mutation(op, original[:at] + bad + original[at:], "error")
    # wrong_top: a JSON value of the wrong shape for the whole file
    top = json.loads(original.decode()) if kind != "jsonl" else None
    choices: list[Any] = [None, 42, "text", True]
    choices.append(Pairs([("data", as_pairs(top))]) if isinstance(top, list) else [as_pairs(top)])
    if kind == "jsonl":
        records = [json.loads(line) for line in original.decode().splitlines() if line.strip()]
        choices.append(as_pairs(records))  # the whole file as one JSON array on one line
    value = draw(st.sampled_from(choices))
    return Mutation(op, dump(value).encode(), "error")


def object_mutation(draw, target: Target, original: bytes) -> Mutation:
    """Row-level malformations of JSON objects (array of objects, JSON Lines, object of objects)."""
    text = original.decode()
    if target.kind == "jsonl":
        top = [as_pairs(json.loads(line)) for line in text.splitlines() if line.strip()]
        records = top
    elif target.kind == "keyed":
        top = as_pairs(json.loads(text))
        records = [v for _, v in top]
    else:
        top = as_pairs(json.loads(text))
        records = top
    i = draw(st.integers(0, len(records) - 1))
    record = records[i]
    keys = {k for k, _ in record}
    if target.kind == "keyed":
        rows: tuple[str, ...] = (repr(top[i][0]),)
    elif target.kind == "jsonl":
        rows = (target.row(i), f"line {i + 1}")
    else:
        rows = (target.row(i),)

    def replace(new_record: Any) -> bytes:
        if target.kind == "keyed":
            top[i] = (top[i][0], new_record)
        else:
            top[i] = new_record
        return encode_json(target.kind, top)

    ops = ["delete_field", "rename_field", "retype_field", "replace_row", "extra_key", "repeat_field"]
    if target.id_field and len(records) > 1:
        ops.append("duplicate_id")
    if target.kind == "keyed" and len(records) > 1:
        ops.append("duplicate_key")
    op = draw(st.sampled_from(ops))
    field = draw(st.sampled_from(target.fields))
    if op == "delete_field":
        return Mutation(op, replace(Pairs(p for p in record if p[0] != field)), "error", rows, field)
    if op == "rename_field":
        new = draw(st.sampled_from(typos(field, keys | set(target.fields))))
        renamed = Pairs((new, v) if k == field else (k, v) for k, v in record)
        return Mutation(f"{op}:{new}", replace(renamed), "error", rows, field)
    if op == "retype_field":
        old = dict(record)[field]
        values = [v for v in WRONG_VALUES if jtype(v) != jtype(old) or isinstance(old, list)]
        value = draw(st.sampled_from(values))
        retyped = Pairs((k, value) if k == field else (k, v) for k, v in record)
        return Mutation(f"{op}:{value!r}", replace(retyped), "error", rows, field)
    if op == "replace_row":
        return Mutation(op, replace(draw(st.sampled_from(NON_RECORDS))), "error", rows)
    if op == "extra_key":
        name = draw(st.sampled_from([n for n in ("extra", "note", "Image", "caption", "image", "id_2") if n not in keys]))
        at = draw(st.integers(0, len(record)))
        value = draw(st.sampled_from(EXTRA_VALUES))
        return Mutation(op, replace(Pairs([*record[:at], (name, value), *record[at:]])), "load")
    if op == "repeat_field":
        value = draw(st.sampled_from(WRONG_VALUES))
        return Mutation(op, replace(Pairs([(field, value), *record])), "error", rows, field)
    j = other_index(draw, i, len(records))
    if op == "duplicate_key":
        top[i] = (top[j][0], top[i][1])
        return Mutation(op, encode_json(target.kind, top), "error", (repr(top[j][0]),))
    # duplicate_id: row i takes row j's id
    other = dict(records[j])[target.id_field]
    duplicated = Pairs((k, other) if k == target.id_field else (k, v) for k, v in record)
    j_rows = (repr(top[j][0]),) if target.kind == "keyed" else (target.row(j), f"line {j + 1}")
    return Mutation(op, replace(duplicated), "error", rows + j_rows, target.id_field if target.id_named else None)


def tag_list_mutation(draw, original: bytes) -> Mutation:
    """why_winoground_hard.json: {"id": [tags]}."""
    top = as_pairs(json.loads(original.decode()))
    i = draw(st.integers(0, len(top) - 1))
    key = top[i][0]
    op = draw(st.sampled_from(["delete_entry", "rename_key", "retype_value", "duplicate_key"]))
    if op == "delete_entry":
        del top[i]
        return Mutation(op, dump(top).encode(), "error", (repr(key),))
    if op == "rename_key":
        new = draw(st.sampled_from(["x", f"{key}x", str(int(key) + 100), f" {key}", "-1", ""]))
        top[i] = (new, top[i][1])
        return Mutation(op, dump(top).encode(), "error", (repr(key), repr(new)))
    if op == "retype_value":
        top[i] = (key, draw(st.sampled_from(WRONG_TAG_LISTS)))
        return Mutation(op, dump(top).encode(), "error", (repr(key),))
    j = other_index(draw, i, len(top))
    top[i] = (top[j][0], top[i][1])
    return Mutation(op, dump(top).encode(), "error", (repr(top[j][0]),))


def tuple_mutation(draw, target: Target, original: bytes) -> Mutation:
    """COCO-QA / VG-QA records [image_id, true_caption, false_caption]."""
    top = json.loads(original.decode())
    i = draw(st.integers(0, len(top) - 1))
    rows = (target.row(i),)
    op = draw(st.sampled_from(["retype_element", "drop_element", "add_element", "replace_row"]))
    if op == "retype_element":
        k = draw(st.integers(0, 2))
        values = [v for v in WRONG_VALUES if jtype(v) != jtype(top[i][k])]
        top[i][k] = draw(st.sampled_from(values))
        return Mutation(op, dump(top).encode(), "error", rows, QA_FIELDS[k])
    if op == "drop_element":
        del top[i][draw(st.integers(0, 2))]
        return Mutation(op, dump(top).encode(), "error", rows)
    if op == "add_element":
        top[i].append(draw(st.sampled_from(EXTRA_VALUES)))
        return Mutation(op, dump(top).encode(), "error", rows)
    top[i] = draw(st.sampled_from(NON_TUPLES))
    return Mutation(op, dump(top).encode(), "error", rows)


def csv_mutation(draw, target: Target, original: bytes) -> Mutation:
    table = list(csv.reader(io.StringIO(original.decode(), newline="")))
    header, rows = table[0], table[1:]
    i = draw(st.integers(0, len(rows) - 1))
    where = (target.row(i),)
    ops = ["short_row", "long_row", "set_cell", "drop_column", "rename_column", "extra_column"]
    if target.id_field:
        ops.append("duplicate_id")
    op = draw(st.sampled_from(ops))
    if op == "short_row":
        keep = draw(st.integers(1, len(header) - 1))
        rows[i] = rows[i][:keep]
        return Mutation(op, encode_csv(header, rows), "error", where, header[keep])
    if op == "long_row":
        rows[i] = [*rows[i], draw(st.sampled_from(CELL_VALUES))]
        return Mutation(op, encode_csv(header, rows), "error", where)
    if op == "set_cell":
        c = draw(st.integers(0, len(header) - 1))
        rows[i][c] = draw(st.sampled_from(CELL_VALUES))
        return Mutation(f"{op}:{header[c]}={rows[i][c]!r}", encode_csv(header, rows), "either", where, header[c])
    if op == "duplicate_id":
        c = header.index(target.id_field)
        j = other_index(draw, i, len(rows))
        rows[i][c] = rows[j][c]
        return Mutation(op, encode_csv(header, rows), "error", (*where, target.row(j)), target.id_field)
    if op == "extra_column":
        at = draw(st.integers(0, len(header)))
        name = draw(st.sampled_from(["extra", "notes", "Unnamed: 0", "split"]))
        header.insert(at, name)
        for row in rows:
            row.insert(at, draw(st.sampled_from(CELL_VALUES)))
        return Mutation(op, encode_csv(header, rows), "error" if target.exact_header else "load", field=name)
    c = draw(st.integers(0, len(header) - 1))
    column = header[c]
    required = column in target.fields
    expect = "error" if required else "load"
    if op == "drop_column":
        del header[c]
        for row in rows:
            del row[c]
        return Mutation(f"{op}:{column}", encode_csv(header, rows), expect, field=column if required else None)
    header[c] = draw(st.sampled_from(typos(column, set(header))))
    return Mutation(f"{op}:{column}", encode_csv(header, rows), expect, field=column if required else None)


def mutation(draw, target: Target, original: bytes) -> Mutation:
    if draw(st.booleans()):
        return byte_mutation(draw, original, target.kind)
    if target.kind == "csv":
        return csv_mutation(draw, target, original)
    if target.kind == "tuples":
        return tuple_mutation(draw, target, original)
    if target.kind == "tag_lists":
        return tag_list_mutation(draw, original)
    return object_mutation(draw, target, original)


# ---------------------------------------------------------------- checks


def project(manifest: Manifest) -> list[tuple]:
    """What a harmless variant must leave unchanged (meta may gain extra columns)."""
    return [(i.item_id, i.images, i.texts, i.subset, i.group, i.pair_key, i.label, i.two_way, i.tags)
            for i in manifest.items]


def mentions(message: str, name: str) -> bool:
    return re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", message) is not None


def check(target: Target, root: Path, change: Mutation, baseline: list[tuple]) -> None:
    path = root.resolve() / target.file
    try:
        manifest = target.load(root)
    except ManifestError as exc:
        message = str(exc)
        context = f"{target.name} {change.op}: {message}"
        assert change.expect != "load", f"harmless variant rejected: {context}"
        assert str(path) in message, f"file not named: {context}"
        assert "\n" not in message, f"message spans lines: {context}"
        if change.rows:
            assert any(mentions(message, row) for row in change.rows), f"none of {change.rows} named: {context}"
        if change.field:
            assert mentions(message, change.field), f"field {change.field!r} not named: {context}"
        return
    assert change.expect != "error", f"{target.name} {change.op}: loaded a malformed file"
    if change.expect == "load":
        assert project(manifest) == baseline, f"{target.name} {change.op}: harmless variant changed the items"


class Prepared(dict):
    """Per target name: (valid root, original bytes of the file to mutate, projected valid manifest)."""

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Prepared({sorted(self)})"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    out = Prepared()
    for target in TARGETS:
        root = tmp_path_factory.mktemp(target.name)
        target.write(root)
        out[target.name] = (root, (root / target.file).read_bytes(), project(target.load(root)))
    return out


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@FUZZ
@given(data=st.data())
def test_malformed_file_gives_manifest_or_clear_error(prepared, target, data):
    root, original, baseline = prepared[target.name]
    change = mutation(data.draw, target, original)
    event(change.op.split(":")[0])
    path = root / target.file
    try:
        path.write_bytes(change.data)
        check(target, root, change, baseline)
    finally:
        path.write_bytes(original)


# ---------------------------------------------------------------- regressions and the CLI path


def _controlled_with_renamed_field(tmp_path: Path, old: str, new: str, row: int) -> Path:
    root = write_controlled(tmp_path / "data", "a", numbered_pairs(1))
    records = controlled_records("a", numbered_pairs(1))
    records[row] = {(new if k == old else k): v for k, v in records[row].items()}
    (root / "controlled_images_dataset.json").write_text(json.dumps(records, indent=1))
    return root


@pytest.mark.parametrize(("old", "new"), [("caption_options", "caption_optons"), ("image_path", "image")])
def test_controlled_renamed_field_names_file_row_and_field(tmp_path, old, new):
    root = _controlled_with_renamed_field(tmp_path, old, new, row=3)
    with pytest.raises(ManifestError) as info:
        whatsup.load_controlled_a(root)
    path = root.resolve() / "controlled_images_dataset.json"
    message = str(info.value)
    assert message.startswith(f"{path}: row 3: missing field(s) {old} (the object has ")
    assert repr(new) in message


def test_cli_manifest_on_malformed_file_exits_2_with_one_line(tmp_path, capsys):
    root = _controlled_with_renamed_field(tmp_path, "caption_options", "caption_optons", row=2)
    out = tmp_path / "manifest.parquet"
    code = main(["data", "manifest", "--benchmark", "whatsup_controlled_a", "--data-root", str(root),
                 "--out", str(out)])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    path = root.resolve() / "controlled_images_dataset.json"
    assert lines[0].startswith(f"perceive-ray: error: {path}: row 2: missing field(s) caption_options ")
    assert not out.exists()


def test_unpaired_surrogate_is_rejected_before_the_manifest(tmp_path):
    root = pairs_files.write_coco_cf(tmp_path, 2)
    path = root / "cococounterfactuals.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"caption_0": "', '"caption_0": "\\ud800', 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"cococounterfactuals\.jsonl: line 2 \(row 1\): field 'caption_0': "):
        winoground.load_coco_cf(root)


def test_symlinked_image_folder_and_annotation_file_load(tmp_path):
    """A user may link a shared folder or file into the dataset root; names stay those under the root."""
    shared = pairs_files.write_seetrue(tmp_path / "shared")
    root = tmp_path / "root"
    root.mkdir()
    (root / "images").symlink_to(shared / "images")
    (root / "SeeTRUE.csv").symlink_to(shared / "SeeTRUE.csv")
    manifest = seetrue.load_seetrue(root)
    assert manifest.items[0].images == ("images/SNLI-VE_0.jpg",)
    assert list(manifest.source_hashes) == ["SeeTRUE.csv"]
