"""The DeepSpeed config of a training run: a pure function of the experiment (saved as ``deepspeed.json``).

``train_batch_size`` is the experiment's global batch; DeepSpeed's ``gradient_accumulation_steps`` counts the
GradCache chunks of one step (``engine.step()`` after every chunk's backward only steps the optimiser at the
boundary), so micro x workers x chunks == global whatever the worker count. The optimiser is DeepSpeed's own
``torch_adam`` path (torch's Adam/AdamW, no JIT-compiled CPU Adam); the learning rate is driven per step by the
schedule of PROTOCOLS §5 (``open_clip_train.scheduler``), so DeepSpeed gets no scheduler block. bf16 on GPU, fp32 on
CPU (``precision: auto``); no gradient clipping unless ``train.deepspeed.grad_clip`` is set (neither recipe clips).
"""

from __future__ import annotations

from typing import Any

from perceive_ray.training_config import TrainExperimentConfig, compute_accumulation

# Reduce / all-gather bucket sizes (elements): DeepSpeed's defaults are 5e8, sized for 7B models on GPUs.
BUCKET = 50_000_000


def build_deepspeed_config(config: TrainExperimentConfig, *, use_gpu: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for ``config`` (``use_gpu`` defaults to ``resources.use_gpu``)."""
    train, ds = config.train, config.train.deepspeed
    use_gpu = config.resources.use_gpu if use_gpu is None else use_gpu
    local, chunks = compute_accumulation(config)
    precision = ds.precision if ds.precision != "auto" else ("bf16" if use_gpu else "fp32")
    optim = train.optim
    out: dict[str, Any] = {
        "train_batch_size": train.batch.global_,
        "train_micro_batch_size_per_gpu": local // chunks,
        "gradient_accumulation_steps": chunks,
        "optimizer": {
            "type": "AdamW" if optim.name == "adamw" else "Adam",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": True},
        },
        "zero_optimization": build_zero_section(config, use_gpu=use_gpu),
        "steps_per_print": 10**9,  # progress is ours (rank 0, every train.log_every_steps)
        "wall_clock_breakdown": False,
    }
    if optim.name == "adam":
        out["optimizer"]["params"]["adam_w_mode"] = False
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
    # Always written: DeepSpeed clips at 1.0 when the key is absent (GRADIENT_CLIPPING_DEFAULT); 0.0 turns it off.
    out["gradient_clipping"] = ds.grad_clip if ds.grad_clip is not None else 0.0
    if ds.offload_optimizer or ds.offload_param:
        # A client-side torch optimiser on offloaded states is refused by DeepSpeed unless allowed explicitly.
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def build_zero_section(config: TrainExperimentConfig, *, use_gpu: bool | None = None) -> dict[str, Any]:
    ds = config.train.deepspeed
    use_gpu = config.resources.use_gpu if use_gpu is None else use_gpu
    # Checked before the stage-0 return (the schema refuses these too): an offload is never dropped silently.
    if ds.offload_optimizer and ds.zero_stage < 1:
        raise ValueError("train.deepspeed.offload_optimizer needs zero_stage >= 1")
    if ds.offload_param and ds.zero_stage != 3:
        raise ValueError("train.deepspeed.offload_param needs zero_stage 3")
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 0:
        return zero
    zero.update({"reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET, "overlap_comm": False,
                 "contiguous_gradients": True})
    if ds.zero_stage == 3:
        del zero["allgather_bucket_size"]
        zero["stage3_prefetch_bucket_size"] = BUCKET
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather explicitly for the export
        if ds.stage3_param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return zero


# DeepSpeed's shared-memory CPU collective (``deepspeed_shm_comm``): only ``inference_all_reduce`` (tensor-parallel
# inference kernels) uses it; training collectives go through torch.distributed (gloo on CPU). Yet DeepSpeed's
# communication backend JIT-compiles it with the system C++ compiler whenever the accelerator is the CPU, on every
# fresh machine: ~57 CPU-seconds, ~33 s of wall time on a 2-core host, before the first step.
SHM_COMM_OP = "deepspeed_shm_comm"


def skip_unused_cpu_comm_op() -> bool:
    """Mark the shared-memory CPU collective as unavailable before ``deepspeed.initialize`` (which then uses plain
    torch.distributed, as it does on any platform without that op). Returns whether it was marked; the op is left
    alone if a DeepSpeed build has it precompiled (then loading it costs nothing)."""
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops

    compatible = deepspeed.ops.__compatible_ops__
    if installed_ops.get(SHM_COMM_OP, False) or not compatible.get(SHM_COMM_OP, False):
        return False
    compatible[SHM_COMM_OP] = False
    return True


def clip_fp32_gradients_like_torch(engine: Any) -> bool:
    """On DeepSpeed's fp32, no-ZeRO path (``zero_stage: 0`` without bf16/fp16) with ``gradient_clipping`` set, clip
    with ``torch.nn.utils.clip_grad_norm_`` instead of DeepSpeed's own helper. Returns whether it was installed.

    DeepSpeed's helper multiplies every gradient in place by a shape-[1] coefficient, which raises on a 0-dim
    parameter ("output with shape [] doesn't match the broadcast shape [1]"): CLIP's ``logit_scale`` is one, so
    every CLIP-side ``zero_stage: 0`` run with ``grad_clip`` failed at its first step. The clip is the same one: at
    the accumulation boundary, after the gradients' all-reduce (identical on every rank), the L2 norm over all
    gradients and the coefficient ``max / (norm + 1e-6)`` capped at 1. The ZeRO stages and bf16 clip in their own
    optimisers and are left alone."""
    import torch

    if engine.gradient_clipping() <= 0.0 or engine.fp16_enabled() or engine.bfloat16_enabled() \
            or engine.amp_enabled() or engine.zero_optimization():
        return False

    def clip() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm=engine.gradient_clipping(), foreach=False)

    engine.clip_fp32_gradients = clip  # the method DeepSpeed's _take_model_step calls on this path
    return True
