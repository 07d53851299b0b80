"""GradCache (``run_step``): any chunking gives the full-batch gradient, with dropout masks replayed per chunk."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perceive_ray.train.gradcache import chunk_seed, merge_reps, run_step
from perceive_ray.train.losses import compute_clip_loss, compute_negclip_loss

torch.set_num_threads(2)

ROWS = 8
NEGATIVES = 6
# Per chunking of the same 8 rows and 6 negatives: the rows of each chunk (uneven splits too) and each chunk's
# number of negatives (NegCLIP; a chunk may have none).
CHUNKINGS = {1: ([8], [6]), 2: ([4, 4], [2, 4]), 4: ([2, 2, 2, 2], [2, 0, 3, 1]), 3: ([3, 1, 4], [0, 2, 4])}


class Towers(nn.Module):
    """A tiny CLIP: dropout in both towers, text tower run once on [captions; negatives], a learnable scale."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 4))
        self.text = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 4))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = batch["image"].shape[0]
        texts = F.normalize(self.text(torch.cat([batch["text"], batch["negative"]])), dim=-1)
        return {"image": F.normalize(self.image(batch["image"]), dim=-1), "text_pos": texts[:rows],
                "text_neg": texts[rows:], "logit_scale": self.logit_scale.exp(), "row_id": batch["row_id"]}


class Engine:
    """The engine-like object ``run_step`` drives: forward, backward (recorded), step (counted, no update)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)  # never stepped: the gradients are compared
        self.scales: list[bool] = []
        self.steps = 0

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        assert loss.ndim == 0
        self.scales.append(scale_wrt_gas)
        loss.backward()

    def step(self) -> None:
        self.steps += 1


class BrokenReplayEngine(Engine):
    """Draws other dropout masks whenever autograd is on: the replay pass no longer matches the cached pass."""

    def __call__(self, batch):
        if torch.is_grad_enabled():
            torch.manual_seed(torch.initial_seed() + 1)
        return self.module(batch)


def clip_loss(reps):
    loss = compute_clip_loss(reps["image"], reps["text_pos"], reps["logit_scale"])
    return loss, {"logit_scale": reps["logit_scale"], "rows": torch.tensor(float(reps["image"].shape[0]))}


def negclip_loss(reps):
    loss = compute_negclip_loss(reps["image"], reps["text_pos"], reps["text_neg"], reps["logit_scale"])
    return loss, {"logit_scale": reps["logit_scale"], "negatives": torch.tensor(float(reps["text_neg"].shape[0]))}


LOSSES = {"clip": clip_loss, "negclip": negclip_loss}


def make_model(seed: int = 0) -> Towers:
    torch.manual_seed(seed)
    return Towers().double().train()


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(ROWS, 6, generator=generator, dtype=torch.float64),
            "text": torch.randn(ROWS, 5, generator=generator, dtype=torch.float64),
            "negative": torch.randn(NEGATIVES, 5, generator=generator, dtype=torch.float64),
            "row_id": torch.arange(ROWS)}


def make_chunks(chunks: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """The same batch split into chunks: rows and negatives in order."""
    sizes, negatives = CHUNKINGS[chunks]
    whole = make_batch(seed)
    rows = {k: whole[k].split(sizes) for k in ("image", "text", "row_id")}
    negs = whole["negative"].split(negatives)
    return [{**{k: v[i] for k, v in rows.items()}, "negative": negs[i]} for i in range(len(sizes))]


def seeds_for(chunks: int, step: int = 0) -> list[int]:
    return [chunk_seed(7, step, 0, c) for c in range(chunks)]


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}


def reference(model: Towers, loss_fn, batches, seeds) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The un-chunked loss, differentiated in one backward, with the chunks' own dropout masks: each chunk's forward
    seeded as in ``run_step``, under autograd, rows concatenated (0-dim ``logit_scale`` from the first chunk)."""
    model.zero_grad()
    parts = []
    for batch, seed in zip(batches, seeds, strict=True):
        torch.manual_seed(seed)
        parts.append(model(batch))
    merged = {key: value if value.ndim == 0 else torch.cat([p[key] for p in parts])
              for key, value in parts[0].items()}
    loss, _ = loss_fn(merged)
    loss.backward()
    return loss.detach(), grads_of(model)


