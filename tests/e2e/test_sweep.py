"""`perceive-ray sweep` end to end: a 2 x 2 train-then-eval smoke sweep into a real `mlflow server`, its driver
killed mid-trial and resumed.

One sweep serves every assertion (it is the slowest thing in the suite): exactly 4 FINISHED children under one
parent after the restart, the interrupted trial continued from its checkpoint (not from step 0), training curves
and evaluation metrics on each child, the trial records in the sweep folder. (A sweep's report from MLflow, opened
in headless Chromium, is checked on the demo study's sweep in tests/e2e/test_demo.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.mlflow_server import mlflow_server

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "experiments" / "sweeps" / "training_data.yaml"
OBJECTIVE = "whatsup_controlled_a/2way/lr/pair_acc"
# The third trial stalls before its step 3 (its step-2 checkpoint is registered by then), after the first two
# finished: the kill then catches one trial mid-training, maybe another mid-way, and two finished ones.
HOLD_STEP, HOLD_TRIAL = 3, "_00002"
pytestmark = pytest.mark.slow


def sweep_command(storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "perceive_ray", "sweep", str(SWEEP), "--smoke", "--storage", str(storage), *extra]


def wait_for(predicate, *, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {process.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Run the smoke sweep, kill its driver mid-trial, resume it; yield what the tests inspect."""
    workdir = tmp_path_factory.mktemp("sweep")
    storage = workdir / "sweeps"
    folder = storage / "training_data"
    env = os.environ | {"RAY_DISABLE_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
                        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "PYTHONUNBUFFERED": "1"}
    with mlflow_server(workdir) as uri:
        env["MLFLOW_TRACKING_URI"] = uri
        first_log = workdir / "first.log"
        with open(first_log, "wb") as log:
            marker = workdir / "hold.marker"  # the stalled run writes its run directory here
            process = subprocess.Popen(sweep_command(storage), cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                       env=env | {"PERCEIVE_RAY_FAULT": f"train_hold:{HOLD_STEP}:{marker}:{HOLD_TRIAL}"},
                                       start_new_session=True)
            try:
                wait_for(lambda: marker.is_file() and marker.read_text(), timeout=600,
                         what="a trial's step-2 checkpoint", process=process)
                os.kill(process.pid, signal.SIGKILL)  # the sweep driver only; its reaper stops the Ray it started
                process.wait()
                time.sleep(3)  # the reaper polls every 0.5 s
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # anything left of that session
        interrupted = Path(marker.read_text()).name
        before = children(uri)
        resumed = subprocess.run(sweep_command(storage, "--resume"), cwd=workdir, env=env, capture_output=True,
                                 text=True, timeout=900)
        yield {"uri": uri, "folder": folder, "interrupted": interrupted, "before": before, "resumed": resumed,
               "first_log": first_log.read_text(errors="replace"),
               "children": children(uri), "parents": parents(uri)}


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def parents(uri: str) -> list:
    c = client(uri)
    experiment = c.get_experiment_by_name("perceive_ray_smoke_sweeps")
    return c.search_runs([experiment.experiment_id], filter_string="tags.`perceive.kind` = 'sweep'")


def children(uri: str) -> list:
    c = client(uri)
    experiment = c.get_experiment_by_name("perceive_ray_smoke_sweeps")
    runs = c.search_runs([experiment.experiment_id], filter_string="tags.`perceive.kind` = 'trial'")
    return sorted(runs, key=lambda r: r.data.tags["perceive.trial_label"])


