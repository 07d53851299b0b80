"""Training on 2 CPU workers (gloo) through Ray Train + DeepSpeed with tiny random-init models and synthetic data.

Every test goes through ``run_train`` (the CLI's path): per-rank Ray Data pipelines, ``train_fn_per_worker``,
DeepSpeed ZeRO-2/3, checkpoints reported by every rank, the export. The loss must go down (same samples seen in the
first and the last epoch), ``lock_image`` must leave the vision tower bit-identical, and a worker killed at a seeded
step must resume from the checkpoint and end with exactly the parameters of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perceive_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLIP_EXP = REPO / "experiments/train/clip_negclip_lock.yaml"
HEADS_EXP = REPO / "experiments/train/pacl_rope.yaml"
# 32 image samples (16 + 16) / 8 rows per step = 4 steps per epoch; 3 epochs revisit the same samples.
REPEAT = {"train.epochs": 3, "train.max_steps": None, "train.checkpoint.every_steps": 4, "train.log_every_steps": 1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_local):
    """A working directory with the synthetic LLaVA data and the tiny models the smoke blocks name."""
    from perceive_ray.smoke import prepare_smoke

    root = tmp_path_factory.mktemp("train")
    previous = Path.cwd()
    os.chdir(root)
    try:
        prepare_smoke(load_config(HEADS_EXP, smoke=True))
        yield root
    finally:
        os.chdir(previous)


def train(workdir: Path, experiment: Path, run_id: str, *, track: bool = False, **overrides):
    from perceive_ray.run.training import run_train

    os.chdir(workdir)
    config = load_config(experiment, {"output_dir": str(workdir / "runs"), **overrides}, smoke=True)
    result = run_train(config, run_id=run_id, track=track)
    run_dir = workdir / "runs/train" / run_id
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return result, run_dir, log


def epoch_losses(log: list[dict], steps_per_epoch: int = 4) -> list[float]:
    by_step = {row["step"]: row["train/loss"] for row in log}  # a resumed run logs some steps twice: last wins
    epochs = max(by_step) // steps_per_epoch
    return [sum(by_step[s] for s in range(e * steps_per_epoch + 1, (e + 1) * steps_per_epoch + 1)) / steps_per_epoch
            for e in range(epochs)]


def train_actor_processes() -> list[str]:
    lines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line for line in lines if line.startswith(("ray::TrainController", "ray::DatasetManager"))]


def test_clip_negclip_zero2_locked_vision_is_bit_identical(workdir):
    handler = signal.getsignal(signal.SIGINT)
    result, run_dir, log = train(workdir, CLIP_EXP, "clip_z2", **REPEAT, **{"train.optim.lr": 5e-4})
    # Ray Train's SIGINT handler (which holds the controller's handle) is replaced by the previous one: the
    # controller and its DatasetManager exit instead of living on in this driver (~1 GB on the demo's sweep).
    assert signal.getsignal(signal.SIGINT) is handler
    deadline = time.monotonic() + 30
    while train_actor_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not train_actor_processes()
    losses = epoch_losses(log)
    assert losses[-1] < losses[0], losses
    assert all(row["train/negatives_local"] >= 0 for row in log)
    before = load_file(str(workdir / "runs/tiny/clip/open_clip_model.safetensors"))
    after = load_file(str(Path(result["export"]) / "open_clip_model.safetensors"))
    assert before.keys() == after.keys()
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["plan"]["chunks"] == 2 and record["plan"]["world_size"] == 2
    assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2


def test_clip_zero3_unlocked_trains_and_exports_full_weights(workdir):
    from perceive_ray.config import ModelConfig
    from perceive_ray.models.clip import load_clip

    result, run_dir, log = train(workdir, CLIP_EXP, "clip_z3", **REPEAT, **{
        "train.optim.lr": 5e-4, "train.clip.lock_image": False, "train.deepspeed.zero_stage": 3,
        "train.deepspeed.stage3_param_persistence_threshold": 0})
    losses = epoch_losses(log)
    assert losses[-1] < losses[0], losses
    ds = json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]
    assert ds["stage"] == 3 and ds["stage3_param_persistence_threshold"] == 0
    before = load_file(str(workdir / "runs/tiny/clip/open_clip_model.safetensors"))
    after = load_file(str(Path(result["export"]) / "open_clip_model.safetensors"))
    # gathered on every rank before rank 0 exported: no empty (0,) partitions, and the vision tower trained too
    assert all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    bundle = load_clip(ModelConfig(family="clip", source=result["export"]), device="cpu")
    assert bundle.model is not None


@pytest.mark.parametrize("kind", ["pacl", "pacl_rope", "sparc_rope"])
def test_heads_train_under_zero2_and_store_their_spec(workdir, kind):
    from perceive_ray.models.heads.pacl import load_head_file

    # the first one also logs to MLflow (its own run; a sweep trial's is tests/e2e/test_sweep.py)
    tracking = {"tracking.uri": f"sqlite:///{workdir / 'mlflow.db'}"} if kind == "pacl" else {}
    result, run_dir, log = train(workdir, HEADS_EXP, f"head_{kind}", track=bool(tracking), **REPEAT,
                                 **{"train.heads.kind": kind}, **tracking)
    if tracking:
        check_tracked_run(tracking["tracking.uri"], run_dir, steps=len(log))
    losses = epoch_losses(log)
    assert losses[-1] < losses[0], losses
    state, spec = load_head_file(Path(result["export"]) / "head.safetensors")
    assert spec.kind == ("sparc" if kind.startswith("sparc") else "pacl")
    assert spec.rope == kind.endswith("rope")
    if spec.kind == "sparc":
        assert spec.sigma == pytest.approx(1 / spec.num_patches)  # sigma stored with the weights
    else:
        assert spec.pooling == "uniform"
    if kind == "sparc_rope":
        assert "train/local_loss" in log[-1] and "train/global_loss" in log[-1]


def check_tracked_run(uri: str, run_dir: Path, *, steps: int) -> None:
    """One MLflow run per run id: the resolved config as dotted params, rank 0's per-step curves, the export."""
    from mlflow import MlflowClient

    state = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and state["status"] == "FINISHED"
    assert run.data.params["train.heads.kind"] == "pacl" and run.data.params["train.batch.global"] == "8"
    curve = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in curve) == list(range(1, steps + 1))
    assert {"train/lr", "train/samples_per_s", "train/step_time_s"} <= set(run.data.metrics)
    assert run.data.tags["export"] == str(run_dir / "export")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "result.json"}


