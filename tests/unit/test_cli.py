"""The `perceive-ray` command line: help, ls, validate, data manifest, metrics (JSON and exit codes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perceive_ray import registry
from perceive_ray.cli import main
from perceive_ray.data.benchmarks import whatsup
from perceive_ray.metrics.policies import TIE_POLICIES
from tests.fixtures.whatsup_files import write_controlled
from tests.unit.test_whatsup import table_from, true_wins

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perceive_ray", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("validate", "ls", "data", "metrics", "sweep", "report"):
        assert command in result.stdout
    for sub in (["validate"], ["ls"], ["data", "synth"], ["data", "manifest"], ["metrics"], ["sweep"], ["report"]):
        assert run_cli(*sub, "--help").returncode == 0


def test_report_bad_source_exits_2_naming_it(tmp_path, capsys):
    assert main(["report", "--sweep-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ls(capsys):
    assert main(["ls", "benchmarks"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in registry.names("benchmarks"))
    assert main(["ls"]) == 0
    assert "scorers:" in capsys.readouterr().out


def test_registry_covers_every_benchmark_with_adapter_and_metric():
    assert len(registry.names("benchmarks")) == 14
    for name in registry.names("benchmarks"):
        assert callable(registry.resolve("benchmarks", name))
        assert callable(registry.resolve_metric(name))
        assert set(registry.benchmark(name).tie_policies) <= set(TIE_POLICIES)
    with pytest.raises(registry.RegistryError, match="unknown benchmark 'nope'"):
        registry.resolve("benchmarks", "nope")


def test_validate_exit_codes(tmp_path, capsys):
    good = REPO / "experiments" / "eval" / "clip_whatsup.yaml"
    assert main(["validate", str(good), "--schema-only"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("batch_size: 64", "batch_size: 64\n  colour: red").replace(
        "base: ../_base/eval.yaml", f"base: {good.parent.parent / '_base' / 'eval.yaml'}"))
    assert main(["validate", str(good), str(bad), "--schema-only"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "scorer.colour: unknown key" in err


def test_metrics_json_and_manifest(tmp_path, capsys):
    root = write_controlled(tmp_path / "whatsup", "a", [("mug", "plate"), ("cup", "box")])
    manifest = whatsup.load_controlled_a(root)
    scores = tmp_path / "scores.parquet"
    pq.write_table(table_from(manifest, true_wins), scores)
    code = main(["metrics", "--benchmark", "whatsup_controlled_a", "--data-root", str(root), "--scores", str(scores),
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads(captured.out)
    assert set(report) >= {"benchmark", "metrics", "chance", "counts"}
    assert report["benchmark"] == "whatsup_controlled_a"
    assert report["metrics"]["2way/set_acc"] == 1.0 and report["chance"]["2way/set_acc"] == 0.0625
    assert report["counts"]["2way/set_acc/total"] == 2
    assert "published size is 412" in captured.err  # size warning goes to stderr, JSON stays clean

    assert main(["data", "manifest", "--benchmark", "whatsup_controlled_a", "--data-root", str(root),
                 "--out", str(tmp_path / "m.parquet")]) == 0
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 8


def test_metrics_exclude_items_of_unreadable_images_like_eval(tmp_path, capsys):
    """`perceive-ray metrics` on an evaluation's scores with errors.parquet beside them: complete items only, the
    incomplete pair and set excluded and counted (the same rule as eval); without the errors file, exit 2."""
    root = write_controlled(tmp_path / "whatsup", "a", [("mug", "plate"), ("cup", "box")])
    manifest = whatsup.load_controlled_a(root)
    victim = manifest.items[0].item_id
    kept = manifest.restrict(item.item_id for item in manifest.items if item.item_id != victim)
    run = tmp_path / "run" / "whatsup_controlled_a"
    run.mkdir(parents=True)
    pq.write_table(table_from(kept, true_wins), run / "scores.parquet")
    pq.write_table(pa.table({"item_id": [victim], "image_index": [0], "error": ["x.jpeg: cannot decode image"]}),
                   run / "errors.parquet")
    args = ["metrics", "--benchmark", "whatsup_controlled_a", "--data-root", str(root), "--scores",
            str(run / "scores.parquet"), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    counts = report["counts"]
    assert counts["items_excluded"] == 1 and counts["2way/individual_acc/total"] == 7
    assert (counts["2way/set_acc/correct"], counts["2way/set_acc/total"], counts["2way/set_acc/excluded"]) == (1, 1, 1)
    (run / "errors.parquet").unlink()
    assert main(args) == 2 and "lack scores" in capsys.readouterr().err


def test_metrics_exit_2_when_scores_do_not_cover(tmp_path):
    root = write_controlled(tmp_path / "whatsup", "a", [("mug", "plate")])
    manifest = whatsup.load_controlled_a(root)
    scores = tmp_path / "scores.parquet"
    pq.write_table(table_from(manifest, true_wins).slice(0, 5), scores)
    result = run_cli("metrics", "--benchmark", "whatsup_controlled_a", "--data-root", str(root), "--scores",
                     str(scores), "--json")
    assert result.returncode == 2
    assert "do not cover benchmark 'whatsup_controlled_a'" in result.stderr and result.stdout == ""
    missing = run_cli("metrics", "--benchmark", "whatsup_controlled_a", "--data-root", str(root), "--scores",
                      str(tmp_path / "none.parquet"))
    assert missing.returncode == 2 and "scores file not found" in missing.stderr
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(table_from(manifest, true_wins).drop(["score"]), wrong)
    result = run_cli("metrics", "--benchmark", "whatsup_controlled_a", "--data-root", str(root), "--scores", str(wrong))
    assert result.returncode == 2 and "lacks column(s) ['score']" in result.stderr


def test_no_module_outside_run_imports_ray():
    """The core must import with `ray` blocked (DESIGN §1)."""
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['ray'] = None\n"
        "import perceive_ray\n"
        "for m in pkgutil.walk_packages(perceive_ray.__path__, 'perceive_ray.'):\n"
        "    if m.name.startswith('perceive_ray.run') or m.name == 'perceive_ray.__main__':\n"
        "        continue\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_synth_then_metrics_end_to_end(tmp_path, capsys):
    """A new user's path: render the synthetic benchmark, score it (planted scores), compute metrics."""
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--seed", "3", "--pairs", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["roots"]["whatsup_controlled_a"] == "whatsup"
    assert main(["data", "synth", "--out", str(out), "--seed", "3", "--pairs", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    for benchmark in ("whatsup_controlled_a", "whatsup_controlled_b"):
        manifest = whatsup.load_controlled_a(out / "whatsup") if benchmark.endswith("a") else \
            whatsup.load_controlled_b(out / "whatsup")
        scores = tmp_path / f"{benchmark}.parquet"
        pq.write_table(table_from(manifest, true_wins), scores)
        assert main(["metrics", "--benchmark", benchmark, "--data-root", str(out / "whatsup"), "--scores",
                     str(scores)]) == 0
        table = capsys.readouterr().out
        assert "2way/set_acc" in table and "100.00%" in table and "6.25%" in table


def test_every_registry_entry_resolves():
    for kind in registry.KINDS:
        for name in registry.names(kind):
            assert callable(registry.resolve(kind, name)), f"{kind}/{name}"
