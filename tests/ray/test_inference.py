"""The Ray Data pipeline on a real local Ray: equals the in-process runner, resumes exactly, survives bad images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from perceive_ray.config import load_config
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.synthetic import generate
from perceive_ray.models.clip import save_tiny_clip
from perceive_ray.run.inference import RunMismatchError, run_eval
from perceive_ray.scoring.local import build_scorer, run_local

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments" / "eval" / "clip_whatsup.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval")
    generate(path / "synth", seed=2, pairs=3)
    save_tiny_clip(path / "tiny_clip")
    return path


def config_for(workdir: Path, *extra: str, both: bool = False):
    root = workdir / "synth" / "whatsup"
    benchmarks = f"[{{name: whatsup_controlled_a, root: '{root}'}}]"
    if both:
        benchmarks = benchmarks[:-1] + f", {{name: whatsup_controlled_b, root: '{root}', limit: 5}}]"
    return load_config(EXPERIMENT, [
        f"benchmarks={benchmarks}", f"model.source={workdir / 'tiny_clip'}", f"output_dir={workdir / 'runs'}",
        "resources.num_cpus_per_actor=0.5", *extra,
    ], smoke=True)


def scores_of(path: Path):
    return pq.read_table(path).select(["item_id", "image_index", "text_index", "score"]).to_pylist()


def test_pipeline_equals_local_runner(ray_local, workdir):
    config = config_for(workdir, "scorer.batch_size=5", "resources.num_actors=2", both=True)
    results = run_eval(config, run_id="equal", track=False)
    assert [r.benchmark for r in results] == ["whatsup_controlled_a", "whatsup_controlled_b"]
    manifest = load_benchmark("whatsup_controlled_a", workdir / "synth" / "whatsup")
    local = run_local(manifest, build_scorer(config.model, config.scorer), batch_size=3)
    ray_rows = scores_of(results[0].scores_path)
    local_rows = local.scores.select(["item_id", "image_index", "text_index", "score"]).to_pylist()
    assert [r["item_id"] for r in ray_rows] == [r["item_id"] for r in local_rows]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(ray_rows, local_rows, strict=True))
    assert results[1].report.counts["4way/individual_acc/total"] == 5  # the limit applies


def test_resume_equals_uninterrupted(ray_local, workdir):
    full = run_eval(config_for(workdir, "scorer.batch_size=4"), run_id="full", track=False)
    shards = sorted((workdir / "runs" / "full" / "whatsup_controlled_a" / "shards").glob("part-*.parquet"))
    assert len(shards) >= 2
    # An interrupted run: copy only the first shard (what a killed run had written) plus a stray temp file.
    partial = workdir / "runs" / "partial" / "whatsup_controlled_a" / "shards"
    partial.mkdir(parents=True)
    shutil.copy(shards[0], partial / shards[0].name)
    (partial / "part-999999-deadbeef.tmp").write_bytes(b"half a file")
    shutil.copy(workdir / "runs" / "full" / "config.yaml", workdir / "runs" / "partial" / "config.yaml")
    # Resume with another actor count and batch size.
    resumed = run_eval(config_for(workdir, "scorer.batch_size=7", "resources.num_actors=2"), run_id="partial",
                       track=False)
    already = pq.read_table(shards[0]).num_rows // 4
    assert resumed[0].rows_scored_now == 12 - already
    assert_same_rows(scores_of(resumed[0].scores_path), scores_of(full[0].scores_path))
    again = run_eval(config_for(workdir, "scorer.batch_size=7"), run_id="partial", track=False)
    assert again[0].rows_scored_now == 0
    assert scores_of(again[0].scores_path) == scores_of(resumed[0].scores_path)  # nothing re-scored
    assert again[0].report.metrics == full[0].report.metrics


def assert_same_rows(got, want):
    """Same (item, image, text) rows in the same order, no duplicates; scores within the batch-size tolerance
    (another batch composition changes fp32 reductions at the 1e-7 level)."""
    key = lambda r: (r["item_id"], r["image_index"], r["text_index"])  # noqa: E731
    assert [key(r) for r in got] == [key(r) for r in want]
    assert len({key(r) for r in got}) == len(got)
    assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want, strict=True)) < 1e-5


def test_corrupt_images_are_reported_not_fatal(ray_local, workdir, tmp_path):
    data = tmp_path / "whatsup"
    shutil.copytree(workdir / "synth" / "whatsup", data)
    manifest = load_benchmark("whatsup_controlled_a", data)
    victim = manifest.items[1]
    (data / victim.images[0]).write_bytes(b"\xff\xd8 truncated")
    config = config_for(workdir, f"benchmarks.0.root={data}", f"output_dir={tmp_path / 'runs'}")
    result = run_eval(config, run_id="bad", track=False)[0]
    assert result.errors == 1
    errors = pq.read_table(result.scores_path.with_name("errors.parquet")).to_pylist()
    assert errors[0]["item_id"] == victim.item_id and "cannot decode image" in errors[0]["error"]
    assert result.report.counts["4way/individual_acc/total"] == 11  # the denominator says what was scored
    with pytest.raises(Exception, match="cannot decode image"):
        run_eval(load_config(EXPERIMENT, [*_overrides(config), "on_error=fail"], smoke=True), run_id="bad2",
                 track=False)


def _overrides(config) -> list[str]:
    return [f"benchmarks=[{{name: whatsup_controlled_a, root: '{config.benchmarks[0].root}'}}]",
            f"model.source={config.model.source}", f"output_dir={config.output_dir}"]


def test_resume_refuses_a_different_model(ray_local, workdir):
    run_eval(config_for(workdir), run_id="mismatch", track=False)
    with pytest.raises(RunMismatchError, match="different scorer.options"):
        run_eval(config_for(workdir, "scorer.options.clip_transform=train_compat"), run_id="mismatch", track=False)


def test_object_store_budget_is_applied_and_restored(ray_local, workdir, monkeypatch):
    import ray.data

    import perceive_ray.run.inference as inference

    seen = []
    original = inference._run_benchmark

    def spy(*args, **kwargs):
        seen.append(ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory)
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "_run_benchmark", spy)
    # A 1 MB budget (less than one decoded batch) must still finish: backpressure, not a deadlock.
    results = run_eval(config_for(workdir, "resources.object_store_mb=1"), run_id="budget", track=False)
    assert seen == [2**20]
    assert results[0].report.counts["4way/individual_acc/total"] == 12
    assert ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory == float("inf")
