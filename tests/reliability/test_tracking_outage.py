"""Tracking faults with a real `mlflow server` on 127.0.0.1: killed mid-run, driver killed, secrets in the URI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perceive_ray.cli import main
from perceive_ray.config import load_config
from perceive_ray.data.synthetic import generate
from perceive_ray.evaluation import run_evaluation
from perceive_ray.models.clip import save_tiny_clip
from perceive_ray.scoring.local import LocalExecutor
from tests.fixtures.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments" / "eval" / "clip_whatsup.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("outage")
    generate(path / "synth", seed=5, pairs=12)
    save_tiny_clip(path / "clip")
    return path


def overrides(workdir: Path, uri: str, *extra: str) -> list[str]:
    root = workdir / "synth" / "whatsup"
    return [f"benchmarks=[{{name: whatsup_controlled_a, root: '{root}'}}, {{name: whatsup_controlled_b, root: '{root}'}}]",
            f"model.source={workdir / 'clip'}", "model.pretrained=null", f"output_dir={workdir / 'runs'}",
            f"tracking.uri={uri}",
            "tracking.experiment=outage", "scorer.batch_size=4", *extra]


class KillingExecutor(LocalExecutor):
    """The in-process executor, but the tracking server dies after the first block (an outage mid-run)."""

    def __init__(self, server: MlflowServer) -> None:
        super().__init__()
        self.server = server

    def stream(self, *args, **kwargs):
        for n, block in enumerate(super().stream(*args, **kwargs)):
            yield block
            if n == 0:
                self.server.kill()


def runs_named(uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("outage")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == name]


def test_server_killed_mid_run_scores_finish_then_track_logs_them(workdir, tmp_path, monkeypatch, capsys):
    server = MlflowServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    uri = server.start()
    import perceive_ray.scoring.local as local

    monkeypatch.setattr(local, "LocalExecutor", lambda: KillingExecutor(server))
    start = time.monotonic()
    code = main(["score", str(EXPERIMENT), "--run-id", "killed_server", *overrides(workdir, uri)])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 3, err
    assert elapsed < 120  # bounded: one failed call at most, not minutes of retries per benchmark
    assert "tracking to" in err and f"perceive-ray track {workdir / 'runs' / 'killed_server'}" in err
    run_dir = workdir / "runs" / "killed_server"
    for bench in ("whatsup_controlled_a", "whatsup_controlled_b"):
        metrics = json.loads((run_dir / bench / "metrics.json").read_text())
        assert metrics["items_scored"] == 48  # every image scored despite the outage
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["status"] == "TRACKING_FAILED" and state["mlflow_run_id"] and "failed" in state["error"]

    server.start()  # the server is back (same store, same port)
    try:
        assert main(["track", str(run_dir)]) == 0
        runs = runs_named(uri, "killed_server")
        assert len(runs) == 1 and runs[0].info.run_id == state["mlflow_run_id"]  # the same run, reopened
        assert runs[0].info.status == "FINISHED"
        for bench in ("whatsup_controlled_a", "whatsup_controlled_b"):
            local_metrics = json.loads((run_dir / bench / "metrics.json").read_text())["metrics"]
            for key, value in local_metrics.items():
                assert runs[0].data.metrics[f"{bench}/{key}"] == value
        assert runs[0].data.tags["describe.scorer"] == "clip_cosine"
        assert json.loads((run_dir / "tracking.json").read_text())["status"] == "FINISHED"
    finally:
        server.kill()


DRIVER = """
import sys
from perceive_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_driver_leaves_no_running_run_after_resume(workdir, tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    uri = server.start()
    run_dir = workdir / "runs" / "killed_driver"
    try:
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        process = subprocess.Popen([sys.executable, "-c", DRIVER, "score", str(EXPERIMENT), "--run-id",
                                    "killed_driver", *overrides(workdir, uri, "scorer.batch_size=1")],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + 120
        while not (run_dir / "tracking.json").is_file():  # written right after the tracked run opens
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        (left,) = runs_named(uri, "killed_driver")
        assert left.info.status == "RUNNING"  # what a killed driver leaves behind
        assert (run_dir / ".lock").exists()  # and a stale lock, taken over below
        config = load_config(EXPERIMENT, overrides(workdir, uri))
        run_evaluation(config, LocalExecutor(), run_id="killed_driver")
        runs = runs_named(uri, "killed_driver")
        assert len(runs) == 1 and runs[0].info.run_id == left.info.run_id and runs[0].info.status == "FINISHED"
    finally:
        server.kill()


def test_credentials_in_the_tracking_uri_are_never_printed_or_recorded(workdir, capsys):
    secret_uri = f"http://alice:s3cr3t-pw@127.0.0.1:{free_port()}"
    assert main(["score", str(EXPERIMENT), "--run-id", "secret", *overrides(workdir, secret_uri)]) == 2
    err = capsys.readouterr().err
    assert "s3cr3t" not in err and "alice" not in err and "http://***@127.0.0.1" in err
    # An untracked run records its config (tracking.uri included) without the password.
    assert main(["score", str(EXPERIMENT), "--run-id", "secret", "--no-track", *overrides(workdir, secret_uri),
                 "benchmarks.0.limit=2", "benchmarks.1.limit=2"]) == 0
    recorded = (workdir / "runs" / "secret" / "config.yaml").read_text()
    assert "uri: http://***@127.0.0.1" in recorded
    for path in (workdir / "runs" / "secret").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json"):
            assert "s3cr3t" not in path.read_text(), path


def session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "sid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(sid) and "Z" not in line.split()[1]]


def test_driver_killed_mid_benchmark_leaves_no_ray_processes_and_resumes_exactly(workdir):
    """PERCEIVE_RAY_FAULT=block:3 SIGKILLs the eval driver after its third block: the local Ray it started must not
    outlive it (the reaper), and a resume with the same run id equals an uninterrupted run row for row."""
    uri = f"sqlite:///{workdir / 'unused.db'}"
    args = ["eval", str(EXPERIMENT), "--no-track", *overrides(workdir, uri, "scorer.batch_size=2")]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "perceive_ray", *args, "--run-id", "fault_block3"], cwd=REPO,
                              env=env | {"PERCEIVE_RAY_FAULT": "block:3"}, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while session_processes(killed.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert session_processes(killed.pid) == [], "processes of the killed run outlived it"
    done = subprocess.run([sys.executable, "-m", "perceive_ray", *args, "--run-id", "fault_block3"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "image rows already scored" in done.stderr
    # The uninterrupted reference, in process (same rows; another batch composition moves fp32 sums by ~1e-7).
    run_evaluation(load_config(EXPERIMENT, overrides(workdir, uri, "scorer.batch_size=2")), LocalExecutor(),
                   run_id="fault_fresh", track=False)
    import pyarrow.parquet as pq

    for bench in ("whatsup_controlled_a", "whatsup_controlled_b"):
        resumed, fresh = (pq.read_table(workdir / "runs" / run_id / bench / "scores.parquet")
                          .select(["item_id", "image_index", "text_index", "score"]).to_pylist()
                          for run_id in ("fault_block3", "fault_fresh"))
        key = lambda r: (r["item_id"], r["image_index"], r["text_index"])  # noqa: E731
        assert [key(r) for r in resumed] == [key(r) for r in fresh] and len({key(r) for r in resumed}) == len(resumed)
        assert max(abs(a["score"] - b["score"]) for a, b in zip(resumed, fresh, strict=True)) < 1e-5
