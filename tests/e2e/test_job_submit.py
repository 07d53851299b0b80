"""`ray job submit` end to end: a head on its own ports, the smoke eval submitted with the working dir, the run
found in a real `mlflow server`. Stops only the processes this test started (never `ray stop`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.mlflow_server import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def wait_http(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"ray head exited: {log.read_text()[-3000:]}") from None
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s: {log.read_text()[-3000:]}")


def submit_job(address: str, work: Path, env: dict, tracking: str, whatsup: Path, data: Path):
    """`ray job submit` of the smoke eval. The dashboard answers before its job agent is up (more so on a loaded
    machine): Ray's own answer is "No available agent to submit job, please try again later", so try again."""
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
               "--submission-id", "perceive-smoke", "--",
               "python", "-m", "perceive_ray", "eval", "experiments/eval/clip_whatsup.yaml", "--smoke",
               "--run-id", "job", f"tracking.uri={tracking}", "tracking.experiment=job_submit",
               "resources.num_cpus_per_actor=0.5",
               f"benchmarks=[{{name: whatsup_controlled_a, root: '{whatsup}', limit: 8}}, "
               f"{{name: whatsup_controlled_b, root: '{whatsup}', limit: 8}}]", f"model.source={data / 'tiny_clip'}"]
    for _ in range(12):
        submit = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            return submit
        time.sleep(5)
    return submit


def test_ray_job_submit_smoke_eval(tmp_path):
    # The job's working dir: a copy of the repository (tracked files only) plus its data and tiny model.
    work = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, work / name)
    # The cluster's Python environment is this venv (on a real cluster: the image or runtime_env pip).
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
                        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Data and weights live outside the working dir (shared storage on a real cluster): the upload respects
    # .gitignore, and datasets do not belong in the job package anyway.
    data = tmp_path / "data"
    subprocess.run([str(BIN / "perceive-ray"), "data", "synth", "--out", str(data / "synth"), "--pairs", "2"],
                   env=env, check=True, capture_output=True)
    subprocess.run([str(BIN / "perceive-ray"), "model", "tiny", "clip", "--out", str(data / "tiny_clip")],
                   env=env, check=True, capture_output=True)
    whatsup = data / "synth" / "whatsup"

    gcs, dashboard = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="pr-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    log = tmp_path / "ray_head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dashboard),
             "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2",
             "--node-ip-address", "127.0.0.1", "--temp-dir", ray_tmp, "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_http(address + "/api/version", 120, head, log)
        with mlflow_server(tmp_path) as tracking:
            submit = submit_job(address, work, env, tracking, whatsup, data)
            assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
            assert "Job 'perceive-smoke' succeeded" in submit.stdout + submit.stderr

            from mlflow import MlflowClient

            client = MlflowClient(tracking)
            experiment = client.get_experiment_by_name("job_submit")
            runs = client.search_runs([experiment.experiment_id])
            assert [r.info.run_name for r in runs] == ["job"]
            run = runs[0]
            assert run.info.status == "FINISHED" and run.data.tags["runner"] == "ray_data"
            assert {"whatsup_controlled_a/2way/individual_acc", "whatsup_controlled_b/4way/set_acc",
                    "whatsup_controlled_a/image_errors"} <= set(run.data.metrics)
    finally:
        # `ray start --block` and the processes it started (its own session), nothing else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