def test_siglip_with_negatives_trains_its_logit_bias(workdir):
    from perceive_ray.smoke import prepare_smoke

    experiment = REPO / "experiments/train/siglip_negatives.yaml"
    os.chdir(workdir)
    prepare_smoke(load_config(experiment, smoke=True))  # the tiny CLIP with a learned logit_bias
    result, _, log = train(workdir, experiment, "siglip", **REPEAT, **{"train.optim.lr": 5e-4})
    losses = epoch_losses(log)
    assert losses[-1] < losses[0], losses
    before = load_file(str(workdir / "runs/tiny/siglip/open_clip_model.safetensors"))
    after = load_file(str(Path(result["export"]) / "open_clip_model.safetensors"))
    assert not torch.equal(before["logit_bias"], after["logit_bias"])


def test_llm_text_head_trains_on_a_precomputed_store(workdir):
    """§5.5: LLM2CLIP patches + LLM2Vec vectors from a store (built by --smoke over the synthetic captions)."""
    from perceive_ray.models.heads.pacl import load_head_file
    from perceive_ray.smoke import prepare_smoke

    experiment = REPO / "experiments/train/pacl_llm_text.yaml"
    os.chdir(workdir)
    prepare_smoke(load_config(experiment, smoke=True))
    assert (workdir / "runs/tiny/pacl_llm_text/text_embeddings/manifest.json").is_file()
    result, _, log = train(workdir, experiment, "llm_text", **REPEAT)
    losses = epoch_losses(log)
    assert losses[-1] < losses[0], losses
    _, spec = load_head_file(Path(result["export"]) / "head.safetensors")
    assert spec.kind == "pacl" and spec.rope


