"""Training losses in one process, against values written out by hand (closed forms and explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from perceive_ray.models.heads.pacl import HeadSpec, compute_contrastive_loss
from perceive_ray.models.heads.sparc import SparcHead, SparcOutput, compute_sparc_loss
from perceive_ray.train.losses import (
    compute_clip_loss,
    compute_negclip_loss,
    compute_pacl_loss,
    compute_siglip_loss,
    compute_sparc_loss_distributed,
    gather_with_grad,
    get_rank_and_world_size,
    sum_across_ranks,
)

torch.set_num_threads(2)


# -- explicit formulas on Python lists ---------------------------------------------------------------------------


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def cross_entropy(row: list[float], target: int) -> float:
    """-log softmax(row)[target], by log-sum-exp."""
    top = max(row)
    return top + math.log(sum(math.exp(v - top) for v in row)) - row[target]


def infonce(image: list[list[float]], text: list[list[float]], scale: float) -> float:
    """(mean_n CE(s <I_n, T_m>_m, n) + mean_n CE(s <T_n, I_m>_m, n)) / 2."""
    n = len(image)
    i2t = sum(cross_entropy([scale * dot(image[i], t) for t in text], i) for i in range(n)) / n
    t2i = sum(cross_entropy([scale * dot(text[i], v) for v in image], i) for i in range(n)) / n
    return (i2t + t2i) / 2


def negclip(image, pos, neg, scale: float) -> float:
    """Image rows against positives + negatives; text rows: positives only (the negatives' rows are ignored)."""
    n = len(image)
    columns = pos + neg
    i2t = sum(cross_entropy([scale * dot(image[i], t) for t in columns], i) for i in range(n)) / n
    t2i = sum(cross_entropy([scale * dot(pos[i], v) for v in image], i) for i in range(n)) / n
    return (i2t + t2i) / 2


def siglip(image, pos, neg, scale: float, bias: float) -> float:
    """sum over (image n, text j) of log(1 + exp(-y z)), y = +1 iff j == n, over the number of images."""
    total = 0.0
    for i, v in enumerate(image):
        for j, t in enumerate(pos + neg):
            label = 1.0 if j == i else -1.0
            total += math.log1p(math.exp(-label * (scale * dot(v, t) + bias)))
    return total / len(image)


def normalised(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)


# -- gathering outside torch.distributed -------------------------------------------------------------------------


def test_gather_is_the_identity_without_a_process_group():
    x = torch.randn(3, 2)
    assert get_rank_and_world_size() == (0, 1)
    assert gather_with_grad(x) is x
    assert sum_across_ranks(x) is x


# -- CLIP ---------------------------------------------------------------------------------------------------------


def test_clip_loss_closed_form():
    # identical orthonormal pairs: every row's logits are (s, 0) -> CE = log(1 + e^-s) both ways
    eye = torch.eye(2, dtype=torch.float64)
    loss = compute_clip_loss(eye, eye, torch.tensor(3.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3.0)), abs=1e-12)


def test_clip_loss_matches_explicit_loops_and_open_clip():
    image, text, scale = normalised(4, 3, 0), normalised(4, 3, 1), torch.tensor(7.5, dtype=torch.float64)
    loss = compute_clip_loss(image, text, scale)
    assert loss.item() == pytest.approx(infonce(image.tolist(), text.tolist(), 7.5), abs=1e-12)
    assert torch.allclose(loss, ClipLoss()(image, text, scale), atol=1e-12)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="matching"):
        compute_clip_loss(torch.zeros(3, 2), torch.zeros(2, 2), torch.tensor(1.0))
    with pytest.raises(ValueError, match="negative"):
        compute_negclip_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 3), torch.tensor(1.0))


# -- NegCLIP ------------------------------------------------------------------------------------------------------


def test_negclip_closed_form_ignores_negative_rows():
    # image_k = pos_k = e_k, one negative equal to e_0. Image -> text rows: (s, 0, s) and (0, s, 0);
    # text -> image counts the 2 positives only (the negative's row is ignored, not averaged in as a third row).
    s = 2.0
    eye = torch.eye(2, dtype=torch.float64)
    loss = compute_negclip_loss(eye, eye, eye[:1].clone(), torch.tensor(s, dtype=torch.float64))
    i2t = ((math.log(2 * math.exp(s) + 1) - s) + (math.log(math.exp(s) + 2) - s)) / 2
    t2i = math.log1p(math.exp(-s))
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-12)


