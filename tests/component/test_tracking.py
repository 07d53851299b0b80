"""Tracking into a real `mlflow server` (127.0.0.1, SQLite); fail-fast on an unreachable URI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perceive_ray.cli import main
from perceive_ray.tracking.tracker import TrackingError, check_reachable, flatten_params, resolve_tracking_uri
from tests.fixtures.mlflow_server import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments" / "eval" / "clip_whatsup.yaml"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("work")
    assert main(["data", "synth", "--out", str(path / "synth"), "--seed", "0", "--pairs", "2"]) == 0
    assert main(["model", "tiny", "clip", "--out", str(path / "runs" / "tiny" / "clip")]) == 0
    return path


def test_score_logs_runs_to_server(server, workdir, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    assert main(["score", str(EXPERIMENT), "--smoke", "--out", "out", f"tracking.uri={server}",
                 "tracking.experiment=tracking_test"]) == 0
    assert f"open the runs at: {server}" in capsys.readouterr().out
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("tracking_test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["out"]  # one run per evaluation, named after its run dir
    run = runs[0]
    assert run.info.status == "FINISHED"
    for benchmark in ("whatsup_controlled_a", "whatsup_controlled_b"):
        local = json.loads((workdir / "out" / benchmark / "metrics.json").read_text())
        for key, value in local["metrics"].items():
            assert run.data.metrics[f"{benchmark}/{key}"] == value
    assert run.data.params["scorer.name"] == "clip_cosine" and run.data.params["benchmarks.0.limit"] == "8"
    tags = run.data.tags
    assert tags["tie_policy"] == "strict" and tags["label_errata"] == "original" and tags["scorer"] == "clip_cosine"
    assert tags["benchmarks"] == "whatsup_controlled_a,whatsup_controlled_b" and tags["runner"] == "local"
    assert tags["version.torch"] and tags["git_sha"]
    # The scorer's describe() output is tagged too (describe.*), as in run_record.json and the scores' metadata.
    assert tags["describe.scorer"] == "clip_cosine" and tags["describe.clip_transform"] == "val"
    assert tags["describe.device"] == "cpu" and len(tags["weights"]) == 16
    assert len(tags["dataset.whatsup_controlled_a.controlled_images_dataset.json"]) == 64
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"whatsup_controlled_a", "whatsup_controlled_b", "config.yaml", "run_record.json"} <= artifacts
    inner = {a.path for a in client.list_artifacts(run.info.run_id, "whatsup_controlled_a")}
    assert {"whatsup_controlled_a/scores.parquet", "whatsup_controlled_a/metrics.json"} <= inner


def test_unreachable_server_fails_fast(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["score", str(EXPERIMENT), "--smoke", "--out", "out2", f"tracking.uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert f"tracking server {uri} is unreachable" in err
    assert not (workdir / "out2" / "whatsup_controlled_a" / "scores.parquet").exists()  # nothing was scored


def test_tracking_uri_resolution_and_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(TrackingError, match="refuses the file store"):
        check_reachable("./mlruns")
    with pytest.raises(TrackingError, match="does not exist"):
        check_reachable(f"sqlite:///{tmp_path / 'nope' / 'm.db'}")
    flat = flatten_params({"a": {"b": 1, "c": [{"d": 2}]}, "e": [1, 2], "f": {}})
    assert flat == {"a.b": "1", "a.c.0.d": "2", "e": "[1, 2]", "f": "{}"}
