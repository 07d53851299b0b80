"""The LLaVA LM loss on 2 gloo ranks equals one process on the concatenated batch: value and averaged gradients.

The llava job divides each rank's summed token losses by the step's GLOBAL supervised-token count (all-reduced in
``collate_chunks``) and multiplies by the world size, so that DeepSpeed's gradient average is the gradient of the
global token mean. Two spawned ranks build the job exactly as the training workers do (same seed, so the same
random projector), take uneven shares of the rows (different row and token counts; rank 0 in two chunks), run
``run_accumulation_step``, and all-reduce-average the gradients as DeepSpeed does. The parent runs the same job on
all rows in one process. Stages: ``projector`` (plain captions, the 558K stage) and ``full`` (the demo's stage: the
whole LLM + projector on an open_clip tower, v1 chats with a text-only row). The module runs in float64, but the
token losses are taken in float32 (as in training), hence a 1e-6 relative tolerance.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.fixtures.spawn import spawn_ranks
from tests.unit.test_llava_job import CAPTIONS, IMAGE_V1, TEXT_V1, Engine, grads, make_rows, projector_job

WORLD = 2
TIMEOUT_S = 240
CPU = torch.device("cpu")

ROWS = {
    "projector": [*CAPTIONS, ("llava_558k:2", True, ["<image>\nSay what you see."],
                              ["a small green bird on a branch over the river"])],
    "full": [IMAGE_V1, ("llava_665k:2", True, ["Is the cup left of the plate?\n<image>"], ["Yes."]), TEXT_V1],
}
SHARES = {0: [0, 1], 1: [2]}  # rows per rank: uneven rows and supervised tokens
CHUNKS = {0: 2, 1: 1}


def build(stage: str, tiny: dict):
    overrides = {} if stage == "projector" else {"train.llava.stage": "full",
                                                  "train.llava.vision_tower": tiny["tower"]}
    torch.manual_seed(0)  # as train_fn_per_worker: identical random-init parts on every rank
    job = projector_job({"parts": Path(tiny["parts"])}, **overrides)
    job.module.double()
    return job


def rows_for(stage: str, job, indices: list[int]) -> dict[str, np.ndarray]:
    rows = make_rows(ROWS[stage], seed=3)
    size = job.module.llava.config.vision_config.image_size
    pixels = np.random.default_rng(5).standard_normal((len(ROWS[stage]), 3, size, size))
    pixels[~rows["has_image"]] = 0.0
    rows["pixels"] = pixels
    return {k: v[indices] for k, v in rows.items()}


def loss_and_grads(stage: str, tiny: dict, indices: list[int], chunks: int):
    from perceive_ray.train.gradcache import chunk_seed, run_accumulation_step

    job = build(stage, tiny)
    rows = rows_for(stage, job, indices)
    bounds = np.linspace(0, len(indices), chunks + 1).round().astype(int)
    parts = [{k: v[bounds[i]: bounds[i + 1]] for k, v in rows.items()} for i in range(chunks)]
    batches = job.collate_chunks(parts, CPU)
    job.module.zero_grad(set_to_none=True)
    loss, logs = run_accumulation_step(Engine(job.module), job.compute_loss, batches,
                                       [chunk_seed(0, 0, 0, c) for c in range(chunks)])
    return loss.item(), grads(job), float(batches[0]["norm"]), float(logs["tokens_local"])


def _worker(rank: int, port: int, tiny: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        results = {}
        for stage in ROWS:
            loss, grad, norm, local = loss_and_grads(stage, tiny, SHARES[rank], CHUNKS[rank])
            for value in grad.values():  # what DeepSpeed does with the parameter gradients
                dist.all_reduce(value)
                value /= WORLD
            results[stage] = (loss, grad, norm, local)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from perceive_ray.models.clip import save_tiny_clip
    from perceive_ray.models.llava import save_tiny_llava_parts

    root = tmp_path_factory.mktemp("llava_loss_distributed")
    return {"parts": str(save_tiny_llava_parts(root / "parts")), "tower": str(save_tiny_clip(root / "clip", seed=0))}


@pytest.fixture(scope="module")
def rank_results(tiny, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("llava_ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # inherited by the spawned ranks
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        return spawn_ranks(_worker, (tiny,), world=WORLD, out_dir=out_dir, timeout_s=TIMEOUT_S,
                           what="distributed LLaVA loss ranks")


@pytest.mark.parametrize("stage", sorted(ROWS))
def test_two_ranks_reproduce_the_one_process_token_mean_loss_and_gradients(tiny, rank_results, stage,
                                                                              monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    everything = sorted(i for indices in SHARES.values() for i in indices)
    loss, want, norm, _ = loss_and_grads(stage, tiny, everything, 1)
    ranks = [results[stage] for results in rank_results]
    locals_ = [r[3] for r in ranks]
    assert all(r[2] == norm for r in ranks)  # every rank divides by the global supervised-token count
    assert sum(locals_) == norm and locals_[0] != locals_[1]
    # each rank's loss is world x (its token-loss sum) / global count: their mean is the global token mean
    assert sum(r[0] for r in ranks) / WORLD == pytest.approx(loss, rel=1e-6)
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 0 and want.keys() == ranks[0][1].keys()
    for rank, (_, got, _, _) in enumerate(ranks):
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6 * scale, rtol=0,
                                       msg=lambda m, n=name, r=rank: f"rank {r} grad {n}: {m}")
    # sanity: averaging per-rank token means (the 2023 trainer's normalisation) would give another loss here
    per_rank_means = [r[0] / WORLD * norm / tokens for r, tokens in zip(ranks, locals_, strict=True)]
    assert sum(per_rank_means) / WORLD != pytest.approx(loss, rel=1e-5)  # 10x the tolerance above
