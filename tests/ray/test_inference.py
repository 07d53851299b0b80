"""The Ray Data executor on a real local Ray: one model load per actor for a whole multi-benchmark experiment,
CPU threads from the actor's share, equal to the in-process executor, exact resume, bad images reported."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from perceive_ray.config import ResourcesConfig, load_config
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.images import ImageError
from perceive_ray.data.synthetic import generate
from perceive_ray.evaluation import TooManyImageErrors, run_evaluation
from perceive_ray.models.clip import save_tiny_clip
from perceive_ray.run.inference import RayDataExecutor, actor_resources, run_eval
from perceive_ray.run_directory import RunMismatchError
from perceive_ray.scoring.local import LocalExecutor, build_scorer, run_local

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments" / "eval" / "clip_whatsup.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval")
    generate(path / "synth", seed=2, pairs=3)
    save_tiny_clip(path / "tiny_clip")
    return path


def config_for(workdir: Path, *extra: str, both: bool = False, three: bool = False):
    root = workdir / "synth" / "whatsup"
    benchmarks = f"[{{name: whatsup_controlled_a, root: '{root}'}}]"
    if both or three:
        benchmarks = benchmarks[:-1] + f", {{name: whatsup_controlled_b, root: '{root}', limit: 5}}]"
    if three:
        benchmarks = benchmarks[:-1] + f", {{name: mmvp_vlm, root: '{workdir / 'synth' / 'MMVP_VLM'}'}}]"
    return load_config(EXPERIMENT, [
        f"benchmarks={benchmarks}", f"model.source={workdir / 'tiny_clip'}", f"output_dir={workdir / 'runs'}",
        *extra,
    ], smoke=True)


def scores_of(path: Path):
    return pq.read_table(path).select(["item_id", "image_index", "text_index", "score"]).to_pylist()


def record_of(workdir: Path, run_id: str) -> dict:
    return json.loads((workdir / "runs" / run_id / "run_record.json").read_text())


def test_one_model_load_per_actor_for_three_benchmarks(ray_local, workdir):
    config = config_for(workdir, "scorer.batch_size=3", three=True)
    results = run_eval(config, run_id="three", track=False)
    assert [r.benchmark for r in results] == ["whatsup_controlled_a", "whatsup_controlled_b", "mmvp_vlm"]
    evaluation = record_of(workdir, "three")["evaluations"][0]
    actors = evaluation["actors"]
    # One actor for the whole three-benchmark experiment: it built its scorer exactly once (the ledger has one
    # entry per construction; one pipeline per benchmark would have built it three times).
    assert evaluation["model_loads"] == len(actors) == 1
    vlm = load_benchmark("mmvp_vlm", workdir / "synth" / "MMVP_VLM")
    assert evaluation["rows_scored"] == {"whatsup_controlled_a": 12, "whatsup_controlled_b": 5,
                                         "mmvp_vlm": sum(len(item.images) for item in vlm.items)}
    assert all(r.report.metrics for r in results)


def test_cpu_actor_threads_follow_its_share(ray_local, workdir):
    # Default resources on the 4-CPU test cluster: one actor gets 3.5 CPUs -> 4 threads, capped at this host's cores.
    run_eval(config_for(workdir), run_id="threads", track=False)
    actors = record_of(workdir, "threads")["evaluations"][0]["actors"]
    assert [a["threads"] for a in actors] == [min(4, os.cpu_count() or 1)]
    # An explicit fractional share still gets one whole thread, never zero.
    run_eval(config_for(workdir, "resources.num_cpus_per_actor=0.5"), run_id="threads_half", track=False)
    assert record_of(workdir, "threads_half")["evaluations"][0]["actors"][0]["threads"] == 1


def test_actor_resources_defaults():
    assert actor_resources(ResourcesConfig(), 16.0) == (15.5, 16)  # CPU run: the cluster less decode headroom
    assert actor_resources(ResourcesConfig(num_actors=4), 16.0) == (3.875, 4)
    assert actor_resources(ResourcesConfig(num_gpus_per_actor=1), 16.0) == (1.0, 1)  # GPU run: 1 CPU per actor
    assert actor_resources(ResourcesConfig(num_cpus_per_actor=0.5), 2.0) == (0.5, 1)
    assert actor_resources(ResourcesConfig(num_cpus_per_actor=0.5, threads_per_actor=2), 2.0) == (0.5, 2)
    assert actor_resources(ResourcesConfig(num_actors=8), 2.0) == (0.5, 1)


def test_pipeline_equals_local_executor(ray_local, workdir):
    config = config_for(workdir, "scorer.batch_size=5", "resources.num_actors=2", "resources.num_cpus_per_actor=0.5",
                        both=True)
    ray_results = run_eval(config, run_id="equal_ray", track=False)
    local_results = run_evaluation(config, LocalExecutor(), run_id="equal_local", track=False)
    for a, b in zip(ray_results, local_results, strict=True):
        ray_rows, local_rows = scores_of(a.scores_path), scores_of(b.scores_path)
        assert [r["item_id"] for r in ray_rows] == [r["item_id"] for r in local_rows]
        assert max(abs(x["score"] - y["score"]) for x, y in zip(ray_rows, local_rows, strict=True)) < 1e-5
        assert a.report.metrics == b.report.metrics
    manifest = load_benchmark("whatsup_controlled_a", workdir / "synth" / "whatsup")
    loop = run_local(manifest, build_scorer(config.model, config.scorer), batch_size=3)
    assert len(loop.scores) == len(scores_of(ray_results[0].scores_path))
    assert ray_results[1].report.counts["4way/individual_acc/total"] == 5  # the limit applies


def test_resume_equals_uninterrupted(ray_local, workdir):
    full = run_eval(config_for(workdir, "scorer.batch_size=4"), run_id="full", track=False)
    shards = sorted((workdir / "runs" / "full" / "whatsup_controlled_a" / "shards").glob("part-*.parquet"))
    assert len(shards) >= 2
    # An interrupted run: only the first shard (what a killed run had written), its record, and a stray temp file.
    partial = workdir / "runs" / "partial" / "whatsup_controlled_a" / "shards"
    partial.mkdir(parents=True)
    shutil.copy(shards[0], partial / shards[0].name)
    (partial / "part-999999-deadbeef.tmp").write_bytes(b"half a file")
    for name in ("config.yaml", "run_record.json"):
        shutil.copy(workdir / "runs" / "full" / name, workdir / "runs" / "partial" / name)
    record_before = record_of(workdir, "partial")
    # Resume with another actor count and batch size.
    resumed = run_eval(config_for(workdir, "scorer.batch_size=7", "resources.num_actors=2",
                                  "resources.num_cpus_per_actor=0.5"), run_id="partial", track=False)
    already = pq.read_table(shards[0]).num_rows // 4
    assert resumed[0].rows_scored_now == 12 - already
    assert_same_rows(scores_of(resumed[0].scores_path), scores_of(full[0].scores_path))
    again = run_eval(config_for(workdir, "scorer.batch_size=7"), run_id="partial", track=False)
    assert again[0].rows_scored_now == 0
    assert scores_of(again[0].scores_path) == scores_of(resumed[0].scores_path)  # nothing re-scored
    assert again[0].report.metrics == full[0].report.metrics
    record = record_of(workdir, "partial")
    # The record is never rewritten by a resume, only extended by one entry per invocation; a resume with
    # nothing left to score loads no model.
    assert {k: v for k, v in record.items() if k != "evaluations"} == \
        {k: v for k, v in record_before.items() if k != "evaluations"}
    resumed_loads, again_loads = (e["model_loads"] for e in record["evaluations"][-2:])
    assert 1 <= resumed_loads <= 2 and again_loads == 0  # at most one construction per actor; none if nothing to do
    loads = record["evaluations"][-2]["actors"]
    assert len({(a["host"], a["pid"]) for a in loads}) == len(loads)


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
    config = config_for(workdir, f"benchmarks.0.root={data}", f"output_dir={tmp_path / 'runs'}",
                        "max_error_fraction=0.1")  # 1 of 12 images
    result = run_eval(config, run_id="bad", track=False)[0]
    assert result.errors == 1
    errors = pq.read_table(result.scores_path.with_name("errors.parquet")).to_pylist()
    assert errors[0]["item_id"] == victim.item_id and "cannot decode image" in errors[0]["error"]
    assert result.report.counts["4way/individual_acc/total"] == 11  # the denominator says what was scored
    # Above the error budget (default 5%): everything is written, then the run fails naming count and reason.
    with pytest.raises(TooManyImageErrors, match=r"whatsup_controlled_a: 1 of 12 images unreadable \(8\.3% > "):
        run_eval(config_for(workdir, f"benchmarks.0.root={data}", f"output_dir={tmp_path / 'runs'}"),
                 run_id="bad_budget", track=False)
    assert (tmp_path / "runs" / "bad_budget" / "whatsup_controlled_a" / "metrics.json").is_file()
    # on_error=fail: the ImageError raised inside a Ray task comes out as itself, not a wrapped Ray traceback.
    with pytest.raises(ImageError) as info:
        run_eval(config_for(workdir, f"benchmarks.0.root={data}", f"output_dir={tmp_path / 'runs'}",
                            "on_error=fail"), run_id="bad2", track=False)
    assert str(info.value).startswith(str(data / victim.images[0])) and "cannot decode image" in str(info.value)
    assert "Traceback" not in str(info.value) and "RayTaskError" not in str(info.value)


def test_image_errors_inside_ray_exit_2_with_one_line(ray_local, workdir, tmp_path, capsys):
    from perceive_ray.cli import main

    data = tmp_path / "whatsup"
    shutil.copytree(workdir / "synth" / "whatsup", data)
    victim = load_benchmark("whatsup_controlled_a", data).items[0]
    (data / victim.images[0]).write_bytes(b"")
    code = main(["eval", str(EXPERIMENT), "--smoke", "--no-track", "--on-error", "fail", "--run-id", "unwrap",
                 f"benchmarks=[{{name: whatsup_controlled_a, root: '{data}'}}]",
                 f"model.source={workdir / 'tiny_clip'}", f"output_dir={tmp_path / 'runs'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("perceive-ray: error:")]
    assert code == 2 and len(err) == 1 and "cannot decode image" in err[0] and str(data) in err[0]


def test_resume_refuses_a_different_option(ray_local, workdir):
    run_eval(config_for(workdir), run_id="mismatch", track=False)
    with pytest.raises(RunMismatchError, match=r"scorer\.options\.clip_transform: 'val' -> 'train_compat'"):
        run_eval(config_for(workdir, "scorer.options.clip_transform=train_compat"), run_id="mismatch", track=False)
    # Writing a default explicitly is not a change.
    run_eval(config_for(workdir, "scorer.options.clip_transform=val", "scorer.options.seed=0"), run_id="mismatch",
             track=False)


def test_object_store_budget_is_applied_and_restored(ray_local, workdir, monkeypatch):
    import ray.data

    seen = []
    original = RayDataExecutor.stream

    def spy(self, *args, **kwargs):
        for block in original(self, *args, **kwargs):
            seen.append(ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory)
            yield block

    monkeypatch.setattr(RayDataExecutor, "stream", spy)
    # A 1 MB budget (less than one decoded batch) must still finish: backpressure, not a deadlock.
    results = run_eval(config_for(workdir, "resources.object_store_mb=1"), run_id="budget", track=False)
    assert seen and set(seen) == {2**20}
    assert results[0].report.counts["4way/individual_acc/total"] == 12
    assert ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory == float("inf")


def test_decode_tasks_caps_the_decoding_pool(ray_local, workdir, monkeypatch):
    """resources.decode_tasks: Ray Data gets TaskPoolStrategy(size=n) for image decoding (one worker process
    instead of as many as the CPUs allow); the scores are the same as with the default pool."""
    import ray.data

    pools = []
    original = ray.data.Dataset.map_batches

    def spy(self, fn, *args, **kwargs):
        if getattr(fn, "__name__", "") == "decode_batch":
            pools.append(kwargs.get("compute"))
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    capped = run_eval(config_for(workdir, "resources.decode_tasks=1"), run_id="decode_one", track=False)
    free = run_eval(config_for(workdir), run_id="decode_free", track=False)
    assert isinstance(pools[0], ray.data.TaskPoolStrategy) and pools[0].size == 1
    assert pools[1] is None  # default: Ray Data's own choice
    assert capped[0].report.metrics == free[0].report.metrics
    assert_same_rows(scores_of(capped[0].scores_path), scores_of(free[0].scores_path))
    assert ResourcesConfig().decode_tasks is None
    with pytest.raises(ValueError, match="decode_tasks"):
        ResourcesConfig(decode_tasks=0)


def test_decoded_rows_keep_texts_as_an_arrow_list_of_strings(ray_local, workdir):
    """decode_batch's output goes back into Ray Data blocks with ``texts`` as list<string> (the manifest's type),
    not as a pickled-object column (Ray logs an ArrowConversionError warning for the object arrays it hands in)."""
    import pyarrow as pa
    import ray.data

    from perceive_ray.data.images import scoring_rows
    from perceive_ray.run.inference import decode_batch

    root = workdir / "synth" / "whatsup"
    rows = scoring_rows(load_benchmark("whatsup_controlled_a", root), limit=3)
    assert all(len(row["texts"]) == 4 for row in rows)
    rows[0]["texts"] = rows[0]["texts"][:2]  # ragged lists, as across benchmarks
    ds = ray.data.from_items(rows).map_batches(
        decode_batch, fn_kwargs={"roots": {"whatsup_controlled_a": str(root)}, "on_error": "record"}, batch_size=2)
    table = pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert table.schema.field("texts").type == pa.list_(pa.string())
    # Ray Data does not promise the input order across blocks: match the rows by their ids.
    got = {(r["item_id"], r["image_index"]): r for r in table.select(["item_id", "image_index", "texts", "error"])
           .to_pylist()}
    assert sorted(got) == sorted((row["item_id"], row["image_index"]) for row in rows)
    for row in rows:
        assert got[(row["item_id"], row["image_index"])]["texts"] == row["texts"]
        assert got[(row["item_id"], row["image_index"])]["error"] == ""
