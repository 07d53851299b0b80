"""`perceive-ray demo --quick` (what CI runs of `make demo`): the world, the shared pretraining, six variants of one
frozen encoder as one sweep (Ray Tune over Ray Train + DeepSpeed, Ray Data scoring), MLflow (one parent, a child per
variant and the shared run), the printed table / verdicts / commands, and the report opened in headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.browser import chromium, page_facts

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
VARIANTS = ["CLIP [CLS] cosine", "CLIP + NegCLIP (lock image)", "+ patch tokens (PACL)", "+ patch tokens + RoPE",
            "LLaVA (patch tokens, VQAScore)", "LLaVA-cls ([CLS] token, VQAScore)"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    workdir = tmp / "demo"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp), "RAY_DISABLE_USAGE_STATS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if os.environ.get("TMPDIR"):
        env["TMPDIR"] = os.environ["TMPDIR"]
    result = subprocess.run([sys.executable, "-m", "perceive_ray", "demo", "--quick", "--workdir", str(workdir)],
                            cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return workdir.resolve(), result.stdout


def test_demo_prints_stages_table_verdicts_and_commands(demo):
    workdir, out = demo
    for stage in ("[demo] 1/4 world", "[demo] 2/4 models", "[demo] 3/4 study", "[demo] 4/4 report"):
        assert stage in out
    assert "eta " in out  # the training runs print step, loss and an ETA
    steps = [line for line in out.splitlines() if "[train] step " in line]
    assert steps and len(steps) == len(set(steps)), "a worker's progress line printed twice"
    # The first trials got ready (imports, checked configs) while the shared pretraining trained, then waited for it.
    shared_done = out.index("[train] finished: export in " + str(workdir / "sweeps/demo_study/runs/train/pretrain"))
    assert "ready, waiting for the shared run(s) to finish" in out[:shared_done]
    table = out[out.index("What'sUp, synthetic and held out"):]
    for variant in VARIANTS:
        assert f"\n{variant} " in table, variant
    for paper in ("  paper: CLIP-ViT-L/14-336px", "  paper: + patch tokens + RoPE", "  paper: LLaVA-1.5-7B"):
        assert paper in table
    assert "93.2" in table and "22.3" in table  # the paper's LR pairs beside the LLaVA and RoPE rows
    assert "\nchance " in table
    verdicts = out[out.index("Does the miniature agree with the paper?"):]
    assert verdicts.count("McNemar exact p = ") == 5 and "binomial p = " in verdicts
    uri = f"sqlite:///{workdir}/mlflow.db"
    assert f"mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri {uri}" in out
    assert f"perceive-ray report --sweep demo_study --tracking-uri {uri}" in out


def test_two_trial_slots_each_reusing_one_trial_process(demo):
    """resources.max_concurrent_trials: 2 holds (BasicVariantGenerator's limit), and reuse_actors=True runs each
    slot's trials in one Tune trial process: two process starts and their imports, not six."""
    import re

    _, out = demo
    started = re.findall(r"\(run_trial pid=(\d+)\)\S* \[sweep\] trial (\w+): (.+?) \(MLflow run ", out)
    assert sorted(label for _, _, label in started) == sorted(VARIANTS)
    assert len({pid for pid, _, _ in started}) == 2, started
    running = [int(n) for n in re.findall(r"\[sweep demo_study\] \d+/6 finished, (\d+) running", out)]
    assert running and max(running) == 2


def test_demo_summary_is_consistent_with_the_sweep_records(demo):
    workdir, _ = demo
    summary = json.loads((workdir / "demo_summary.json").read_text())
    assert summary["quick"] is True and summary["seed"] == 0
    rows = {row["label"]: row for row in summary["table"]["rows"]}
    assert list(rows) == VARIANTS
    assert len(summary["verdicts"]) == 6
    assert {v["outcome"] for v in summary["verdicts"]} <= {"agrees", "disagrees", "not resolved"}
    records = [json.loads(p.read_text()) for p in (workdir / "sweeps" / "demo_study" / "trials").glob("*.json")]
    assert sorted(r["label"] for r in records) == sorted(VARIANTS)
    for record in records:
        assert record["status"] == "FINISHED"
        cell = rows[record["label"]]["cells"]["A L/R pr"]
        assert cell["value"] == pytest.approx(record["metrics"]["whatsup_controlled_a/2way/lr/pair_acc"])
        assert cell["low"] <= cell["value"] <= cell["high"]
    # Every trained variant started from the one shared pretraining: its export is what they read.
    export = workdir / "sweeps" / "demo_study" / "runs" / "train" / "pretrain" / "export"
    assert (export / "open_clip_config.json").is_file()
    for record in records:
        for run_dir in record["train_run_dirs"]:
            config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
            encoder = config["train"]["llava"]["vision_tower"] if config["job"] == "llava" \
                else config["model"]["source"]
            assert encoder == str(export), (record["label"], encoder)


def test_mlflow_has_one_parent_a_child_per_variant_and_the_shared_run(demo):
    from mlflow import MlflowClient

    workdir, _ = demo
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("perceive_ray_demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("perceive.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    trials = [r for r in children if r.data.tags["perceive.kind"] == "trial"]
    shared = [r for r in children if r.data.tags["perceive.kind"] == "shared"]
    assert sorted(r.data.tags["perceive.trial_label"] for r in trials) == sorted(VARIANTS)
    assert len(shared) == 1 and shared[0].data.tags["perceive.trial_id"] == "pretrain"
    assert all(r.info.status == "FINISHED" for r in children)
    assert "train/loss" in shared[0].data.metrics
    for run in trials:
        assert "whatsup_controlled_b/2way/pair_acc" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "report")]
    assert "report/index.html" in artifacts


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def test_the_demo_report_opens_in_chromium(demo, browser):
    workdir, _ = demo
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto((workdir / "report" / "index.html").as_uri())
    page.wait_for_load_state("load")
    facts = page_facts(page)
    assert sorted(facts["rows"]) == sorted(VARIANTS)
    assert facts["chance_rows"] == 1 and facts["chance_visible"]
    assert all(count == 1 and width > 0 for _, count, width in facts["cells"])
    assert facts["images"] and all(done and w > 0 and h > 0 and src.startswith("data:image/png")
                                   for done, w, h, src in facts["images"])
    assert "93.2" in page.content()  # the paper's LLaVA-1.5-7B row beside the demo's LLaVA
    page.screenshot(path=str(workdir / "report" / "screenshot.png"), full_page=True)
    page.close()
