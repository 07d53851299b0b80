"""RoPE properties, PACL/SPARC pooling, alignment and losses on hand-checkable cases, and head weight loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perceive_ray.models.heads.pacl import (
    HeadLoadError,
    HeadSpec,
    PaclHead,
    clean_reference_state,
    compute_contrastive_loss,
    compute_diagonal_scores,
    compute_patch_activations,
    compute_pooled_visual,
    load_head_file,
    load_pacl_head,
    save_head,
)
from perceive_ray.models.heads.rope import compute_rope, compute_rope_angles, compute_rope_layout
from perceive_ray.models.heads.sparc import (
    SparcHead,
    compute_alignment_weights,
    compute_global_features,
    compute_language_mask,
    compute_masked_pairwise_loss,
    compute_sparc_alignment,
    compute_sparc_loss,
    compute_sparc_scores,
    load_sparc_head,
)

torch.set_num_threads(2)

PACL = HeadSpec(kind="pacl", vision_dim=8, text_dim=6, embed_dim=4, num_patches=16)
SPARC = HeadSpec(kind="sparc", vision_dim=8, text_dim=6, embed_dim=4, num_patches=16)


# ---------------------------------------------------------------- RoPE


def test_rope_hand_computed_small_vector():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])  # positions 0 and 1, d = 4
    out = compute_rope(x)[1]
    # k = 0: pair (x0, x1) = (1, 2), phi = 1; k = 1: pair (x2, x3) = (3, 4), phi = 1 * 10000^(-2/4) = 0.01
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.01), math.sin(0.01)
    expected = torch.tensor([1 * c1 - 2 * s1, 3 * c2 - 4 * s2, 1 * s1 + 2 * c1, 3 * s2 + 4 * c2])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_rope_position_zero_is_only_the_even_odd_layout():
    x = torch.randn(2, 5, 8)
    out = compute_rope(x)
    assert torch.equal(out[:, 0], compute_rope_layout(x[:, 0]))
    assert torch.equal(compute_rope_layout(x[:, 0])[..., :4], x[:, 0, 0::2])
    assert not torch.allclose(out[:, 1], compute_rope_layout(x[:, 1]))  # later positions do rotate


def test_rope_preserves_norms_at_every_raster_position():
    x = torch.randn(2, 576, 32, dtype=torch.float64)
    torch.testing.assert_close(compute_rope(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)


def test_rope_inner_products_depend_only_on_the_offset():
    torch.manual_seed(0)
    d, n = 16, 576
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rq = compute_rope(q.expand(n, d))  # q placed at every position
    rk = compute_rope(k.expand(n, d))
    for offset in (0, 1, 5, 100):
        dots = torch.stack([rq[m] @ rk[m + offset] for m in (0, 3, 57, 400)])
        torch.testing.assert_close(dots, dots[0].expand_as(dots), rtol=0, atol=1e-3)
    assert abs(float(rq[0] @ rk[1] - rq[0] @ rk[5])) > 1e-3  # and the offset does matter


def test_rope_angles_and_errors():
    angles = compute_rope_angles(576, 1024)
    assert angles.shape == (576, 512) and angles.dtype == torch.float32
    assert float(angles[575, 0]) == 575.0 and float(angles[0].abs().max()) == 0.0
    with pytest.raises(ValueError, match="even"):
        compute_rope(torch.randn(3, 5))


# ---------------------------------------------------------------- PACL


def test_pacl_head_keeps_the_reference_state_dict_layout():
    names = set(PaclHead(PACL).state_dict())
    assert names == {
        "visual_projection.0.weight", "visual_projection.0.bias",
        "visual_projection.2.linear_projection.0.weight", "visual_projection.2.linear_projection.0.bias",
        "visual_projection.2.non_linear_projection.0.weight", "visual_projection.2.non_linear_projection.0.bias",
        "visual_projection.2.non_linear_projection.2.weight", "visual_projection.2.non_linear_projection.2.bias",
        "text_projection.0.weight", "text_projection.0.bias", "text_projection.2.weight", "text_projection.2.bias",
    }


def test_infonce_with_identity_logits():
    b = 4
    eye = torch.eye(b, dtype=torch.float64)
    expected = math.log(1 + (b - 1) * math.exp(-10.0))  # diagonal 1/0.1 = 10, off-diagonal 0
    assert float(compute_contrastive_loss(eye, eye)) == pytest.approx(expected, rel=1e-6)
    swapped = eye[[1, 0, 2, 3]]  # two images matched to each other's texts: those rows pay log(1 + 3 e^10)
    loss = float(compute_contrastive_loss(swapped, eye))
    assert loss == pytest.approx((2 * expected + 2 * math.log(1 + 2 * math.exp(-10.0) + math.exp(10.0))) / 4, rel=1e-5)


def test_pooling_uniform_and_sigmoid_by_hand():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, N=2, E=2)
    text = torch.tensor([[2.0, 0.0]])  # cos = (1, 0)
    assert torch.equal(compute_patch_activations(patches, text, "uniform"), torch.ones(1, 2))
    sig = torch.sigmoid(torch.tensor(10.0))
    torch.testing.assert_close(compute_patch_activations(patches, text, "sigmoid"), torch.tensor([[sig, 0.5]]))
    torch.testing.assert_close(compute_pooled_visual(patches, text, "uniform"), torch.tensor([[1.0, 1.0]]) / 2**0.5)
    torch.testing.assert_close(compute_pooled_visual(patches, text, "sigmoid"),
                               F.normalize(torch.tensor([[sig, 0.5]]), dim=-1))
    with pytest.raises(ValueError, match="pooling"):
        compute_patch_activations(patches, text, "max")


def test_diagonal_scores_of_the_text_conditioned_forward():
    torch.manual_seed(1)
    head = PaclHead(PACL, pooling="sigmoid").eval()
    patches, texts = torch.randn(1, 16, 8), torch.randn(3, 6)
    v, t = head(patches.expand(3, -1, -1), texts)  # the reference: one image expanded to K options
    matrix = v @ t.T
    torch.testing.assert_close(compute_diagonal_scores(v, t), matrix.diagonal())
    assert not torch.allclose(v[0], v[1])  # sigmoid pooling conditions v on the option


def test_pacl_loss_decreases_with_adam():
    torch.manual_seed(0)
    head = PaclHead(PACL)
    patches = torch.randn(8, 16, 8)
    text = patches.mean(dim=1)[:, :6] + 0.1 * torch.randn(8, 6)  # texts carry their image's signal
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = compute_contrastive_loss(*head(patches, text))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- SPARC


def test_language_mask_marks_positions_up_to_eot():
    ids = torch.tensor([[49406, 5, 7, 49407, 0, 0], [49406, 9, 9, 9, 9, 49407]])
    assert compute_language_mask(ids).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_alignment_weights_by_hand():
    sim = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0]]])  # min-max -> 0, .25, .5, .75, 1
    weights = compute_alignment_weights(sim, sigma=0.3)
    torch.testing.assert_close(weights, torch.tensor([[[0.0, 0.0, 0.5, 0.75, 1.0]]]) / 2.25)


def test_alignment_weights_sum_to_one_and_vanish_below_sigma():
    torch.manual_seed(0)
    sim = torch.randn(3, 7, 16)
    sigma = 0.4
    weights = compute_alignment_weights(sim, sigma)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, 7), rtol=0, atol=1e-6)
    scaled = (sim - sim.amin(-1, keepdim=True)) / (sim.amax(-1, keepdim=True) - sim.amin(-1, keepdim=True))
    assert torch.all(weights[scaled < sigma] == 0) and torch.all(weights[scaled >= sigma + 1e-6] > 0)


def test_padding_switch_changes_the_global_text_embedding():
    torch.manual_seed(0)
    ids = torch.tensor([[49406, 5, 49407, 0, 0], [49406, 5, 6, 7, 49407]])  # row 0 padded, row 1 not
    out = compute_sparc_alignment(torch.randn(2, 16, 4), torch.randn(2, 5, 4), compute_language_mask(ids), sigma=0.1)
    _, with_pad = compute_global_features(out, mask_padding=False)
    _, masked = compute_global_features(out, mask_padding=True)
    assert not torch.allclose(with_pad[0], masked[0])
    torch.testing.assert_close(with_pad[1], masked[1])
    torch.testing.assert_close(masked[0], F.normalize(out.token_embed[0, :3].mean(0), dim=0))


def test_masked_pairwise_loss_by_hand():
    eye = torch.eye(3, dtype=torch.float64).unsqueeze(0)  # (1, T=3, E=3), token t matches grouped t only
    full = torch.ones(1, 3, dtype=torch.float64)
    assert float(compute_masked_pairwise_loss(eye, eye, full)) == pytest.approx(math.log(1 + 2 * math.exp(-10)))
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    expected = math.log(1 + math.exp(-10))  # the invalid column drops out, the invalid row is not averaged
    assert float(compute_masked_pairwise_loss(eye, eye, mask)) == pytest.approx(expected, rel=1e-6)
    other = eye.clone()
    other[0, 2] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # change only the invalid position: no effect
    assert float(compute_masked_pairwise_loss(eye, other, mask)) == pytest.approx(expected, rel=1e-6)


def test_sparc_loss_weights_and_scores():
    torch.manual_seed(0)
    head = SparcHead(SPARC).eval()
    ids = torch.tensor([[49406, 5, 49407, 0], [49406, 5, 6, 49407], [49406, 49407, 0, 0]])
    out = head(torch.randn(3, 16, 8), torch.randn(3, 4, 6), ids)
    terms = compute_sparc_loss(out)
    torch.testing.assert_close(terms.total, 0.5 * terms.global_loss + 1.0 * terms.local_loss)
    image, text = compute_global_features(out)
    torch.testing.assert_close(compute_sparc_scores(out, local=False), (image * text).sum(-1))
    local_v = F.normalize(out.grouped.mean(dim=1), dim=-1)  # all T positions, padding included
    torch.testing.assert_close(compute_sparc_scores(out), (local_v * text).sum(-1))
    assert not torch.allclose(compute_sparc_scores(out, mask_padding=True), compute_sparc_scores(out))


def test_sparc_sigma_defaults_to_one_over_patches_and_eval_override_changes_weights():
    head = SparcHead(SPARC)
    assert head.sigma == 1 / 16 and head.spec.sigma == 1 / 16
    torch.manual_seed(0)
    args = (torch.randn(2, 16, 8), torch.randn(2, 4, 6), torch.tensor([[49406, 5, 6, 49407]] * 2))
    assert not torch.equal(head(*args).weights, head(*args, sigma=0.9).weights)


def test_sparc_loss_decreases_with_adam():
    torch.manual_seed(0)
    head = SparcHead(SPARC)
    patches = torch.randn(6, 16, 8)
    tokens = patches[:, :5, :6] + 0.1 * torch.randn(6, 5, 6)  # token t describes patch t of its own image
    ids = torch.tensor([[49406, 3, 4, 49407, 0]] * 6)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = compute_sparc_loss(head(patches, tokens, ids)).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------- weights files


def test_safetensors_round_trip_keeps_spec_and_weights(tmp_path):
    torch.manual_seed(0)
    head = SparcHead(HeadSpec(kind="sparc", vision_dim=8, text_dim=6, embed_dim=4, rope=True, sigma=0.2))
    path = save_head(head, tmp_path / "sparc.safetensors")
    state, stored = load_head_file(path)
    assert stored == head.spec and stored.sigma == 0.2 and stored.rope
    loaded = load_sparc_head(path, HeadSpec(kind="sparc", vision_dim=8, text_dim=6, embed_dim=4, rope=True))
    assert loaded.sigma == 0.2 and not loaded.training
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    with pytest.raises(HeadLoadError, match="sigma"):
        load_sparc_head(path, HeadSpec(kind="sparc", vision_dim=8, text_dim=6, embed_dim=4, rope=True, sigma=0.3))
    with pytest.raises(HeadLoadError, match="rope"):
        load_sparc_head(path, HeadSpec(kind="sparc", vision_dim=8, text_dim=6, embed_dim=4, rope=False))


def released_state(head: PaclHead) -> dict[str, torch.Tensor]:
    """What the reference saved: DataParallel keys, the frozen encoder, the aliased linear branch."""
    state = {f"module.{k}": v.clone() for k, v in head.state_dict().items()}
    state["module.clip_model.visual.proj"] = torch.randn(3, 3)
    for suffix in ("weight", "bias"):
        state[f"module.visual_projection.2.text_projection.0.{suffix}"] = \
            state[f"module.visual_projection.2.linear_projection.0.{suffix}"].clone()
    return state


def test_released_dataparallel_pth_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    head = PaclHead(PACL)
    path = tmp_path / "pacl_all.pth"
    torch.save(released_state(head), path)
    loaded = load_pacl_head(path, PACL)
    assert loaded.pooling == "uniform"
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    # the file name says nothing: a rope file name does not turn RoPE on
    rope_named = tmp_path / "pacl_rope_all.pth"
    torch.save(released_state(head), rope_named)
    assert not load_pacl_head(rope_named, PACL).spec.rope


def test_bad_weight_files_fail_with_named_errors(tmp_path):
    head = PaclHead(PACL)
    state = released_state(head)
    state["module.visual_projection.2.text_projection.0.bias"] += 1.0
    with pytest.raises(HeadLoadError, match="differs"):
        clean_reference_state(state)
    wide = HeadSpec(kind="pacl", vision_dim=8, text_dim=6, embed_dim=5, num_patches=16)
    path = save_head(PaclHead(wide), tmp_path / "wide.safetensors")
    with pytest.raises(HeadLoadError, match="embed_dim"):
        load_pacl_head(path, PACL)
    torch.save({k.removeprefix("module."): v for k, v in released_state(PaclHead(wide)).items()}, tmp_path / "w.pth")
    with pytest.raises(HeadLoadError, match="shape"):
        load_pacl_head(tmp_path / "w.pth", PACL)
    torch.save({"weights": torch.ones(2), "note": object.__new__(HeadSpec)}, tmp_path / "pickle.pth")
    with pytest.raises(HeadLoadError, match="cannot read"):
        load_head_file(tmp_path / "pickle.pth")
    with pytest.raises(HeadLoadError, match="not found"):
        load_head_file(tmp_path / "missing.safetensors")


def test_pacl_training_pooling_is_stored_and_an_explicit_choice_overrides_it(tmp_path):
    path = save_head(PaclHead(PACL, pooling="sigmoid"), tmp_path / "pacl.safetensors")
    assert load_head_file(path)[1].pooling == "sigmoid"
    assert load_pacl_head(path, PACL).pooling == "sigmoid"
    assert load_pacl_head(path, PACL, pooling="uniform").pooling == "uniform"
