"""A sweep's shared run trains while its trials start: the trials get ready, wait at the gate, and build on its
export; when it fails, every trial fails with its error, the sweep exits with it, and `--resume` retrains the shared
run and finishes the trials.

On the demo's --quick world (its shared CLIP pretraining, one eval-only trial reading it by [CLS] cosine), with the
fault injection of the training tests: the shared run's only worker dies at step 3 and the run allows no restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_failure(tmp_path_factory):
    from perceive_ray.run.demo import prepare_workdir

    workdir = tmp_path_factory.mktemp("shared")
    prepare_workdir(workdir, seed=0, quick=True, resume=False)
    sweep = {
        "kind": "sweep", "name": "shared_gate",
        "shared": [{"id": "pretrain", "experiment": str(REPO / "experiments/demo/clip_pretrain.yaml"),
                    "overrides": {"resources.max_failures": 0}}],
        "experiment": str(REPO / "experiments/demo/clip_whatsup.yaml"),
        "search": {"+variant": {"grid": [{"label": "CLIP [CLS] cosine", "model.source": "shared:pretrain"}]}},
        "objective": {"metric": "whatsup_controlled_a/2way/lr/pair_acc", "mode": "max"},
        "resources": {"trial_cpus": 0.25, "max_concurrent_trials": 1, "max_failures": 0},
        "storage_path": "sweeps", "tracking": {"experiment": "shared_gate"}}
    path = workdir / "shared_gate.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = os.environ | {"RAY_DISABLE_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                        "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-m", "perceive_ray", "sweep", str(path), "--smoke"]
    failed = subprocess.run(command, cwd=workdir, env=env | {"PERCEIVE_RAY_FAULT": "train_worker:3"},
                            capture_output=True, text=True, timeout=600)
    folder = workdir / "sweeps" / "shared_gate"
    after_failure = {"records": sorted(p.name for p in (folder / "trials").glob("*.json")),
                     "shared_result": (folder / "runs" / "train" / "pretrain" / "result.json").exists()}
    resumed = subprocess.run([*command, "--resume"], cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=600)
    return {"failed": failed, "after_failure": after_failure, "resumed": resumed, "folder": folder, "uri": uri}


def test_a_failed_shared_run_fails_its_trials_and_the_sweep(shared_failure):
    failed = shared_failure["failed"]
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0, out[-3000:]
    assert "fault injection: rank 0 exits at step 3" in out
    # the trial was started beside the shared run, got ready, and failed at the gate with the shared run's error
    assert "waiting for the shared run(s) to finish" in out
    assert "SharedRunFailed" in out and "the sweep's shared run failed, so this trial cannot run" in out
    assert shared_failure["after_failure"] == {"records": [], "shared_result": False}  # none got past the gate


def test_resume_retrains_the_shared_run_and_finishes_the_trial(shared_failure):
    resumed = shared_failure["resumed"]
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    folder = shared_failure["folder"]
    export = folder / "runs" / "train" / "pretrain" / "export"
    assert (folder / "runs" / "train" / "pretrain" / "result.json").is_file() and export.is_dir()
    (record,) = [json.loads(p.read_text()) for p in (folder / "trials").glob("*.json")]
    assert record["status"] == "FINISHED" and "whatsup_controlled_a/2way/lr/pair_acc" in record["metrics"]
    config = yaml.safe_load((Path(record["eval_run_dir"]) / "config.yaml").read_text())
    assert Path(config["model"]["source"]) == export  # the trial read the shared run's export

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=shared_failure["uri"])
    experiment = client.get_experiment_by_name("shared_gate")
    runs = client.search_runs([experiment.experiment_id])
    shared = [r for r in runs if r.data.tags.get("perceive.kind") == "shared"]
    trials = [r for r in runs if r.data.tags.get("perceive.kind") == "trial"]
    assert len(shared) == 1 and shared[0].info.status == "FINISHED"
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