def gradcache(model: Towers, loss_fn, batches, seeds, engine_cls=Engine):
    model.zero_grad()
    engine = engine_cls(model)
    loss, logs = run_step(engine, loss_fn, batches, seeds)
    return engine, loss, logs, grads_of(model)


def assert_same_grads(got, want, atol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=name)


def max_difference(got, want) -> float:
    return max((got[name] - want[name]).abs().max().item() for name in want)


# -- run_step == the un-chunked loss with the same dropout masks -------------------------------------------------


@pytest.mark.parametrize("loss_name", ["clip", "negclip"])
@pytest.mark.parametrize("chunks", [1, 2, 4, 3])
def test_chunked_gradient_equals_full_batch_gradient(loss_name, chunks):
    loss_fn, model = LOSSES[loss_name], make_model()
    batches, seeds = make_chunks(chunks), seeds_for(chunks)
    want_loss, want = reference(model, loss_fn, batches, seeds)
    engine, loss, logs, got = gradcache(model, loss_fn, batches, seeds)
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-12)
    assert_same_grads(got, want)
    assert got["logit_scale"].abs().item() > 1e-4  # the 0-dim path carries a real gradient
    assert engine.scales == [False] * chunks  # the surrogates already sum to the full gradient
    assert engine.steps == chunks  # DeepSpeed steps the optimiser at the accumulation boundary only
    assert not loss.requires_grad and all(not v.requires_grad for v in logs.values())
    assert logs["logit_scale"].item() == pytest.approx(10.0)
    if loss_name == "negclip":
        assert logs["negatives"].item() == NEGATIVES  # the merged negatives of every chunk
    else:
        assert logs["rows"].item() == ROWS


@pytest.mark.parametrize("loss_name", ["clip", "negclip"])
def test_every_chunking_gives_the_same_gradient_without_dropout(loss_name):
    """Without dropout the masks do not matter: 1, 2, 3 or 4 chunks all equal one plain full-batch backward."""
    loss_fn, model = LOSSES[loss_name], make_model().eval()
    model.zero_grad()
    expected = loss_fn(model(make_batch()))[0]
    expected.backward()
    want = grads_of(model)
    for chunks in (1, 2, 3, 4):
        _, loss, _, got = gradcache(model, loss_fn, make_chunks(chunks), seeds_for(chunks))
        assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
        assert_same_grads(got, want, atol=1e-10)


@pytest.mark.parametrize("loss_name", ["clip", "negclip"])
@pytest.mark.parametrize("chunks", [2, 4])
def test_gradient_differs_when_the_replay_draws_other_masks(loss_name, chunks):
    """The replay matters: if pass 3 does not redraw pass 1's dropout masks, the gradient is wrong."""
    loss_fn, model = LOSSES[loss_name], make_model()
    batches, seeds = make_chunks(chunks), seeds_for(chunks)
    want_loss, want = reference(model, loss_fn, batches, seeds)
    _, loss, _, broken = gradcache(model, loss_fn, batches, seeds, engine_cls=BrokenReplayEngine)
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-12)  # pass 1 (the loss) still used the right masks
    assert max_difference(broken, want) > 1e-3
    _, _, _, right = gradcache(model, loss_fn, batches, seeds)
    assert_same_grads(right, want)


@pytest.mark.parametrize("chunks", [2, 4])
def test_gradient_differs_under_other_seeds(chunks):
    """Other chunk seeds are other masks: the reference with the step's seeds is not the one with the next step's."""
    model, batches = make_model(), make_chunks(chunks)
    _, want = reference(model, negclip_loss, batches, seeds_for(chunks, step=0))
    _, _, _, other = gradcache(model, negclip_loss, batches, seeds_for(chunks, step=1))
    assert max_difference(other, want) > 1e-3
    _, _, _, again = gradcache(model, negclip_loss, batches, seeds_for(chunks, step=0))
    assert_same_grads(again, want)  # deterministic under the same seeds


