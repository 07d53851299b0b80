"""One optimiser step of a job, whole or in GradCache chunks, on a DeepSpeed engine (or any engine-like object).

A contrastive loss needs every row of the global batch at once; a worker may not hold all of its rows' activations
in memory. GradCache (Gao et al. 2021) keeps the loss exact at any chunk size:

1. forward every chunk WITHOUT autograd, keeping only the representations (rows x D, cheap);
2. compute the global loss on the concatenated representations as leaves and backpropagate to them: the gradient
   of the loss w.r.t. every representation;
3. forward each chunk again WITH autograd, the dropout RNG replayed (each chunk's forward is seeded by a key of
   (seed, step, rank, chunk), so pass 1 and pass 3 draw identical masks), and backpropagate <reps, cached grad>.

The parameter gradient is then exactly the full-batch gradient. With DeepSpeed, ``gradient_accumulation_steps``
equals the number of chunks and every chunk's surrogate goes through ``engine.backward(x, scale_wrt_gas=False)``
(no 1/chunks scaling: the surrogates already sum to the full gradient) and ``engine.step()``, which steps the
optimiser only at the last chunk (no ``no_sync``: it asserts under ZeRO-2/3). 0-dim representations (CLIP's
``logit_scale``) are shared by all chunks: their gradient is applied once, through the first chunk (the other
chunks backpropagate a zero gradient to them, so that every chunk's backward reaches every parameter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from perceive_ray.randomness import keyed_seed


def chunk_seed(seed: int, step: int, rank: int, chunk: int) -> int:
    """The torch seed of one chunk's forward: dropout masks depend on (seed, step, rank, chunk), nothing else."""
    return keyed_seed(seed, "forward", step, rank, chunk) % (2**63)


def run_accumulation_step(
    engine: Any,
    compute_loss: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    batches: Sequence[dict[str, Any]],
    seeds: Sequence[int],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A step of a loss that is a sum over chunks (each chunk's ``compute_loss`` is its own share, already scaled to
    the global normaliser): forward + backward per chunk, ``engine.step()`` after each (DeepSpeed steps the
    optimiser at the last). Returns the sum of the chunks' losses and logs (detached)."""
    if len(batches) != len(seeds):
        raise ValueError("one seed per chunk")
    total, logs_sum = None, {}
    for batch, seed in zip(batches, seeds, strict=True):
        torch.manual_seed(seed)
        loss, logs = compute_loss(engine(batch))
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        total = loss.detach() if total is None else total + loss.detach()
        for key, value in logs.items():
            logs_sum[key] = value.detach() if key not in logs_sum else logs_sum[key] + value.detach()
    return total, logs_sum


def merge_reps(chunks: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-chunk representations along rows; 0-dim entries come from the first chunk."""
    merged = {}
    for key, first in chunks[0].items():
        merged[key] = first if first.ndim == 0 else torch.cat([c[key] for c in chunks], dim=0)
    return merged


def run_step(
    engine: Any,
    compute_loss: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    batches: Sequence[dict[str, Any]],
    seeds: Sequence[int],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, backward and optimiser step over ``batches`` (the chunks of this worker's rows for one step).

    ``engine`` has ``__call__(batch) -> reps``, ``backward(loss, scale_wrt_gas=...)`` and ``step()``.
    Returns the (detached) loss and the job's extra logs.
    """
    if len(batches) != len(seeds):
        raise ValueError("one seed per chunk")
    if len(batches) == 1:
        torch.manual_seed(seeds[0])
        loss, logs = compute_loss(engine(batches[0]))
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        return loss.detach(), {k: v.detach() for k, v in logs.items()}
    cached = []
    with torch.no_grad():
        for batch, seed in zip(batches, seeds, strict=True):
            torch.manual_seed(seed)
            cached.append({k: v.detach() for k, v in engine(batch).items()})
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in merge_reps(cached).items()}
    loss, logs = compute_loss(leaves)
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    offsets = {k: 0 for k in grads}
    for index, (batch, seed) in enumerate(zip(batches, seeds, strict=True)):
        torch.manual_seed(seed)
        reps = engine(batch)
        surrogate = None
        for key, grad in grads.items():
            value = reps[key]
            if value.ndim == 0:
                # The whole gradient through the first chunk and a zero one through the others: every chunk's
                # backward must reach the parameter (DeepSpeed's CPU-offloaded accumulation drops the gradient of a
                # parameter that the boundary chunk's backward does not reach).
                part = grad if index == 0 else torch.zeros_like(grad)
            else:
                rows = value.shape[0]
                part = grad[offsets[key]: offsets[key] + rows]
                offsets[key] += rows
            term = (value * part.to(value.dtype)).sum()
            surrogate = term if surrogate is None else surrogate + term
        if surrogate is None or not surrogate.requires_grad:
            # No row of this chunk reaches the loss (its rows were dropped: unreadable images): backpropagate an exact
            # zero through the trainable parameters, so the chunk still is one backward + step of the accumulation.
            trainable = [p for p in engine.module.parameters() if p.requires_grad]
            surrogate = torch.stack([p.sum() * 0.0 for p in trainable]).sum()
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    return loss.detach(), {k: v.detach() for k, v in logs.items()}
