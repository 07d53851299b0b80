"""ensure_generated: write the synthetic tree once, reuse a current one, replace one of an older version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perceive_ray.data.synthetic import (
    GENERATOR_VERSION,
    ROOTS,
    SynthSummary,
    ensure_generated,
    generate,
    read_summary,
)


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def rewrite_summary(root: Path, **changes) -> None:
    path = root / "SYNTH.json"
    data = json.loads(path.read_text("utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n", "utf-8")


def test_absent_generates(tmp_path):
    out = tmp_path / "fresh"
    summary = ensure_generated(out, seed=3, pairs=1)
    assert isinstance(summary, SynthSummary) and not summary.reused
    assert (summary.seed, summary.pairs, summary.version) == (3, 1, GENERATOR_VERSION)
    assert summary.tree_sha256 == generate(tmp_path / "direct", seed=3, pairs=1).tree_sha256
    on_disk = json.loads((out / "SYNTH.json").read_text("utf-8"))
    assert on_disk["tree_sha256"] == summary.tree_sha256 and "reused" not in on_disk
    assert all((out / root).is_dir() for root in set(ROOTS.values()))


def test_present_is_reused_without_writing(tmp_path):
    out = tmp_path / "d"
    first = generate(out, seed=4, pairs=1)
    before = mtimes(out)
    again = ensure_generated(out, seed=0, pairs=8)  # other seed/pairs asked: the tree on disk is kept as it is
    assert mtimes(out) == before
    assert again.reused and (again.seed, again.pairs) == (4, 1)  # the summary says which tree it is
    assert again.tree_sha256 == first.tree_sha256 and again.counts == first.counts and again.roots == first.roots
    assert again.out_dir == out and again.to_dict()["reused"] is True
    assert read_summary(out) == again and read_summary(tmp_path / "nothing") is None


def test_older_version_is_regenerated(tmp_path):
    out = tmp_path / "old"
    generate(out, seed=5, pairs=1)
    stale = out / "t2v" / "stale.txt"
    stale.write_text("left by an older generator")
    rewrite_summary(out, version=GENERATOR_VERSION - 1, tree_sha256="0" * 64)
    summary = ensure_generated(out, seed=6, pairs=2)
    assert not summary.reused and (summary.seed, summary.pairs) == (6, 2)
    assert not stale.exists()
    on_disk = json.loads((out / "SYNTH.json").read_text("utf-8"))
    assert on_disk["version"] == GENERATOR_VERSION and on_disk["tree_sha256"] == summary.tree_sha256
    assert summary.tree_sha256 == generate(tmp_path / "ref", seed=6, pairs=2).tree_sha256


def test_current_version_with_a_deleted_root_is_regenerated(tmp_path):
    out = tmp_path / "partial"
    generate(out, seed=1, pairs=1)
    for path in sorted((out / "MMVP").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (out / "MMVP").rmdir()
    summary = ensure_generated(out, seed=1, pairs=1)
    assert not summary.reused and (out / "MMVP" / "Questions.csv").is_file()


def test_newer_version_and_foreign_trees_are_left_alone(tmp_path):
    newer = tmp_path / "newer"
    generate(newer, seed=0, pairs=1)
    rewrite_summary(newer, version=GENERATOR_VERSION + 1)
    before = mtimes(newer)
    with pytest.raises(ValueError, match="newer than this one"):
        ensure_generated(newer)
    assert mtimes(newer) == before
    foreign = tmp_path / "foreign"
    (foreign / "t2v").mkdir(parents=True)
    with pytest.raises(ValueError, match="not written by this generator"):
        ensure_generated(foreign, pairs=1)
    assert (foreign / "t2v").is_dir() and not (foreign / "SYNTH.json").exists()
    (foreign / "SYNTH.json").write_text('{"generator": "someone else"}')
    with pytest.raises(ValueError, match="not a SYNTH.json written by"):
        ensure_generated(foreign, pairs=1)
    (foreign / "SYNTH.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable"):
        ensure_generated(foreign, pairs=1)


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="pairs must be"):
        ensure_generated(tmp_path / "x", pairs=0)
    assert not (tmp_path / "x").exists()
