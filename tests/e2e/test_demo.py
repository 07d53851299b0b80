"""`perceive-ray demo` (what `make demo` runs): both tiny models through Ray Data, two MLflow runs, the table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "perceive_ray", "demo", "--workdir", str(workdir), "--pairs", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_DISABLE_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for line in ("tiny CLIP (cosine)       whatsup_controlled_a", "tiny LLaVA (VQAScore)    whatsup_controlled_b",
                 "chance                                             50.0%    25.0%     6.2%"):
        assert line in out
    assert f"mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///{workdir.resolve()}/mlflow.db" in out

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("perceive_ray_demo")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["demo-clip", "demo-llava"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"whatsup_controlled_a/2way/set_acc", "whatsup_controlled_b/2way/pair_acc"} <= set(run.data.metrics)
    llava = next(r for r in runs if r.info.run_name == "demo-llava")
    assert llava.data.tags["scorer"] == "vqascore" and llava.data.params["scorer.options.mode"] == "t2v"
