"""``build_deepspeed_config``: the DeepSpeed JSON of an experiment, and that DeepSpeed accepts it (CPU, one process)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perceive_ray.config import load_config
from perceive_ray.train.deepspeed import (
    BUCKET,
    SHM_COMM_OP,
    build_deepspeed_config,
    build_zero_section,
    skip_unused_cpu_comm_op,
)
from perceive_ray.train.gradcache import chunk_seed, run_step
from perceive_ray.train.losses import compute_clip_loss
from perceive_ray.training_config import compute_accumulation
from tests.fixtures.spawn import free_port

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[2]
NEGCLIP = REPO / "experiments/train/clip_negclip_lock.yaml"  # use_gpu: true, 4 workers, global 512, micro 32
HEADS = REPO / "experiments/train/pacl_rope.yaml"  # optim: adam


def load(overrides=None, *, smoke: bool = False, path: Path = NEGCLIP):
    return load_config(path, overrides or {}, smoke=smoke)


def ds_config(overrides=None, *, smoke: bool = True, use_gpu: bool | None = None, path: Path = NEGCLIP):
    return build_deepspeed_config(load(overrides, smoke=smoke, path=path), use_gpu=use_gpu)


# -- the JSON --------------------------------------------------------------------------------------------------


def test_stage_0_has_no_zero_options():
    assert ds_config({"train.deepspeed.zero_stage": 0})["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("stage", [1, 2])
def test_stages_1_and_2(stage):
    zero = ds_config({"train.deepspeed.zero_stage": stage})["zero_optimization"]
    assert zero == {"stage": stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET,
                    "overlap_comm": False, "contiguous_gradients": True}


def test_stage_3():
    zero = ds_config({"train.deepspeed.zero_stage": 3})["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": BUCKET, "overlap_comm": False, "contiguous_gradients": True,
                    "stage3_prefetch_bucket_size": BUCKET, "stage3_gather_16bit_weights_on_model_save": False}
    assert "stage3_param_persistence_threshold" not in zero  # DeepSpeed's default unless set


@pytest.mark.parametrize("threshold", [0, 1, 100_000])
def test_stage_3_persistence_threshold_passes_through(threshold):
    zero = ds_config({"train.deepspeed.zero_stage": 3,
                      "train.deepspeed.stage3_param_persistence_threshold": threshold})["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == threshold  # 0 (partition everything) is kept, not dropped


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_persistence_threshold_only_for_stage_3(stage):
    zero = ds_config({"train.deepspeed.zero_stage": stage,
                      "train.deepspeed.stage3_param_persistence_threshold": 0})["zero_optimization"]
    assert not any(key.startswith("stage3_") for key in zero)


def test_cpu_runs_in_fp32():
    config = ds_config()  # smoke: use_gpu false, precision auto
    assert "bf16" not in config and "fp16" not in config
    assert "bf16" not in ds_config({}, smoke=False, use_gpu=False)  # the argument beats resources.use_gpu


def test_gpu_runs_in_bf16():
    assert ds_config(use_gpu=True)["bf16"] == {"enabled": True}
    assert ds_config(smoke=False)["bf16"] == {"enabled": True}  # resources.use_gpu: true by default


def test_explicit_precision_beats_the_device():
    assert ds_config({"train.deepspeed.precision": "bf16"})["bf16"] == {"enabled": True}  # on CPU
    assert "bf16" not in ds_config({"train.deepspeed.precision": "fp32"}, use_gpu=True)
    assert "bf16" not in ds_config({"train.deepspeed.precision": "fp32"}, smoke=False)


@pytest.mark.parametrize(("workers", "micro", "chunks"), [(1, 32, 16), (2, 32, 8), (4, 32, 4), (8, 64, 1),
                                                          (4, None, 1), (16, 8, 4)])
def test_batch_sizes(workers, micro, chunks):
    config = load({"resources.num_workers": workers, "train.batch.micro": micro})
    out = build_deepspeed_config(config)
    local, expected_chunks = compute_accumulation(config)
    assert expected_chunks == chunks
    assert out["gradient_accumulation_steps"] == chunks  # one accumulation step per GradCache chunk
    assert out["train_micro_batch_size_per_gpu"] == local // chunks == (micro or local)
    assert out["train_batch_size"] == 512  # the global batch, whatever the worker count
    assert out["train_batch_size"] == (out["train_micro_batch_size_per_gpu"] * workers
                                       * out["gradient_accumulation_steps"])


def test_smoke_batch_sizes():
    out = ds_config()
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
        == (8, 2, 2)


def test_no_gradient_clipping_unless_set():
    # DeepSpeed clips at 1.0 when "gradient_clipping" is absent: the key must be written as 0.0 to turn it off.
    assert ds_config()["gradient_clipping"] == 0.0
    assert ds_config({"train.deepspeed.grad_clip": 1.5})["gradient_clipping"] == 1.5


def test_adamw():
    out = ds_config(smoke=False)
    assert out["optimizer"] == {"type": "AdamW", "params": {"lr": 5e-6, "betas": [0.9, 0.98], "eps": 1e-6,
                                                            "weight_decay": 0.0, "torch_adam": True}}


def test_adam_is_not_adamw():
    out = ds_config(smoke=False, path=HEADS)
    assert out["optimizer"]["type"] == "Adam"
    params = out["optimizer"]["params"]
    assert params["adam_w_mode"] is False and params["torch_adam"] is True
    assert (params["lr"], params["betas"], params["eps"]) == (1e-4, [0.9, 0.999], 1e-8)
    out = ds_config({"train.optim.name": "adam", "train.optim.weight_decay": 0.1})
    assert out["optimizer"]["type"] == "Adam" and out["optimizer"]["params"]["weight_decay"] == 0.1


def test_no_scheduler_and_quiet():
    out = ds_config()
    assert "scheduler" not in out  # the schedule drives the lr per step
    assert out["steps_per_print"] >= 10**9 and out["wall_clock_breakdown"] is False
    assert "zero_force_ds_cpu_optimizer" not in out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_optimizer(stage):
    out = ds_config({"train.deepspeed.zero_stage": stage, "train.deepspeed.offload_optimizer": True})
    assert out["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in out["zero_optimization"]
    assert out["zero_force_ds_cpu_optimizer"] is False  # the torch optimiser on offloaded states is allowed
    gpu = ds_config({"train.deepspeed.zero_stage": stage, "train.deepspeed.offload_optimizer": True}, use_gpu=True)
    assert gpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def test_offload_param():
    overrides = {"train.deepspeed.zero_stage": 3, "train.deepspeed.offload_param": True}
    out = ds_config(overrides)
    assert out["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert "offload_optimizer" not in out["zero_optimization"] and out["zero_force_ds_cpu_optimizer"] is False
    both = ds_config({**overrides, "train.deepspeed.offload_optimizer": True}, smoke=False)  # use_gpu: true
    assert both["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert both["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds_config(overrides, smoke=False, use_gpu=False)["zero_optimization"]["offload_param"]["pin_memory"] \
        is False


def test_bad_offload_is_refused_by_the_builder():
    """The schema refuses these (test_training_config); the builder also guards configs built without validation."""
    config = load(smoke=True)

    def with_ds(**update):
        train = config.train.model_copy(update={"deepspeed": config.train.deepspeed.model_copy(update=update)})
        return config.model_copy(update={"train": train})

    for stage in (0, 1, 2):
        with pytest.raises(ValueError, match="offload_param needs zero_stage 3"):
            build_deepspeed_config(with_ds(zero_stage=stage, offload_param=True))
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage >= 1"):
        build_deepspeed_config(with_ds(zero_stage=0, offload_optimizer=True))  # not dropped with the stage-0 block
    assert build_zero_section(with_ds(zero_stage=0)) == {"stage": 0}


def test_json_serialisable_and_deterministic():
    for overrides in ({}, {"train.deepspeed.zero_stage": 3, "train.deepspeed.offload_param": True,
                           "train.deepspeed.offload_optimizer": True, "train.deepspeed.grad_clip": 1.0}):
        out = ds_config(overrides)
        assert json.loads(json.dumps(out)) == out == ds_config(overrides)


# -- DeepSpeed itself, in this process (CPU accelerator, a one-process gloo group) -------------------------------


@pytest.fixture(scope="module")
def deepspeed_cpu():
    """``deepspeed`` imported with the CPU accelerator, inside a world-size-1 gloo group (destroyed afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")  # before the first import of deepspeed
        mp.setenv("LOCAL_RANK", "0")  # DeepSpeed's launcher check
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        assert get_accelerator().device_name() == "cpu"
        assert not dist.is_initialized()
        skip_unused_cpu_comm_op()  # as train_fn_per_worker does on CPU (no JIT compile of an inference-only op)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            yield deepspeed
        finally:
            dist.destroy_process_group()


class TinyClip(nn.Module):
    """Two towers and a 0-dim ``logit_scale`` (DeepSpeed 0.19.8 broke on 0-dim parameters; 0.19.7 is pinned)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": F.normalize(self.image(batch["image"]), dim=-1),
                "text": F.normalize(self.text(batch["text"]), dim=-1), "logit_scale": self.logit_scale.exp()}


def clip_loss(reps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return compute_clip_loss(reps["image"], reps["text"], reps["logit_scale"]), {}


class BoundaryGrads:
    """The engine as ``run_step`` sees it, recording the full gradients just before each optimiser step."""

    def __init__(self, engine, deepspeed) -> None:
        self.engine, self.deepspeed, self.grads, self.calls = engine, deepspeed, [], 0

    def __call__(self, batch):
        return self.engine(batch)

    def backward(self, loss, scale_wrt_gas):
        self.engine.backward(loss, scale_wrt_gas=scale_wrt_gas)

    def step(self):
        if self.engine.is_gradient_accumulation_boundary():
            self.grads.append({name: self.deepspeed.utils.safe_get_full_grad(param).clone()
                               for name, param in self.engine.module.named_parameters()})
        self.engine.step()
        self.calls += 1


def against_adamw(stage: int, overrides: dict):
    """The DeepSpeed config (8 rows = micro 2 x 4 chunks, lr 0.05, eps 1), a TinyClip, an identical reference with
    torch's AdamW at the same settings, and two full batches."""
    config = load({"resources.num_workers": 1, "train.deepspeed.zero_stage": stage, "train.optim.lr": 0.05,
                   "train.optim.eps": 1.0, "train.deepspeed.stage3_param_persistence_threshold": 0, **overrides},
                  smoke=True)
    torch.manual_seed(0)
    model = TinyClip()
    reference = TinyClip()
    reference.load_state_dict(model.state_dict())
    adamw = torch.optim.AdamW(reference.parameters(), lr=0.05, betas=(0.9, 0.98), eps=1.0, weight_decay=0.0)
    batches = [{"image": torch.randn(8, 6), "text": torch.randn(8, 5)} for _ in range(2)]
    return build_deepspeed_config(config), model, reference, adamw, batches


@pytest.mark.filterwarnings("ignore:`torch.distributed.*` is deprecated:FutureWarning")  # DeepSpeed's ZeRO-3 calls
@pytest.mark.parametrize(("stage", "offload"), [(0, {}), (1, {}), (2, {}), (3, {}),
                                                (2, {"train.deepspeed.offload_optimizer": True}),
                                                (3, {"train.deepspeed.offload_optimizer": True,
                                                     "train.deepspeed.offload_param": True})])
def test_deepspeed_trains_like_full_batch_adamw(deepspeed_cpu, stage, offload):
    """DeepSpeed initialises on the produced config (world size 1: 8 rows = micro 2 x 4 chunks); two steps of
    ``run_step`` (4 chunk backwards each, scale_wrt_gas=False) give exactly the full-batch gradients, one optimiser
    step each, and the weights of torch's AdamW on the full batch (eps 1 makes the update gradient-size sensitive;
    the 0-dim ``logit_scale`` gets its gradient through the first chunk only, which offloading must not drop)."""
    from deepspeed.utils import safe_get_full_fp32_param

    ds, model, reference, adamw, batches = against_adamw(stage, offload)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (8, 2, 4)

    engine, optimizer, _, _ = deepspeed_cpu.initialize(model=model, model_parameters=model.parameters(), config=ds)
    assert engine.zero_optimization_stage() == stage
    assert engine.gradient_accumulation_steps() == 4 and engine.train_batch_size() == 8
    assert engine.gradient_clipping() == 0.0  # not DeepSpeed's default 1.0
    assert not engine.bfloat16_enabled()
    assert isinstance(engine.optimizer if stage == 0 else optimizer.optimizer, torch.optim.AdamW)

    wrapped = BoundaryGrads(engine, deepspeed_cpu)
    for step, batch in enumerate(batches):
        adamw.zero_grad()
        expected, _ = clip_loss(reference(batch))
        expected.backward()
        chunks = [{k: v[i: i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
        loss, _ = run_step(wrapped, clip_loss, chunks, [chunk_seed(0, step, 0, c) for c in range(4)])
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
        assert engine.global_steps == step + 1  # one optimiser step per 4 chunks
        for name, param in reference.named_parameters():
            torch.testing.assert_close(wrapped.grads[step][name], param.grad, atol=1e-5, rtol=1e-5,
                                       msg=f"step {step}: gradient of {name}")
        adamw.step()
        for name, param in engine.module.named_parameters():
            value = safe_get_full_fp32_param(param) if stage == 3 else param.detach()
            torch.testing.assert_close(value, dict(reference.named_parameters())[name].detach(), atol=1e-5,
                                       rtol=1e-5, msg=f"step {step}: {name}")
    assert wrapped.calls == 8
    assert os.environ.get("DS_ACCELERATOR") == "cpu"


def test_the_inference_only_shm_op_is_not_compiled(deepspeed_cpu, monkeypatch, tmp_path):
    """On CPU, DeepSpeed's communication backend would JIT-compile its shared-memory all-reduce (used only by
    tensor-parallel inference) before the first step; marked unavailable, deepspeed.initialize trains through
    torch.distributed and nothing is built (an empty extensions folder stays empty)."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.git_version_info import installed_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert not installed_ops.get(SHM_COMM_OP, False)  # this DeepSpeed build has no precompiled op
    assert deepspeed_cpu.ops.__compatible_ops__[SHM_COMM_OP] is False  # the fixture marked it
    assert skip_unused_cpu_comm_op() is False  # already marked: nothing to do
    assert build_shm_op() is None
    model = TinyClip()
    ds = build_deepspeed_config(load({"resources.num_workers": 1, "train.deepspeed.zero_stage": 2}, smoke=True))
    engine, _, _, _ = deepspeed_cpu.initialize(model=model, model_parameters=model.parameters(), config=ds)
    assert ds_comm.cdb.shm_comm_op is None
    assert not (tmp_path / "ext").exists()


@pytest.mark.filterwarnings("ignore:`torch.distributed.*` is deprecated:FutureWarning")  # DeepSpeed's ZeRO-3 calls
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_grad_clip_clips_like_torch_at_every_zero_stage(deepspeed_cpu, stage):
    """train.deepspeed.grad_clip on a model with a 0-dim parameter (CLIP's logit_scale): every stage trains like
    torch's clip_grad_norm_ + AdamW on the full batch, two steps of 4 chunks. At stage 0 DeepSpeed's own fp32 clip
    raised on the 0-dim parameter; clip_fp32_gradients_like_torch replaces it there and only there."""
    from deepspeed.utils import safe_get_full_fp32_param

    from perceive_ray.train.deepspeed import clip_fp32_gradients_like_torch

    ds, model, reference, adamw, batches = against_adamw(stage, {"train.deepspeed.grad_clip": 0.05})
    engine, _, _, _ = deepspeed_cpu.initialize(model=model, model_parameters=model.parameters(), config=ds)
    assert engine.gradient_clipping() == 0.05
    assert clip_fp32_gradients_like_torch(engine) is (stage == 0)
    norms = []
    for step, batch in enumerate(batches):
        adamw.zero_grad()
        expected, _ = clip_loss(reference(batch))
        expected.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.05)))
        chunks = [{k: v[i: i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
        run_step(engine, clip_loss, chunks, [chunk_seed(0, step, 0, c) for c in range(4)])
        adamw.step()
        for name, param in engine.module.named_parameters():
            value = safe_get_full_fp32_param(param) if stage == 3 else param.detach()
            torch.testing.assert_close(value, dict(reference.named_parameters())[name].detach(), atol=1e-5,
                                       rtol=1e-5, msg=f"step {step}: {name}")
    assert min(norms) > 0.05 * 5  # the clip was active (eps 1 makes the update scale with the clipped gradient)