def test_every_chunk_backward_reaches_the_shared_scale():
    """0-dim reps: the gradient goes through the first chunk, and a zero one through the others, so every chunk's
    backward reaches ``logit_scale`` (DeepSpeed's CPU-offloaded accumulation drops a parameter the boundary chunk's
    backward misses)."""
    model, chunks = make_model(), 4
    calls = []
    handle = model.logit_scale.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad.item()))
    try:
        _, want = reference(model, clip_loss, make_chunks(chunks), seeds_for(chunks))
        calls.clear()
        _, _, _, got = gradcache(model, clip_loss, make_chunks(chunks), seeds_for(chunks))
    finally:
        handle.remove()
    assert len(calls) == chunks
    assert calls == [pytest.approx(want["logit_scale"].item(), abs=1e-12)] * chunks  # all after chunk 0, then + 0
    assert_same_grads(got, want)


def test_one_seed_per_chunk():
    model = make_model()
    with pytest.raises(ValueError, match="one seed per chunk"):
        run_step(Engine(model), clip_loss, make_chunks(2), seeds_for(3))


def test_one_chunk_is_a_plain_step():
    model, batches, seeds = make_model(), make_chunks(1), seeds_for(1)
    want_loss, want = reference(model, clip_loss, batches, seeds)
    engine, loss, logs, got = gradcache(model, clip_loss, batches, seeds)
    assert engine.scales == [False] and engine.steps == 1
    assert loss.item() == want_loss.item()
    assert_same_grads(got, want, atol=0)
    assert not logs["logit_scale"].requires_grad


# -- chunk_seed and merge_reps -----------------------------------------------------------------------------------


def test_chunk_seed():
    seeds = {chunk_seed(s, step, rank, c) for s in (0, 1) for step in (0, 1) for rank in (0, 1) for c in (0, 1)}
    assert len(seeds) == 16  # every key matters
    assert chunk_seed(3, 4, 5, 6) == chunk_seed(3, 4, 5, 6)
    assert all(0 <= s < 2**63 for s in seeds)  # valid for torch.manual_seed
    torch.manual_seed(max(seeds))


def test_merge_reps():
    a = {"x": torch.arange(6.0).reshape(3, 2), "scale": torch.tensor(2.0), "ids": torch.tensor([0, 1, 2]),
         "neg": torch.zeros(0, 2)}
    b = {"x": torch.arange(6.0, 10.0).reshape(2, 2), "scale": torch.tensor(5.0), "ids": torch.tensor([3, 4]),
         "neg": torch.ones(2, 2)}
    c = {"x": torch.zeros(0, 2), "scale": torch.tensor(9.0), "ids": torch.zeros(0, dtype=torch.long),
         "neg": torch.full((1, 2), 3.0)}
    merged = merge_reps([a, b, c])
    assert list(merged) == ["x", "scale", "ids", "neg"]
    torch.testing.assert_close(merged["x"], torch.arange(10.0).reshape(5, 2))  # rows in chunk order
    assert merged["scale"] is a["scale"]  # 0-dim: the first chunk's, not a sum or a stack
    assert merged["ids"].tolist() == [0, 1, 2, 3, 4] and merged["ids"].dtype == torch.long
    assert merged["neg"].tolist() == [[1.0, 1.0], [1.0, 1.0], [3.0, 3.0]]  # empty chunks add no rows
    assert all(torch.equal(merge_reps([a])[k], a[k]) for k in a)


def test_merge_reps_keeps_autograd():
    x = torch.randn(2, 3, requires_grad=True)
    y = torch.randn(1, 3, requires_grad=True)
    s = torch.tensor(1.5, requires_grad=True)
    merged = merge_reps([{"v": x * 2, "s": s * 1}, {"v": y * 3, "s": s * 1}])
    (merged["v"].sum() + merged["s"]).backward()
    assert torch.equal(x.grad, torch.full((2, 3), 2.0)) and torch.equal(y.grad, torch.full((1, 3), 3.0))
    assert s.grad.item() == 1.0  # counted once
