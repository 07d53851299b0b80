"""Training losses on 2 gloo ranks equal one process on the concatenated batch: values and DDP-averaged gradients.

Two spawned processes each take their slice of one fixed float64 batch, encode it with small trainable modules
(``nn.Linear`` encoders with a logit scale and bias, or the real PACL / SPARC heads), compute the loss, backpropagate
and all-reduce-average the parameter gradients as DDP / DeepSpeed do. The parent compares every rank's loss value and
averaged gradients with the loss and gradients of one process on the whole batch. All cases run in one spawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from perceive_ray.models.heads.pacl import HeadSpec, PaclHead, compute_contrastive_loss
from perceive_ray.models.heads.sparc import SparcHead, compute_sparc_loss
from perceive_ray.train.losses import (
    compute_clip_loss,
    compute_negclip_loss,
    compute_pacl_loss,
    compute_siglip_loss,
    compute_sparc_loss_distributed,
)
from tests.fixtures.spawn import spawn_ranks

WORLD = 2
TIMEOUT_S = 120  # whole spawn; gloo collectives time out after COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 60
ATOL = 1e-5
EOT = 49407  # the highest CLIP token id: compute_language_mask takes the argmax as EOT


@dataclass(frozen=True)
class Case:
    loss: str  # clip | negclip | siglip | pacl | sparc | sparc_masked
    rows: tuple[int, int] = (3, 3)  # (image, positive) pairs per rank
    negatives: tuple[int, int] = (0, 0)  # hard-negative captions per rank


CASES = {
    "clip": Case("clip"),
    "clip_uneven_rows": Case("clip", rows=(4, 2)),
    "negclip_3_1": Case("negclip", negatives=(3, 1)),
    "negclip_3_0": Case("negclip", negatives=(3, 0)),
    "negclip_0_2": Case("negclip", negatives=(0, 2)),
    "siglip_1_2": Case("siglip", negatives=(1, 2)),
    "siglip_0_0": Case("siglip"),
    "pacl": Case("pacl"),
    "sparc": Case("sparc"),
    "sparc_masked": Case("sparc_masked"),
}


class DualEncoder(nn.Module):
    """Linear image and text encoders with open_clip's logit scale (log-parametrised) and a SigLIP bias."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(5, 4)
        self.text = nn.Linear(6, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))


def build_model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    if case.loss == "pacl":
        spec = HeadSpec(kind="pacl", vision_dim=8, text_dim=6, embed_dim=4, num_patches=5)
        model = PaclHead(spec, dropout=0.0, pooling="sigmoid")
    elif case.loss.startswith("sparc"):
        model = SparcHead(HeadSpec(kind="sparc", vision_dim=8, text_dim=6, embed_dim=4, num_patches=5), dropout=0.0)
    else:
        model = DualEncoder()
    return model.double()


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """The whole batch: rank 0's rows first. SPARC texts end at different positions (valid tokens 2..7 per row)."""
    generator = torch.Generator().manual_seed(1)
    n, h = sum(case.rows), sum(case.negatives)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if case.loss == "pacl":
        return {"patches": randn(n, 5, 8), "text": randn(n, 6)}
    if case.loss.startswith("sparc"):
        token_ids = torch.randint(1, 100, (n, 7), generator=generator)
        for row, eot in enumerate((1, 2, 6, 0, 3, 4)[:n]):  # rank 0: 2+3+7 = 12 valid tokens, rank 1: 1+4+5 = 10
            token_ids[row, eot] = EOT
        return {"patches": randn(n, 5, 8), "tokens": randn(n, 7, 6), "token_ids": token_ids}
    return {"image": randn(n, 5), "text": randn(n, 6), "negatives": randn(h, 6)}


def rank_slice(inputs: dict[str, torch.Tensor], case: Case, rank: int) -> dict[str, torch.Tensor]:
    row_start, neg_start = sum(case.rows[:rank]), sum(case.negatives[:rank])
    return {key: value[neg_start:neg_start + case.negatives[rank]] if key == "negatives"
            else value[row_start:row_start + case.rows[rank]] for key, value in inputs.items()}


def compute_loss(case: Case, model: nn.Module, inputs: dict[str, torch.Tensor], *, reference: bool) -> torch.Tensor:
    """The loss under test; ``reference``: the pre-existing single-process function where there is one."""
    if case.loss == "pacl":
        image, text = model(inputs["patches"], inputs["text"])
        return compute_contrastive_loss(image, text) if reference else compute_pacl_loss(image, text)
    if case.loss.startswith("sparc"):
        out = model(inputs["patches"], inputs["tokens"], inputs["token_ids"])
        mask_padding = case.loss == "sparc_masked"
        if reference:
            return compute_sparc_loss(out, mask_padding=mask_padding).total
        return compute_sparc_loss_distributed(out, mask_padding=mask_padding).total
    image = F.normalize(model.image(inputs["image"]), dim=-1)  # (B, 4)
    text = F.normalize(model.text(inputs["text"]), dim=-1)  # (B, 4)
    negatives = F.normalize(model.text(inputs["negatives"]), dim=-1)  # (H, 4)
    scale = model.logit_scale.exp()
    if case.loss == "clip":
        return ClipLoss()(image, text, scale) if reference else compute_clip_loss(image, text, scale)
    if case.loss == "negclip":
        return compute_negclip_loss(image, text, negatives, scale)
    return compute_siglip_loss(image, text, negatives, scale, model.logit_bias)


def loss_and_grads(case: Case, inputs: dict[str, torch.Tensor], *, reference: bool = False):
    model = build_model(case)
    loss = compute_loss(case, model, inputs, reference=reference)
    loss.backward()
    grads = {name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for name, p in model.named_parameters()}
    return loss.item(), grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        results = {}
        for name, case in CASES.items():
            loss, grads = loss_and_grads(case, rank_slice(make_inputs(case), case, rank))
            for grad in grads.values():  # what DDP / DeepSpeed do with the parameter gradients
                dist.all_reduce(grad)
                grad /= WORLD
            results[name] = (loss, grads)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Both ranks' (loss, averaged grads) per case; a child's exception fails here with its traceback."""
    out_dir = tmp_path_factory.mktemp("losses_distributed")
    return spawn_ranks(_worker, (), world=WORLD, out_dir=out_dir, timeout_s=TIMEOUT_S,
                       what="distributed loss workers")


@pytest.mark.parametrize("name", sorted(CASES))
def test_ranks_reproduce_the_single_process_loss_and_gradients(rank_results, name):
    case = CASES[name]
    expected_loss, expected_grads = loss_and_grads(case, make_inputs(case), reference=True)
    assert any(g.abs().max() > 1e-3 for g in expected_grads.values())
    for rank, results in enumerate(rank_results):
        loss, grads = results[name]
        assert loss == pytest.approx(expected_loss, abs=ATOL), f"rank {rank} loss"
        assert grads.keys() == expected_grads.keys()
        for param, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[param], atol=ATOL, rtol=0,
                                       msg=lambda m, p=param, r=rank: f"rank {r} grad {p}: {m}")


@pytest.mark.parametrize("name", ["clip", "negclip_3_1", "siglip_1_2", "pacl", "sparc"])
def test_the_cases_need_the_other_ranks_rows(name):
    """Sanity of the test data: averaging per-rank losses of local rows only would NOT give the global loss."""
    case = CASES[name]
    inputs = make_inputs(case)
    global_loss, _ = loss_and_grads(case, inputs)
    local_mean = sum(loss_and_grads(case, rank_slice(inputs, case, r))[0] for r in range(WORLD)) / WORLD
    assert abs(local_mean - global_loss) > 1e-3
