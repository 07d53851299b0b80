"""The evaluation core with the in-process executor: checks before any work, provenance in every file, resume that
refuses mixed provenance (caption edited, weights swapped, dataset swapped, describe changed), one writer per run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from perceive_ray.cli import main
from perceive_ray.config import ConfigError, load_config
from perceive_ray.data.scores import read_provenance
from perceive_ray.data.synthetic import generate
from perceive_ray.evaluation import run_evaluation
from perceive_ray.models.clip import save_tiny_clip
from perceive_ray.run_directory import RunLock, RunLockedError, RunMismatchError
from perceive_ray.scoring.local import LocalExecutor

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments" / "eval" / "clip_whatsup.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("core")
    generate(path / "synth", seed=1, pairs=2)
    save_tiny_clip(path / "clip_a", seed=0)
    save_tiny_clip(path / "clip_b", seed=1)
    return path


def config_for(workdir: Path, root: Path | None = None, model: str = "clip_a", *extra: str):
    root = root or workdir / "synth" / "whatsup"
    return load_config(EXPERIMENT, [
        f"benchmarks=[{{name: whatsup_controlled_a, root: '{root}', limit: 4}}]",
        f"model.source={workdir / model}", f"output_dir={workdir / 'runs'}", *extra,
    ], smoke=True)


def evaluate(config, run_id: str, **kwargs):
    return run_evaluation(config, LocalExecutor(), run_id=run_id, track=False, **kwargs)


def test_provenance_in_record_and_scores_metadata(workdir):
    result = evaluate(config_for(workdir), "prov")[0]
    record = json.loads((workdir / "runs" / "prov" / "run_record.json").read_text())
    describe = record["identity"]["describe"]
    assert describe["scorer"] == "clip_cosine" and describe["clip_transform"] == "val" and describe["device"] == "cpu"
    assert record["identity"]["scorer"]["options"] == {"clip_transform": "val", "seed": 0}
    files = record["identity"]["weights"]["source"]["files"]
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= set(files)
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in files.values())
    assert record["evaluations"][0]["model_loads"] == 1 and record["evaluations"][0]["runner"] == "local"
    stored = read_provenance(result.scores_path)
    assert stored["describe"] == describe and stored["run"]["run_id"] == "prov"


def test_nothing_is_left_behind_when_the_scorer_fails_before_the_first_score(workdir, tmp_path):
    broken = tmp_path / "broken_clip"
    shutil.copytree(workdir / "clip_a", broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    config = config_for(workdir, None, "clip_a", f"model.source={broken}")
    with pytest.raises(Exception):  # noqa: B017 (whatever the loader raises)
        evaluate(config, "fails_first")
    run_dir = workdir / "runs" / "fails_first"
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "run_record.json").exists()
    assert not (run_dir / ".lock").exists()
    # The fixed config is not refused as "different": no score exists.
    evaluate(config_for(workdir), "fails_first")
    assert (run_dir / "run_record.json").is_file()


def test_resume_refuses_an_edited_caption(workdir, tmp_path):
    data = tmp_path / "whatsup"
    shutil.copytree(workdir / "synth" / "whatsup", data)
    evaluate(config_for(workdir, data), "caption")
    annotation = data / "controlled_images_dataset.json"
    records = json.loads(annotation.read_text())
    records[0]["caption_options"][1] = records[0]["caption_options"][1] + " "
    annotation.write_text(json.dumps(records))
    with pytest.raises(RunMismatchError, match=r"datasets\.whatsup_controlled_a\.controlled_images_dataset\.json"):
        evaluate(config_for(workdir, data), "caption")


def test_resume_refuses_weights_swapped_at_the_same_path(workdir, tmp_path):
    model = tmp_path / "clip"
    shutil.copytree(workdir / "clip_a", model)
    evaluate(config_for(workdir, None, "clip_a", f"model.source={model}"), "swap")
    shutil.rmtree(model)
    shutil.copytree(workdir / "clip_b", model)
    with pytest.raises(RunMismatchError, match=r"weights\.source\.files\.\S+\.sha256"):
        evaluate(config_for(workdir, None, "clip_a", f"model.source={model}"), "swap")


def test_resume_refuses_another_dataset_behind_the_same_benchmark(workdir, tmp_path):
    generate(tmp_path / "other", seed=7, pairs=2)
    evaluate(config_for(workdir), "root")
    with pytest.raises(RunMismatchError, match=r"datasets\.whatsup_controlled_a"):
        evaluate(config_for(workdir, tmp_path / "other" / "whatsup"), "root")


def test_resume_refuses_a_changed_describe(workdir):
    evaluate(config_for(workdir, None, "clip_a", "benchmarks.0.limit=2"), "describe")
    path = workdir / "runs" / "describe" / "run_record.json"
    record = json.loads(path.read_text())
    record["identity"]["describe"]["context_length"] = 64  # as if another tokenizer had made the first scores
    path.write_text(json.dumps(record))
    with pytest.raises(RunMismatchError, match=r"context_length: 64 -> 77"):
        evaluate(config_for(workdir, None, "clip_a", "benchmarks.0.limit=4"), "describe")
    shards = list((workdir / "runs" / "describe" / "whatsup_controlled_a" / "shards").glob("part-*.parquet"))
    assert sum(pq.read_table(p).num_rows for p in shards) == 2 * 4  # nothing of the refused run was written


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from perceive_ray.run_directory import RunLock
    lock = RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_one_writer_per_run_directory(workdir, tmp_path):
    run_dir = workdir / "runs" / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"being written by pid {holder.pid} on "):
            evaluate(config_for(workdir), "locked")
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and is taken over.
    assert (run_dir / ".lock").is_file()
    evaluate(config_for(workdir), "locked")
    assert not (run_dir / ".lock").exists()
    # A lock from another host is never broken automatically.
    (run_dir / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "earlier"}))
    with pytest.raises(RunLockedError, match="pid 1 on elsewhere"):
        RunLock(run_dir).acquire()
    os.remove(run_dir / ".lock")


@pytest.mark.parametrize(
    "override, message",
    [
        ("scorer.options.mdoe=t2v", "scorer.options.mdoe: unknown option"),
        ("scorer.options.clip_transform=crop", "scorer.options.clip_transform: Input should be"),
        ("scorer.name=clip_cosinus", "scorer.name: unknown scorer 'clip_cosinus'"),
        ("model.family=clipp", "model.family: unknown model family 'clipp'"),
        ("model.family=llava", "model.family: scorer 'clip_cosine' accepts model families 'clip'"),
        ("model.source=runs/tiny/clip_typo", "model.source: 'runs/tiny/clip_typo' not found"),
        ("model.pretrained=openai", "model.pretrained: must be unset when model.source is a local directory"),
    ],
)
def test_bad_configs_exit_2_within_seconds_from_validate_eval_and_score(workdir, tmp_path, monkeypatch, capsys,
                                                                         override, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = workdir / "synth" / "whatsup"
    common = [f"benchmarks.0.root={root}", f"benchmarks.1.root={root}", f"model.source={workdir / 'clip_a'}",
              override]
    for command in (["validate", str(EXPERIMENT), "--smoke"], ["eval", str(EXPERIMENT), "--smoke"],
                    ["score", str(EXPERIMENT), "--smoke"]):
        start = time.monotonic()
        assert main([*command, *common]) == 2
        assert time.monotonic() - start < 10
        assert message in capsys.readouterr().err
    # Nothing started: no MLflow store, no run directory, no Ray.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs" / "clip_vit_l14_336_whatsup").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_validate_checks_paths_unless_told_not_to(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(EXPERIMENT)]) == 2
    assert "dataset root" in capsys.readouterr().err
    assert main(["validate", str(EXPERIMENT), "--schema-only"]) == 0
    # --smoke: what --smoke prepares (synthetic data, tiny models) need not exist yet.
    assert main(["validate", str(EXPERIMENT), "--smoke"]) == 0
    assert "--smoke prepares synth, runs/tiny/clip" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_config(EXPERIMENT, ["scorer.options.head_weights=x"])


def test_smoke_prepares_data_and_models_in_a_fresh_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["score", str(EXPERIMENT), "--smoke", "--no-track", "benchmarks.0.limit=2",
                 "benchmarks.1.limit=2"]) == 0
    err = capsys.readouterr().err
    assert "smoke: prepared synthetic benchmarks in synth/" in err and "smoke: prepared tiny model clip" in err
    assert (tmp_path / "synth" / "SYNTH.json").is_file() and (tmp_path / "runs" / "tiny" / "clip").is_dir()
    assert main(["score", str(EXPERIMENT), "--smoke", "--no-track", "--run-id", "again"]) == 0
    assert "smoke: prepared" not in capsys.readouterr().err  # already there: nothing rebuilt
