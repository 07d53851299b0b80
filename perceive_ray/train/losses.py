"""Contrastive training losses (CLIP, NegCLIP, SigLIP, PACL, SPARC) that are exactly equivalent under data parallelism.

Convention (every loss here). DDP / DeepSpeed average parameter gradients over the R ranks, each of which holds its
own rows of the batch. Every loss function returns, on every rank, the loss of the GLOBAL batch: the same value one
process would compute on all ranks' rows concatenated in rank order (rank 0's rows first). So

1. the value is identical on all ranks and equal to the global loss (any rank can log it; no reduction needed), and
2. (1/R) sum_r grad L_r == grad L_global, the gradient DDP / DeepSpeed apply.

How (autograd all-gather, not the splice-and-multiply-by-R pattern): features are gathered with ``gather_with_grad``,
an all-gather whose backward SUMS over ranks the gradients every rank computed for this rank's rows, and the loss
reads rows ONLY from the gathered tensors. Rank r's rows x_r then receive sum_s dL_global/dx_r = R dL_global/dx_r,
and the gradient average over ranks divides the R back out. Parameters used directly by every rank (``logit_scale``,
``logit_bias``) get dL_global/ds on every rank, which averaging leaves unchanged. Ranks may hold different numbers of
rows (gloo's all_gather needs equal shapes: rows are padded to the longest rank, gathered, and the padding dropped).

Outside torch.distributed (not initialised, or world size 1) the gather is the identity, and the losses are the
plain single-process formulas: ``compute_pacl_loss`` is ``compute_contrastive_loss`` and
``compute_sparc_loss_distributed`` is ``compute_sparc_loss``, value for value.

Shapes: B rows on this rank, N = sum of B over ranks, H negatives on this rank (may be 0, may differ per rank),
D / E embedding width, T text positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from perceive_ray.models.heads.pacl import TEMPERATURE, compute_contrastive_loss
from perceive_ray.models.heads.sparc import (
    GLOBAL_WEIGHT,
    LOCAL_WEIGHT,
    SparcLossTerms,
    SparcOutput,
    compute_global_features,
    compute_masked_pairwise_loss,
)

IGNORE_INDEX = -100  # cross-entropy target of rows that do not count (NegCLIP's negative text rows)

# open_clip's InfoNCE in its single-process form (world_size=1): applied to already-gathered features it is the
# symmetric CLIP loss of the global batch. Its own distributed path is not used: it needs equal batch sizes per rank
# and goes through the deprecated torch.distributed.nn.all_gather.
_CLIP_LOSS = ClipLoss()


# ---------------------------------------------------------------------------------------------------------------
# Gathering
# ---------------------------------------------------------------------------------------------------------------


def get_rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: every rank's equal-shape tensor stacked to (R, *shape). Backward: this rank's slice of the SUM over
    ranks of the incoming gradients (an all-reduce, so it works on every backend, gloo included)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        slots = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(slots, tensor.contiguous())
        return torch.stack(slots)  # (R, *shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # (R, *shape); cloned: all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank]


def gather_sizes(rows: int, device: torch.device) -> list[int]:
    """Every rank's row count, in rank order."""
    _, world = get_rank_and_world_size()
    if world == 1:
        return [rows]
    size = torch.tensor([rows], dtype=torch.long, device=device)
    slots = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(slots, size)
    return [int(s.item()) for s in slots]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rank-ordered concatenation along dim 0 of every rank's ``x`` (row counts may differ), differentiable.

    Returns ``x`` itself outside torch.distributed or at world size 1. The backward sums over ranks the gradients of
    this rank's rows (see the module docstring for why that is the right gradient under DDP averaging).
    """
    _, world = get_rank_and_world_size()
    if world == 1:
        return x
    sizes = gather_sizes(x.shape[0], x.device)
    longest = max(sizes)
    if longest == 0:
        return x  # every rank is empty: nothing to gather
    padding = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
    stacked = _AllGatherWithGrad.apply(torch.cat([x, padding]))  # (R, longest, ...)
    return torch.cat([stacked[r, :n] for r, n in enumerate(sizes)])  # (sum of sizes, ...)


def sum_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a same-shape tensor, differentiable (built on ``gather_with_grad``); ``x`` when alone."""
    _, world = get_rank_and_world_size()
    if world == 1:
        return x
    return gather_with_grad(x.unsqueeze(0)).sum(dim=0)


def _check_pairs(image: torch.Tensor, text: torch.Tensor) -> None:
    if image.ndim != 2 or text.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"need matching (B, D) image and text features, got {tuple(image.shape)} and {tuple(text.shape)}")


