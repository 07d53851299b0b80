"""VLM2Vec's global-batch InfoNCE on 2 gloo ranks through the real tiny LLaVA + DoRA equals one process.

Two spawned processes each hold half of 6 (query, target) pairs (3 + 3; image, text-only, 558K and 665K rows), run
the job's own path (``collate_chunks`` -> ``Vlm2VecEmbedder`` -> ``compute_vlm2vec_loss``, which gathers the
embeddings of both ranks with gradient), backpropagate and average the adapter gradients over the ranks as DeepSpeed
does. The parent compares every rank's loss and averaged gradients with one process on the concatenated batch.

Dropout. A dropout mask is drawn per forward call for the whole activation tensor, so one forward of 6 rows cannot
draw the masks two forwards of 3 rows drew. Hence the cases:

- ``no_dropout``: adapter dropout 0, each rank one chunk; the reference is literally ONE forward + backward of all 6
  rows in one process (different padding widths: float64 model, float32 pooled embeddings, see below).
- ``dropout``: adapter dropout 0.1, each rank one chunk seeded with its ``chunk_seed(seed, step, rank, 0)`` (as the
  worker seeds it); the reference forwards rank 0's and rank 1's rows with autograd under the same seeds in one
  process, concatenates them and differentiates the global loss once: identical masks, so the same objective.
- ``gradcache``: adapter dropout 0.1 and GradCache on each rank (3 query chunks of 1 row, 1 target chunk of 3:
  ``micro 1 / micro_target 3``), i.e. ``run_step`` with the gather inside its leaf loss; the reference forwards all
  8 (rank, chunk) pieces under their seeds in rank-then-chunk order, as above.

Precision: float64 model (``module.double()``); the pooled embeddings and the loss are float32 by design
(``compute_last_token_embeddings``), gradients flow back into float64. Ranks and reference run torch on 1 thread, so
those float32 ops see the same reduction order. Observed differences are ~1e-14 (gradients up to ~75); atol 1e-6.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.fixtures.spawn import spawn_ranks

WORLD = 2
TIMEOUT_S = 180  # whole spawn; gloo collectives time out after COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 90
ATOL = 1e-6
CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "train" / "vlm2vec_llava15.yaml"
STEP = 0

# Per rank: 3 rows (global 6 over 2 workers); (micro, micro_target, adapter dropout) per case.
CASES = {"no_dropout": (3, 3, 0.0), "dropout": (3, 3, 0.1), "gradcache": (1, 3, 0.1)}

ROWS = [  # (key, has_image, human turns, gpt turns); rank 0 holds the first 3
    ("llava_558k:0", True, ["<image>\nDescribe the image briefly."], ["a red cat sleeping on a mat"]),
    ("llava_665k:1", False, ["Write one sentence about a dog."], ["The dog ran home before dinner."]),
    ("llava_665k:2", True, ["What is shown here?\n<image>"], ["a small blue car"]),
    ("llava_558k:3", True, ["<image>\nGive a short caption."], ["two birds on a wire"]),
    ("llava_665k:4", True, ["<image>\nWhat is the cat doing?", "What colour is it?"], ["It sleeps.", "Red."]),
    ("llava_665k:5", False, ["Name a fruit that is yellow."], ["A banana."]),
]


def make_rows(specs) -> dict[str, np.ndarray]:
    pixels = np.random.default_rng(0).standard_normal((len(ROWS), 3, 32, 32)).astype(np.float32)
    index = [ROWS.index(s) for s in specs]
    pixels = pixels[index]
    for i, spec in enumerate(specs):
        if not spec[1]:
            pixels[i] = 0.0
    return {"key": np.array([s[0] for s in specs]), "has_image": np.array([s[1] for s in specs]),
            "humans": np.array([json.dumps(s[2]) for s in specs]), "gpts": np.array([json.dumps(s[3]) for s in specs]),
            "epoch": np.zeros(len(specs), dtype=np.int64), "pixels": pixels,
            "step": np.full(len(specs), STEP, dtype=np.int64), "slot": np.arange(len(specs))}


def split_rows(rows: dict[str, np.ndarray], chunks: int) -> list[dict[str, np.ndarray]]:
    """As the worker splits its rows before ``collate_chunks`` (run/training.py::split_rows)."""
    n = len(rows["step"])
    bounds = np.linspace(0, n, chunks + 1).round().astype(int)
    return [{k: v[bounds[i]: bounds[i + 1]] for k, v in rows.items()} for i in range(chunks)]


def make_job(source: str, case: str, *, whole_batch: bool = False):
    """The job of one case: float64, seeded non-zero lora_B (gaussian init has B = 0) -- identical in every process.
    ``whole_batch``: one worker, one chunk of all 6 rows (the single-process reference)."""
    from perceive_ray.config import load_config
    from perceive_ray.train.jobs.vlm2vec import Vlm2VecJob

    micro, micro_target, dropout = CASES[case]
    workers = 1 if whole_batch else WORLD
    if whole_batch:
        micro = micro_target = len(ROWS)
    overrides = {"model.source": source, "resources.num_workers": workers, "train.batch.global": len(ROWS),
                 "train.batch.micro": micro, "train.batch.micro_target": micro_target,
                 "train.vlm2vec.adapter.dropout": dropout, "train.vlm2vec.grad_checkpointing": True}
    job = Vlm2VecJob(load_config(CONFIG, overrides, smoke=True), device=torch.device("cpu"))
    job.module.double()
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, param in sorted(job.module.named_parameters()):
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return job


class Engine:
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.steps = 0

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def step(self) -> None:
        self.steps += 1


def grads_of(job) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in job.module.named_parameters() if p.requires_grad}


def rank_pieces(job, rank: int) -> tuple[list[dict], list[int]]:
    """Rank ``rank``'s chunks and seeds, as the worker builds them."""
    from perceive_ray.train.gradcache import chunk_seed
    from perceive_ray.training_config import compute_accumulation

    chunks = compute_accumulation(job.config)[1]
    per_rank = len(ROWS) // WORLD
    rows = make_rows(ROWS[rank * per_rank:(rank + 1) * per_rank])
    batches = job.collate_chunks(split_rows(rows, chunks), torch.device("cpu"))
    return batches, [chunk_seed(job.config.seed, STEP, rank, c) for c in range(chunks)]