def test_resume_after_a_killed_driver_gives_exactly_four_finished_children(swept):
    assert swept["resumed"].returncode == 0, swept["resumed"].stdout[-4000:] + swept["resumed"].stderr[-4000:]
    # killed mid-trial: the third trial was held mid-training, so a trial before it had finished (two at a time)
    before = {r.data.tags["perceive.trial_id"]: r.info.status for r in swept["before"]}
    assert before[swept["interrupted"]] == "RUNNING" and "FINISHED" in before.values() and len(before) >= 3
    [parent] = swept["parents"]
    runs = swept["children"]
    assert len(runs) == 4, [r.data.tags.get("perceive.trial_label") for r in runs]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert len({r.data.tags["perceive.trial_id"] for r in runs}) == 4
    # the trials kept their child runs (found by their tags, not created again); finished ones were not rerun
    assert {r.info.run_id for r in swept["before"]} <= {r.info.run_id for r in runs}
    finished_before = {r.data.tags["perceive.trial_id"] for r in swept["before"] if r.info.status == "FINISHED"}
    rerun = swept["resumed"].stdout + swept["resumed"].stderr
    assert finished_before and not any(f"[sweep] trial {t}:" in rerun for t in finished_before)
    assert f"[sweep] trial {swept['interrupted']}:" in rerun
    assert [r.data.tags["perceive.trial_label"] for r in runs] == [
        "kind=clip, clip_transform=train_compat", "kind=clip, clip_transform=val",
        "kind=negclip, clip_transform=train_compat", "kind=negclip, clip_transform=val"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 4


def test_the_interrupted_trial_continued_from_its_checkpoint(swept):
    trial = swept["interrupted"]
    out = swept["resumed"].stdout + swept["resumed"].stderr
    assert "resumed from checkpoint step_00000002 at step 2/4" in out
    log = [json.loads(line) for line in
           (swept["folder"] / "runs" / "train" / trial / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]  # steps 1-2 before the kill, 3-4 after: none twice


def test_the_interrupted_trial_ends_with_the_uninterrupted_weights(swept):
    """Its twin (same training factor, another evaluation factor) trained without interruption in the same sweep:
    the exports are bit-identical. A finished training run id is not trained again."""
    import torch
    from safetensors.torch import load_file

    records = {p.stem: json.loads(p.read_text()) for p in (swept["folder"] / "trials").glob("*.json")}
    trial = swept["interrupted"]
    kind = records[trial]["overrides"]["train.loss.kind"]
    [twin] = [t for t, r in records.items() if t != trial and r["overrides"]["train.loss.kind"] == kind]
    exports = [swept["folder"] / "runs" / "train" / t / "export" for t in (trial, twin)]
    files = sorted(p.name for p in exports[0].glob("*.safetensors"))
    assert files and files == sorted(p.name for p in exports[1].glob("*.safetensors"))
    for name in files:
        a, b = (load_file(str(e / name)) for e in exports)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    again = subprocess.run([sys.executable, "-m", "perceive_ray", "train", str(REPO / "experiments/train/clip_ft.yaml"),
                            "--smoke", "--no-track", "--run-id", trial, f"train.loss.kind={kind}",
                            "train.loss.hard_negatives=null", "resources.num_workers=1",  # the sweep's smoke
                            f"output_dir={swept['folder'] / 'runs'}"],
                           cwd=swept["folder"].parents[1], capture_output=True, text=True, timeout=120,
                           env=os.environ | {"HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1"})
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-2000:]


def test_each_child_has_its_params_curves_and_metrics(swept):
    c = client(swept["uri"])
    for run in swept["children"]:
        overrides = json.loads(run.data.tags["perceive.overrides"])
        assert set(overrides) == {"train.loss.kind", "scorer.options.clip_transform"}
        params = run.data.params  # one search space: a training key and an evaluation key (params under eval.)
        assert params["train.loss.kind"] == overrides["train.loss.kind"]
        assert params["eval.scorer.options.clip_transform"] == overrides["scorer.options.clip_transform"]
        assert params["eval.scorer.name"] == "clip_cosine" and params["eval.model.source"].endswith("/export")
        curve = c.get_metric_history(run.info.run_id, "train/loss")
        # a trial killed after logging a step but before that step's checkpoint registered redoes it on resume:
        # logged again, with the same value (the same checkpoint, data and seeds)
        assert {m.step for m in curve} == {1, 2, 3, 4}
        for step in {m.step for m in curve}:
            values = [m.value for m in curve if m.step == step]
            assert max(values) - min(values) < 1e-6, (step, values)
        assert 0.0 <= run.data.metrics[OBJECTIVE] <= 1.0
        assert run.data.tags["eval.runner"] == "ray_data" and run.data.tags["train.job"] == "clip_finetune"
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "whatsup_controlled_a")}
        assert "whatsup_controlled_a/outcomes.parquet" in artifacts


def test_trial_records_rebuild_the_sweep_offline(swept):
    records = [json.loads(p.read_text()) for p in sorted((swept["folder"] / "trials").glob("*.json"))]
    assert len(records) == 4 and {r["status"] for r in records} == {"FINISHED"}
    by_run = {r.info.run_id: r for r in swept["children"]}
    for record in records:
        assert Path(record["eval_run_dir"], "whatsup_controlled_a", "outcomes.parquet").is_file()
        assert by_run[record["mlflow_run_id"]].data.metrics[OBJECTIVE] == pytest.approx(record["metrics"][OBJECTIVE])
    state = json.loads((swept["folder"] / "sweep.json").read_text())
    assert state["parent_run_id"] == swept["parents"][0].info.run_id


def test_a_second_start_without_resume_is_refused(swept, tmp_path):
    result = subprocess.run(sweep_command(swept["folder"].parent), cwd=tmp_path, capture_output=True, text=True,
                            env=os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}, timeout=120)
    assert result.returncode == 2 and "--resume" in result.stderr