def test_negclip_matches_explicit_loops():
    image, pos, neg = normalised(3, 4, 2), normalised(3, 4, 3), normalised(5, 4, 4)
    loss = compute_negclip_loss(image, pos, neg, torch.tensor(10.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(negclip(image.tolist(), pos.tolist(), neg.tolist(), 10.0), abs=1e-12)


@pytest.mark.parametrize("empty", [None, "tensor"])
def test_negclip_without_negatives_is_the_clip_loss(empty):
    image, pos, scale = normalised(4, 3, 5), normalised(4, 3, 6), torch.tensor(5.0, dtype=torch.float64)
    negatives = None if empty is None else pos.new_zeros((0, 3))
    assert torch.allclose(compute_negclip_loss(image, pos, negatives, scale), compute_clip_loss(image, pos, scale),
                          atol=1e-12)


def test_negclip_gradient_reaches_the_negatives():
    image, pos = normalised(3, 4, 7), normalised(3, 4, 8)
    neg = normalised(2, 4, 9).requires_grad_()
    compute_negclip_loss(image, pos, neg, torch.tensor(10.0, dtype=torch.float64)).backward()
    assert neg.grad is not None and torch.isfinite(neg.grad).all() and neg.grad.abs().sum() > 0


# -- SigLIP -------------------------------------------------------------------------------------------------------


def test_siglip_closed_form_with_a_negative():
    # image_k = pos_k = e_k, negative = e_0; s = 2, b = -1. Pair logits: matching 1, others -1, image 0 x negative 1.
    s, b = 2.0, -1.0
    eye = torch.eye(2, dtype=torch.float64)
    loss = compute_siglip_loss(eye, eye, eye[:1].clone(), torch.tensor(s, dtype=torch.float64),
                               torch.tensor(b, dtype=torch.float64))
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731  -logsigmoid(x) = softplus(-x)
    image0 = softplus(-1.0) + softplus(-1.0) + softplus(1.0)  # match (y=+1, z=1), e_1 (y=-1, z=-1), neg (y=-1, z=1)
    image1 = softplus(-1.0) + softplus(-1.0) + softplus(-1.0)  # e_0 (y=-1, z=-1), match, neg (y=-1, z=-1)
    assert loss.item() == pytest.approx((image0 + image1) / 2, abs=1e-12)


def test_siglip_matches_explicit_loops():
    image, pos, neg = normalised(3, 4, 10), normalised(3, 4, 11), normalised(2, 4, 12)
    loss = compute_siglip_loss(image, pos, neg, torch.tensor(10.0, dtype=torch.float64),
                               torch.tensor(-5.0, dtype=torch.float64))
    expected = siglip(image.tolist(), pos.tolist(), neg.tolist(), 10.0, -5.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("empty", [None, "tensor"])
def test_siglip_without_negatives_is_open_clips_siglip_loss(empty):
    image, pos = normalised(4, 3, 13), normalised(4, 3, 14)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    negatives = None if empty is None else pos.new_zeros((0, 3))
    expected = SigLipLoss()(image, pos, scale, bias)
    assert torch.allclose(compute_siglip_loss(image, pos, negatives, scale, bias), expected, atol=1e-12)


def test_siglip_gradient_reaches_the_negatives_and_the_bias():
    image, pos = normalised(3, 4, 15), normalised(3, 4, 16)
    neg = normalised(2, 4, 17).requires_grad_()
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    compute_siglip_loss(image, pos, neg, torch.tensor(10.0, dtype=torch.float64), bias).backward()
    assert neg.grad is not None and neg.grad.abs().sum() > 0 and bias.grad is not None and bias.grad != 0


# -- PACL ---------------------------------------------------------------------------------------------------------


def test_pacl_loss_is_the_heads_contrastive_loss_and_the_loops():
    image, text = normalised(5, 4, 18), normalised(5, 4, 19)
    loss = compute_pacl_loss(image, text)
    assert torch.equal(loss, compute_contrastive_loss(image, text))
    assert loss.item() == pytest.approx(infonce(image.tolist(), text.tolist(), 1 / 0.1), abs=1e-12)
    assert compute_pacl_loss(image, text, temperature=0.5).item() == pytest.approx(
        infonce(image.tolist(), text.tolist(), 2.0), abs=1e-12)


# -- SPARC --------------------------------------------------------------------------------------------------------


def sparc_by_hand(patches, tokens, grouped, mask, tau: float) -> tuple[float, float]:
    """(global, local) SPARC terms by loops: padding-inclusive token mean, -1e8 on invalid columns."""
    def unit(v):
        norm = math.sqrt(dot(v, v))
        return [x / norm for x in v]

    def mean(rows):
        return [sum(col) / len(rows) for col in zip(*rows, strict=True)]

    image = [unit(mean(p)) for p in patches]
    text = [unit(mean(t)) for t in tokens]
    global_loss = infonce(image, text, 1 / tau)
    directions = []
    for a_all, b_all in ((grouped, tokens), (tokens, grouped)):
        total, count = 0.0, 0
        for a, b, m in zip(a_all, b_all, mask, strict=True):
            for i in range(len(a)):
                if m[i]:
                    row = [dot(a[i], b[j]) / tau + (0.0 if m[j] else -1e8) for j in range(len(b))]
                    total, count = total + cross_entropy(row, i), count + 1
        directions.append(total / count)
    return global_loss, sum(directions) / 2


def test_sparc_terms_match_loops():
    generator = torch.Generator().manual_seed(20)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # 2 and 1 valid tokens
    out = SparcOutput(patch_embed=torch.randn(2, 4, 3, generator=generator, dtype=torch.float64),
                      token_embed=unit(2, 3, 3), grouped=unit(2, 3, 3), language_mask=mask, weights=torch.empty(0))
    terms = compute_sparc_loss_distributed(out)
    global_loss, local_loss = sparc_by_hand(out.patch_embed.tolist(), out.token_embed.tolist(), out.grouped.tolist(),
                                            mask.tolist(), 0.1)
    assert terms.global_loss.item() == pytest.approx(global_loss, abs=1e-10)
    assert terms.local_loss.item() == pytest.approx(local_loss, abs=1e-10)
    assert terms.total.item() == pytest.approx(0.5 * global_loss + 1.0 * local_loss, abs=1e-10)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_sparc_single_process_is_exactly_compute_sparc_loss(mask_padding):
    torch.manual_seed(21)
    head = SparcHead(HeadSpec(kind="sparc", vision_dim=8, text_dim=6, embed_dim=4, num_patches=5), dropout=0.0)
    token_ids = torch.randint(1, 100, (3, 7))
    for row, eot in enumerate((1, 4, 6)):
        token_ids[row, eot] = 49407  # EOT: valid-token counts 2, 5, 7
    out = head(torch.randn(3, 5, 8), torch.randn(3, 7, 6), token_ids)
    ours = compute_sparc_loss_distributed(out, mask_padding=mask_padding)
    theirs = compute_sparc_loss(out, mask_padding=mask_padding)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
