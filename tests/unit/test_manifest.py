"""Manifest schema, Parquet IO, source-file parsing and the image-path guard."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perceive_ray.data.manifest import Item, Manifest, ManifestError, check_size
from perceive_ray.data.sources import SourceFiles, resolve_image, sha256_file


def test_round_trip_keeps_everything(tmp_path):
    item = Item("k", ("a/b c.jpg",), ("x ", 'say "hi"'), subset="s", group="lr", pair_key="p/q", label=1,
                two_way=(0, 3), tags=("t",), meta={"q": [1, 2], "ü": "é"})
    manifest = Manifest("mmvp", "/data", (item,), {"f.json": "00"}, ("w",))
    path = manifest.write_parquet(tmp_path / "sub" / "m.parquet")
    assert Manifest.read_parquet(path) == manifest


def test_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="duplicate item_id 'a'"):
        Manifest("b", "/", (Item("a", ("x",), ("y",)), Item("a", ("x",), ("z",))))
    with pytest.raises(ManifestError, match="needs at least one image and one text"):
        Manifest("b", "/", (Item("a", (), ("y",)),))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    with pytest.raises(ManifestError, match="plain.parquet: not a perceive_ray manifest"):
        Manifest.read_parquet(plain)
    with pytest.raises(ManifestError, match="gone.parquet: manifest file not found"):
        Manifest.read_parquet(tmp_path / "gone.parquet")


def test_check_size():
    warnings: list[str] = []
    check_size(warnings, what="x", actual=3, expected=3, strict=True)
    check_size(warnings, what="x", actual=2, expected=(3, 4), strict=False)
    assert warnings == ["x: 2 found, published size is 3 or 4"]
    with pytest.raises(ManifestError, match=r"x: 2 found, published size is 3 \(--strict-sizes\)"):
        check_size(warnings, what="x", actual=2, expected=3, strict=True)


def test_image_guard(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.jpg").write_bytes(b"x")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    # A folder the user linked in (e.g. a shared val2017/) is followed: the guard is lexical.
    os.symlink(tmp_path, root / "shared")
    assert resolve_image(root, "shared/outside.jpg", where="f: row 1") == "shared/outside.jpg"
    assert resolve_image(root, "img/./a.jpg", where="f: row 1") == "img/a.jpg"
    assert resolve_image(root, "img/../img/a.jpg", where="f: row 1") == "img/a.jpg"
    for ref, match in [
        ("../outside.jpg", "resolves outside the dataset root"),
        ("img/../../outside.jpg", "resolves outside the dataset root"),
        ("img\\..\\..\\outside.jpg", "not POSIX"),
        (str(tmp_path / "outside.jpg"), "is absolute"),
        ("img/none.jpg", "not found"),
        ("", "not a non-empty string"),
    ]:
        with pytest.raises(ManifestError, match=match) as info:
            resolve_image(root, ref, where="f: row 1")
        assert str(info.value).startswith("f: row 1:")


def test_source_files(tmp_path):
    (tmp_path / "q.csv").write_bytes(b'a,b\r\n1,"key ""Z"" on the keyboard "\r\n2,x\r\n')
    files = SourceFiles(tmp_path, "bench")
    rows = files.read_csv(files.find("missing.csv", "q.csv"), header=["a", "b"])
    assert rows == [{"a": "1", "b": 'key "Z" on the keyboard '}, {"a": "2", "b": "x"}]
    assert files.hashes == {"q.csv": sha256_file(tmp_path / "q.csv")}
    with pytest.raises(ManifestError, match=r"q.csv: header \['a', 'b'\] does not match"):
        files.read_csv(tmp_path / "q.csv", header=["a", "c"])
    (tmp_path / "short.csv").write_text("a,b\n1\n")
    with pytest.raises(ManifestError, match=r"short.csv: row 2: 1 fields, header has 2"):
        files.read_csv(tmp_path / "short.csv", min_header=["a"])
    with pytest.raises(ManifestError, match=r"expected 'x.json', 'y.json'"):
        files.find("x.json", "y.json")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl: line 2: invalid JSON"):
        files.read_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(ManifestError, match="is not a directory"):
        SourceFiles(tmp_path / "nowhere", "bench")