def _negatives_or_empty(text_neg: torch.Tensor | None, text_pos: torch.Tensor) -> torch.Tensor:
    """(H, D) hard negatives; ``None`` is H = 0. Every rank still takes part in the gather (H may be 0 on some)."""
    if text_neg is None:
        return text_pos.new_zeros((0, text_pos.shape[1]))
    if text_neg.ndim != 2 or text_neg.shape[1] != text_pos.shape[1]:
        raise ValueError(f"need (H, {text_pos.shape[1]}) negative text features, got {tuple(text_neg.shape)}")
    return text_neg


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def compute_clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP InfoNCE over the global batch: (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2, means over all N rows.

    ``image`` and ``text`` are L2-normalised (B, D); ``logit_scale`` s is the exp'd scalar open_clip models return.
    """
    _check_pairs(image, text)
    return _CLIP_LOSS(gather_with_grad(image), gather_with_grad(text), logit_scale)  # (N, D), (N, D) -> ()


def compute_negclip_loss(
    image: torch.Tensor, text_pos: torch.Tensor, text_neg: torch.Tensor | None, logit_scale: torch.Tensor
) -> torch.Tensor:
    """NegCLIP: CLIP InfoNCE with hard-negative captions as extra text columns (PROTOCOLS, exact).

    Text columns are [positives of ranks 0..R-1] || [negatives of ranks 0..R-1]. Image -> text: row n of the N images
    against all N + sum(H) columns, target n. Text -> image: positives' rows target their image, negatives' rows
    are ignored (target -100). Each cross-entropy is a mean over the non-ignored rows of the global batch (N rows
    both ways); the loss is their mean. ``text_neg`` (H, D) may be empty or ``None`` (then this is the CLIP loss).
    """
    _check_pairs(image, text_pos)
    text_neg = _negatives_or_empty(text_neg, text_pos)
    all_image = gather_with_grad(image)  # (N, D)
    texts = torch.cat([gather_with_grad(text_pos), gather_with_grad(text_neg)])  # (N + sum H, D)
    num_images, num_negatives = all_image.shape[0], texts.shape[0] - all_image.shape[0]
    targets = torch.arange(num_images, device=image.device)  # (N,)
    ignored = torch.full((num_negatives,), IGNORE_INDEX, dtype=torch.long, device=image.device)  # (sum H,)
    logits_per_image = logit_scale * all_image @ texts.T  # (N, N + sum H)
    logits_per_text = logit_scale * texts @ all_image.T  # (N + sum H, N)
    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_text, torch.cat([targets, ignored]), ignore_index=IGNORE_INDEX)
    return (image_to_text + text_to_image) / 2


def compute_siglip_loss(
    image: torch.Tensor,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor | None,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023) over the global batch, hard negatives as extra all-negative text columns.

    logits = s I [T_pos; T_neg]^T + b, (N, N + sum H); labels +1 for image n with positive n, -1 everywhere else
    (every image against every hard negative included); loss = -sum logsigmoid(labels * logits) / N.

    Normalisation follows open_clip's ``SigLipLoss``: the sum over all pairs divided by the number of IMAGES (not of
    pairs). open_clip divides each rank's sum by its local B; averaged over ranks by DDP that is the global sum over
    N = R B, which is what this returns on every rank. Without negatives this equals ``SigLipLoss()`` on the
    concatenated batch. (The reference's hard-negative path called open_clip's ``get_ground_truth`` with the wrong
    arity; the labels are built here directly.)
    """
    _check_pairs(image, text_pos)
    text_neg = _negatives_or_empty(text_neg, text_pos)
    all_image = gather_with_grad(image)  # (N, D)
    texts = torch.cat([gather_with_grad(text_pos), gather_with_grad(text_neg)])  # (N + sum H, D)
    num_images, num_negatives = all_image.shape[0], texts.shape[0] - all_image.shape[0]
    logits = logit_scale * all_image @ texts.T + logit_bias  # (N, N + sum H)
    eye = torch.eye(num_images, device=logits.device, dtype=logits.dtype)  # (N, N)
    labels = torch.cat([2 * eye - 1, -logits.new_ones((num_images, num_negatives))], dim=1)  # (N, N + sum H)
    return -F.logsigmoid(labels * logits).sum() / num_images


def compute_pacl_loss(image: torch.Tensor, text: torch.Tensor, *, temperature: float = TEMPERATURE) -> torch.Tensor:
    """PACL's symmetric InfoNCE with fixed tau over the global batch of pooled image (B, E) and text (B, E) vectors.

    The math is ``compute_contrastive_loss`` (heads/pacl.py), applied to the gathered (N, E) features.
    """
    _check_pairs(image, text)
    return compute_contrastive_loss(gather_with_grad(image), gather_with_grad(text), temperature=temperature)


def compute_sparc_loss_distributed(
    out: SparcOutput,
    *,
    temperature: float = TEMPERATURE,
    global_weight: float = GLOBAL_WEIGHT,
    local_weight: float = LOCAL_WEIGHT,
    mask_padding: bool = False,
) -> SparcLossTerms:
    """``compute_sparc_loss`` of the global batch: equal, on every rank, to it on all ranks' samples concatenated.

    Global part: symmetric InfoNCE (tau) over the gathered (N, E) g_v, g_t. Local part: the per-sample token losses
    need no other rank's features; each direction's mean over this rank's valid tokens is re-weighted by
    n_r / sum_r n_r (valid-token counts differ per rank) and summed over ranks, which is the mean over the valid
    tokens of the global batch. In one process the weight is exactly 1 and the terms are ``compute_sparc_loss``'s.
    """
    image, text = compute_global_features(out, mask_padding=mask_padding)  # (B, E), (B, E)
    global_loss = compute_contrastive_loss(gather_with_grad(image), gather_with_grad(text), temperature=temperature)

    mask = out.language_mask  # (B, T)
    count = mask.sum()  # valid tokens on this rank
    if mask.numel() == 0:  # no samples on this rank: it adds nothing, but still joins the collectives
        local_mean = out.token_embed.sum() * 0.0
    else:  # mean over this rank's valid tokens, both directions, exactly as compute_sparc_loss
        local_mean = (
            compute_masked_pairwise_loss(out.grouped, out.token_embed, mask, temperature=temperature)
            + compute_masked_pairwise_loss(out.token_embed, out.grouped, mask, temperature=temperature)
        ) / 2
    local_loss = sum_across_ranks(local_mean * (count / sum_across_ranks(count)))
    return SparcLossTerms(global_weight * global_loss + local_weight * local_loss, global_loss, local_loss)