def test_killed_worker_resumes_to_the_uninterrupted_parameters(workdir, monkeypatch):
    """Rank 1 dies before step 6 (checkpoints every 2 steps); the restarted group ends where an uninterrupted run does.

    Ray registers a reported checkpoint asynchronously, so the restart begins after step 4 or, if the controller had
    not yet collected that report when the worker died, after step 2; either way the steps after it are replayed.

    PACL+RoPE with dropout 0.1 and 2 GradCache chunks: equality needs the same data order, the same dropout masks
    (keyed by step, rank and chunk) and the restored Adam state. The killed run decodes its images in the workers
    (``data.decode_tasks: 0``), the clean one in Ray Data tasks: equality also shows both give the same pixels, and
    that the row ids the workers make themselves restart at the checkpoint's step.
    """
    settings = {**REPEAT, "train.epochs": 2, "train.checkpoint.every_steps": 2}
    clean, _, _ = train(workdir, HEADS_EXP, "fault_clean", **settings)
    monkeypatch.setenv("PERCEIVE_RAY_FAULT", "train_worker:6")
    faulty, run_dir, log = train(workdir, HEADS_EXP, "fault_killed", **settings, **{"data.decode_tasks": 0})
    assert (run_dir / ".fault-train_worker-6").exists()  # the fault did fire
    steps = [row["step"] for row in log]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == list(range(1, 6))  # steps 1-5 ran, then rank 1 died before step 6
    assert steps[restart] in (3, 5) and steps[restart:] == list(range(steps[restart], 9))  # from a checkpoint
    a = load_file(str(Path(clean["export"]) / "head.safetensors"))
    b = load_file(str(Path(faulty["export"]) / "head.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_workers_that_decode_their_rows_get_no_dataset_and_no_dataset_manager(workdir):
    """``data.decode_tasks: 0``: the trainer has no datasets and none of Ray Train's datasets callback (which would
    start a DatasetManager actor, a process, at every worker-group start); decoding tasks keep one dataset a rank."""
    from perceive_ray.run.training import build_trainer, prepare_training

    def trainer(run_id: str, **overrides):
        os.chdir(workdir)
        config = load_config(HEADS_EXP, {"output_dir": str(workdir / "runs"), **overrides}, smoke=True)
        built = build_trainer(prepare_training(config, run_id=run_id), {})
        return built, {type(cb).__name__ for cb in built._create_default_callbacks()}

    in_workers, callbacks = trainer("no_dataset", **{"data.decode_tasks": 0})
    assert not in_workers.datasets and "DatasetsCallback" not in callbacks
    in_tasks, callbacks = trainer("datasets", **{"data.decode_tasks": 1})
    assert set(in_tasks.datasets) == {"rank0", "rank1"} and "DatasetsCallback" in callbacks


def test_unreadable_image_mid_epoch_is_counted_skipped_and_logged(workdir):
    """Preflight checks that every image exists; one that exists but cannot be decoded is skipped when met."""
    import shutil

    bad = workdir / "synth_bad/llava"
    if not bad.exists():
        shutil.copytree(workdir / "synth/llava", bad)
        victim = sorted((bad / "images/pretrain").glob("*.jpg"))[0]
        victim.write_bytes(b"not a jpeg")
    sources = [{"name": "llava_558k", "path": str(bad / "synthetic_558k.json"), "image_root": str(bad / "images"),
                "format": "pretrain"}]
    result, run_dir, log = train(workdir, HEADS_EXP, "unreadable", **{
        "data.sources": sources, "train.max_steps": None, "train.epochs": 1, "data.max_missing_fraction": 0.5})
    assert log[-1]["train/missing_images"] == 1  # 16 samples, 2 steps: met once, skipped, counted
    assert result["steps"] == 2 and Path(result["export"]).is_dir()


LOCAL_TWO_RUNS = """
import json, os, sys
from perceive_ray.config import load_config
from perceive_ray.run.training import run_train
experiment, workdir, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
os.chdir(workdir)
for run_id in ("local_clean", "local_killed"):  # a fresh local run, then the killed one's resume: one process
    config = load_config(experiment, {"output_dir": os.path.join(workdir, "runs"), **settings}, smoke=True)
    print("RESULT " + json.dumps(run_train(config, run_id=run_id, track=False)), flush=True)
"""


def test_local_mode_equals_a_worker_group_and_a_killed_local_run_resumes(workdir):
    """``resources.local``: Ray Train's local mode runs ``train_fn_per_worker`` in the calling process. Its export is
    bit-identical to a one-worker group's; a local-mode run whose process dies (``os._exit`` before step 6) resumes,
    on rerun, from the checkpoint perceive_ray registered for it and ends bit-identical too. The clean and the
    resumed local runs run one after the other in one process (what a sweep's reused trial actor does). The local
    runs are subprocesses: a process keeps its gloo group of one (``local_process_group``), which this pytest
    process's later DeepSpeed tests must not find."""
    import sys

    settings = {**REPEAT, "train.epochs": 2, "train.checkpoint.every_steps": 2, "data.decode_tasks": 0,
                "resources.num_workers": 1, "resources.cpus_per_worker": 1, "train.checkpoint.num_to_keep": 1}
    group, _, _ = train(workdir, HEADS_EXP, "group_one", **settings)
    local = {**settings, "resources.local": True}
    env = {**os.environ, "PERCEIVE_RAY_FAULT": "train_worker:6", "RAY_ADDRESS": ""}
    overrides = [f"{key}={json.dumps(value)}" for key, value in local.items()]
    killed = subprocess.run([sys.executable, "-m", "perceive_ray", "train", str(HEADS_EXP), "--smoke", "--no-track",
                             "--run-id", "local_killed", f"output_dir={workdir / 'runs'}", *overrides],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    killed_dir = workdir / "runs/train/local_killed"
    assert killed.returncode == 1 and (killed_dir / ".fault-train_worker-6").exists(), killed.stderr[-3000:]
    assert json.loads((killed_dir / "ray/local_checkpoints.json").read_text()) == [4]  # num_to_keep 1
    assert "in this process (Ray Train's local mode)" in killed.stdout
    assert "TrainController" not in killed.stdout + killed.stderr  # no controller, no worker: it trained in-process

    env.pop("PERCEIVE_RAY_FAULT")
    both = subprocess.run([sys.executable, "-c", LOCAL_TWO_RUNS, str(HEADS_EXP), str(workdir), json.dumps(local)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert both.returncode == 0, both.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in both.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2
    clean_dir = workdir / "runs/train/local_clean"
    assert json.loads((clean_dir / "ray/local_checkpoints.json").read_text()) == [8]
    assert sorted(p.name for p in (clean_dir / "ray").glob("step_*")) == ["step_00000008"]
    assert results[0]["checkpoint"] == str(clean_dir / "ray/step_00000008")
    log = [json.loads(line)["step"] for line in (killed_dir / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # the rerun resumed from step 4's checkpoint
    a = load_file(str(Path(group["export"]) / "head.safetensors"))
    for result in results:
        b = load_file(str(Path(result["export"]) / "head.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_mode_needs_one_rank_decoding_its_own_rows():
    from perceive_ray.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="resources.local.*num_workers: 1"):
        load_config(HEADS_EXP, {"resources.local": True, "data.decode_tasks": 0}, smoke=True)  # smoke: 2 workers
    with pytest.raises((ConfigError, ValueError), match="resources.local.*data.decode_tasks: 0"):
        load_config(HEADS_EXP, {"resources.local": True, "resources.num_workers": 1, "data.decode_tasks": 1},
                    smoke=True)
