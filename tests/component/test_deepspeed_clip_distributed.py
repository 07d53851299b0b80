"""``train.deepspeed.grad_clip`` on 2 gloo ranks equals torch's clip + AdamW on the whole batch, at ZeRO 0 (where
``clip_fp32_gradients_like_torch`` replaces DeepSpeed's fp32 clip) and at ZeRO 2 (DeepSpeed's own clip).

Two spawned DeepSpeed ranks each train the TinyClip of the world-size-1 tests (``tests/unit/test_deepspeed_config.py``,
with its 0-dim ``logit_scale``) on their half of each batch, in 2 GradCache chunks, for two steps: the gradients are
all-reduced, then clipped (the clip reads the all-reduced gradients, so both ranks use one coefficient). The parent
compares both ranks' weights with one process's ``clip_grad_norm_`` + AdamW on all 8 rows, and checks that the clip
was active. One spawn runs both stages.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.fixtures.spawn import spawn_ranks

WORLD = 2
STAGES = (0, 2)
MAX_NORM = 0.05
TIMEOUT_S = 300  # whole spawn, DeepSpeed's import included
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*` is deprecated:FutureWarning")


def overrides(stage: int) -> dict:
    return {"resources.num_workers": WORLD, "train.deepspeed.zero_stage": stage, "train.optim.lr": 0.05,
            "train.optim.eps": 1.0, "train.deepspeed.grad_clip": MAX_NORM}


def batches() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    return [{"image": torch.randn(8, 6), "text": torch.randn(8, 5)} for _ in range(2)]


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"DS_ACCELERATOR": "cpu", "LOCAL_RANK": str(rank), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from perceive_ray.train.deepspeed import (
        build_deepspeed_config,
        clip_fp32_gradients_like_torch,
        skip_unused_cpu_comm_op,
    )
    from perceive_ray.train.gradcache import chunk_seed, run_step
    from tests.unit.test_deepspeed_config import TinyClip, clip_loss, load

    skip_unused_cpu_comm_op()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    results: dict = {}
    try:
        for stage in STAGES:
            ds = build_deepspeed_config(load(overrides(stage), smoke=True))
            torch.manual_seed(0)
            model = TinyClip()
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
            installed = clip_fp32_gradients_like_torch(engine)
            rows = slice(rank * 4, rank * 4 + 4)
            for step, batch in enumerate(batches()):
                chunks = [{k: v[rows][i: i + 2] for k, v in batch.items()} for i in (0, 2)]
                run_step(engine, clip_loss, chunks, [chunk_seed(0, step, rank, c) for c in range(2)])
            weights = {name: (deepspeed.utils.safe_get_full_fp32_param(p) if stage == 3 else p.detach()).clone()
                       for name, p in engine.module.named_parameters()}
            results[f"stage{stage}"] = {"installed": installed,
                                        "accumulation": engine.gradient_accumulation_steps(),
                                        "weights": weights}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    from tests.unit.test_deepspeed_config import TinyClip, clip_loss

    torch.manual_seed(0)
    model = TinyClip()
    adamw = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.9, 0.98), eps=1.0, weight_decay=0.0)
    norms = []
    for batch in batches():
        adamw.zero_grad()
        loss, _ = clip_loss(model(batch))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_NORM)))
        adamw.step()
    return {name: p.detach() for name, p in model.named_parameters()}, norms


def test_grad_clip_on_two_ranks_trains_like_torch_on_the_whole_batch(tmp_path):
    ranks = spawn_ranks(worker, (), world=WORLD, out_dir=tmp_path, timeout_s=TIMEOUT_S,
                        what="two DeepSpeed ranks with grad_clip")
    expected, norms = reference()
    assert min(norms) > MAX_NORM * 5  # the clip was active at both steps
    for stage in STAGES:
        for rank, result in enumerate(ranks):
            got = result[f"stage{stage}"]
            assert got["installed"] is (stage == 0)  # the replacement exactly where DeepSpeed's fp32 clip runs
            assert got["accumulation"] == 2  # 8 rows = 2 ranks x 2 chunks x micro 2
            assert got["weights"].keys() == expected.keys()
            for name, value in expected.items():
                torch.testing.assert_close(got["weights"][name], value, atol=1e-5, rtol=1e-5,
                                           msg=f"ZeRO {stage}, rank {rank}: {name}")