def _worker(rank: int, port: int, source: str, out_dir: str) -> None:
    from perceive_ray.train.gradcache import run_step
    from perceive_ray.train.jobs.vlm2vec import compute_vlm2vec_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        results = {}
        for case in CASES:
            job = make_job(source, case)
            batches, seeds = rank_pieces(job, rank)
            job.module.zero_grad(set_to_none=True)
            if case == "gradcache":
                assert len(batches) == 3
                engine = Engine(job.module)
                loss, _ = run_step(engine, job.compute_loss, batches, seeds)
                assert engine.steps == 3
            else:
                assert len(batches) == 1
                torch.manual_seed(seeds[0])  # as run_step seeds a one-chunk step
                reps = job.module(batches[0])
                assert reps["query"].shape[0] == 3
                loss = compute_vlm2vec_loss(reps["query"], reps["target"], job.options.temperature)
                loss.backward()
            grads = grads_of(job)
            for grad in grads.values():  # what DeepSpeed does with the gradients
                dist.all_reduce(grad)
                grad /= WORLD
            results[case] = (loss.detach().item(), grads)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def _offline():
    # The reference runs on 1 thread like the ranks: the float32 loss ops (pooled embeddings are fp32 by design)
    # then reduce in the same order; 2 threads here vs 1 there differ by ~2e-6 in the gradients.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # inherited by the spawned ranks
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from perceive_ray.models.llava import save_tiny_llava

    return str(save_tiny_llava(tmp_path_factory.mktemp("vlm2vec_dist") / "llava", seed=0))


@pytest.fixture(scope="module")
def rank_results(tiny_llava, tmp_path_factory):
    """Both ranks' (loss, averaged grads) per case; a child's exception fails here with its traceback."""
    out_dir = tmp_path_factory.mktemp("vlm2vec_dist_out")
    return spawn_ranks(_worker, (tiny_llava,), world=WORLD, out_dir=out_dir, timeout_s=TIMEOUT_S,
                       what="distributed VLM2Vec workers")


def reference(source: str, case: str) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, the global batch (rank 0's rows first)."""
    if case == "no_dropout":  # ONE forward of all 6 rows
        job = make_job(source, case, whole_batch=True)
        batches = job.collate_chunks([make_rows(ROWS)], torch.device("cpu"))
        assert len(batches) == 1 and batches[0]["query"]["input_ids"].shape[0] == len(ROWS)
        reps = job.module(batches[0])
        merged = reps
    else:  # every rank's chunks under the seeds that rank used, concatenated, one backward
        job = make_job(source, case)
        parts = []
        for rank in range(WORLD):
            batches, seeds = rank_pieces(job, rank)
            for batch, seed in zip(batches, seeds, strict=True):
                torch.manual_seed(seed)
                parts.append(job.module(batch))
        merged = {side: torch.cat([p[side] for p in parts]) for side in ("query", "target")}
    assert merged["query"].shape[0] == merged["target"].shape[0] == len(ROWS)
    job.module.zero_grad(set_to_none=True)
    loss, _ = job.compute_loss(merged)
    loss.backward()
    return loss.item(), grads_of(job)


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_reproduce_the_single_process_loss_and_gradients(rank_results, tiny_llava, case):
    want_loss, want = reference(tiny_llava, case)
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 1e-2
    for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):
        assert max(g.abs().max().item() for n, g in want.items() if kind in n) > 1e-4, kind
    for rank, results in enumerate(rank_results):
        loss, grads = results[case]
        assert loss == pytest.approx(want_loss, abs=ATOL), f"rank {rank} loss"
        assert grads.keys() == want.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want[name], atol=ATOL, rtol=0,
                                       msg=lambda m, n=name, r=rank: f"rank {r} grad {n}: {m}")


def test_the_loss_needs_the_other_ranks_rows(tiny_llava):
    """Sanity of the data: the mean of per-rank local losses is not the global loss (the gather matters)."""
    job = make_job(tiny_llava, "no_dropout")
    with torch.no_grad():
        local = []
        for rank in range(WORLD):
            batches, _ = rank_pieces(job, rank)
            local.append(job.compute_loss(job.module(batches[0]))[0].item())
    global_loss, _ = reference(tiny_llava, "no_dropout")
    assert abs(sum(local) / WORLD - global_loss) > 1e-2
