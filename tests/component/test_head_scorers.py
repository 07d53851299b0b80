"""PACL / PACL+RoPE / SPARC scorers on a tiny open_clip loaded through ``load_clip`` with tiny saved heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from perceive_ray import registry
from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.images import load_rgb, to_pil
from perceive_ray.data.synthetic import generate
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.models.clip import load_clip
from perceive_ray.models.clip_features import IMAGENET_MEAN, IMAGENET_STD, FrozenClipEncoder, compute_pixels
from perceive_ray.models.heads.pacl import HeadSpec, PaclHead, save_head
from perceive_ray.models.heads.sparc import SparcHead, compute_sparc_scores
from perceive_ray.scoring.heads import PaclRopeScorer, PaclScorer, SparcRopeScorer, SparcScorer
from perceive_ray.scoring.local import run_local
from tests.component.tiny_clip import build_tiny_clip_dir, tiny_clip_model_config

torch.set_num_threads(2)

EMBED = 16  # head width of the tiny heads
# Tiny CLIP (tests/component/tiny_clip.py): ViT width 64, 32 px / patch 8 -> 16 patches; text width 32, embed 32.
VISION, TEXT_EMBED, TEXT_WIDTH, PATCHES = 64, 32, 32, 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory) -> ModelConfig:
    return tiny_clip_model_config(build_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=5, pairs=3)
    return load_benchmark("whatsup_controlled_a", out / "whatsup")


def spec(kind: str, *, rope: bool = False, sigma: float | None = None) -> HeadSpec:
    text_dim = TEXT_EMBED if kind == "pacl" else TEXT_WIDTH
    return HeadSpec(kind=kind, vision_dim=VISION, text_dim=text_dim, embed_dim=EMBED, rope=rope,
                    num_patches=PATCHES, sigma=sigma)


def random_head(head_spec: HeadSpec, seed: int = 0):
    torch.manual_seed(seed)
    head = PaclHead(head_spec) if head_spec.kind == "pacl" else SparcHead(head_spec)
    with torch.no_grad():  # move LayerNorm affine params off their identity init so loading them is checked
        for parameter in head.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return head.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("heads")
    return {
        "pacl": save_head(random_head(spec("pacl")), folder / "pacl.safetensors"),
        "pacl_rope": save_head(random_head(spec("pacl", rope=True), 1), folder / "pacl_rope.safetensors"),
        "sparc": save_head(random_head(spec("sparc"), 2), folder / "sparc.safetensors"),
        "sparc_rope": save_head(random_head(spec("sparc", rope=True), 3), folder / "sparc_rope.safetensors"),
    }


SCORERS = {"pacl": PaclScorer, "pacl_rope": PaclRopeScorer, "sparc": SparcScorer, "sparc_rope": SparcRopeScorer}


def scorer_config(name: str, path: Path, **options) -> ScorerConfig:
    return ScorerConfig(name=name, options={"head_weights": str(path), "embed_dim": EMBED, **options})


def build_scorer(model: ModelConfig, config: ScorerConfig):
    """The scorer class for ``config.name`` (the registry entry may not exist yet; see the registry test)."""
    return SCORERS[config.name](model, config)


def frozen_features(bundle, image: np.ndarray, texts: list[str]):
    """Independent path: torchvision preprocessing, and open_clip's own encode_* with hooks on the final norms."""
    pixels = T.Compose([T.ToTensor(), T.Resize((32, 32)), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(to_pil(image))
    captured = {}
    clip = bundle.model
    hooks = [clip.visual.ln_post.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o)),
             clip.ln_final.register_forward_hook(lambda m, i, o: captured.__setitem__("t", o))]
    try:
        with torch.no_grad():
            clip.encode_image(pixels.unsqueeze(0))
            ids = bundle.tokenizer(texts)
            pooled = clip.encode_text(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return pixels, captured["v"][:, 1:], ids, pooled, captured["t"]  # (3,S,S), (1,N,Dv), (K,L), (K,E), (K,L,W)


def test_preprocess_and_encoder_features_match_open_clip(model_cfg, manifest):
    bundle = load_clip(model_cfg)
    encoder = FrozenClipEncoder(bundle)
    assert (encoder.num_patches, encoder.vision_dim, encoder.text_width, encoder.text_embed_dim) == (
        PATCHES, VISION, TEXT_WIDTH, TEXT_EMBED)
    image = load_rgb(manifest.root, manifest.items[0].images[0])
    texts = list(manifest.items[0].texts)
    pixels, patches, ids, pooled, states = frozen_features(bundle, image, texts)
    torch.testing.assert_close(compute_pixels(image, (32, 32)), pixels, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.patch_tokens(pixels.unsqueeze(0)), patches, rtol=0, atol=1e-6)
    assert encoder.model.visual.output_tokens is False  # the toggle is restored
    got_ids, got_pooled, got_states = encoder.text_features(texts)
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_states, states, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "rope", "pooling"),
                         [("pacl", False, "uniform"), ("pacl", False, "sigmoid"), ("pacl_rope", True, "uniform")])
def test_pacl_scores_equal_direct_computation(model_cfg, manifest, weights, name, rope, pooling):
    scorer = build_scorer(model_cfg, scorer_config(name, weights[name], pacl_pooling=pooling))
    assert isinstance(scorer, PaclRopeScorer if rope else PaclScorer) and scorer.head.spec.rope is rope
    head = random_head(spec("pacl", rope=rope), 1 if rope else 0)
    head.pooling = pooling
    bundle = load_clip(model_cfg)
    item = manifest.items[1]
    image = load_rgb(manifest.root, item.images[0])
    _, patches, _, pooled, _ = frozen_features(bundle, image, list(item.texts))
    with torch.no_grad():  # the reference: the image expanded to K options, then the diagonal of v t^T
        v, t = head(patches.expand(len(item.texts), -1, -1), pooled)
        expected = (v @ t.T).diagonal()
    batch = {"item_id": [item.item_id], "image_index": [0], "image": [image], "texts": [list(item.texts)]}
    out = scorer(batch)
    assert out["text_index"] == [0, 1, 2, 3] and out["item_id"] == [item.item_id] * 4
    np.testing.assert_allclose(out["score"], expected.double().numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("cls", "rope", "local", "mask_padding"),
                         [(SparcScorer, False, True, False), (SparcRopeScorer, True, True, False),
                          (SparcScorer, False, False, False), (SparcScorer, False, True, True)])
def test_sparc_scores_equal_direct_computation(model_cfg, manifest, weights, cls, rope, local, mask_padding):
    path = weights["sparc_rope" if rope else "sparc"]
    scorer = cls(model_cfg, scorer_config("sparc", path, sparc_local=local, sparc_mask_padding=mask_padding))
    assert scorer.sigma == 1 / PATCHES and scorer.head.spec.rope is rope
    head = random_head(spec("sparc", rope=rope), 3 if rope else 2)
    bundle = load_clip(model_cfg)
    item = manifest.items[2]
    image = load_rgb(manifest.root, item.images[0])
    _, patches, ids, _, states = frozen_features(bundle, image, list(item.texts))
    with torch.no_grad():
        out = head(patches.expand(len(item.texts), -1, -1), states, ids)
        expected = compute_sparc_scores(out, local=local, mask_padding=mask_padding)
    scores = scorer({"item_id": [item.item_id], "image_index": [0], "image": [image], "texts": [list(item.texts)]})
    np.testing.assert_allclose(scores["score"], expected.double().numpy(), rtol=0, atol=1e-5)


def _by_key(table) -> dict[tuple[str, int, int], float]:
    d = table.to_pydict()
    return {(i, m, t): s for i, m, t, s in zip(d["item_id"], d["image_index"], d["text_index"], d["score"],
                                                 strict=True)}


@pytest.mark.parametrize("name", ["pacl", "pacl_rope", "sparc"])
def test_batch_invariance_and_metrics_accept_the_scores(model_cfg, manifest, weights, name):
    scorer = build_scorer(model_cfg, scorer_config(name, weights[name]))
    one = run_local(manifest, scorer, batch_size=1).scores
    eight = run_local(manifest, scorer, batch_size=8).scores
    assert one.num_rows == eight.num_rows == 4 * len(manifest)
    a, b = _by_key(one), _by_key(eight)
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-5
    assert len({round(s, 6) for s in a.values()}) > len(manifest)  # scores actually depend on image and text
    report = compute_metrics(manifest, eight)
    assert 0.0 <= report.metrics["4way/individual_acc"] <= 1.0


def test_rope_is_the_scorer_kind_and_must_match_stored_weights(model_cfg, weights):
    with pytest.raises(ConfigError, match="rope"):
        build_scorer(model_cfg, scorer_config("pacl", weights["pacl_rope"]))
    with pytest.raises(ConfigError, match="rope"):
        build_scorer(model_cfg, scorer_config("pacl_rope", weights["pacl"]))
    with pytest.raises(ConfigError, match="kind"):
        build_scorer(model_cfg, scorer_config("pacl", weights["sparc"]))


def test_sparc_sigma_is_stored_and_the_eval_override_changes_scores(model_cfg, manifest, weights, tmp_path):
    path = save_head(random_head(spec("sparc", sigma=0.3), 4), tmp_path / "sigma.safetensors")
    assert SparcScorer(model_cfg, scorer_config("sparc", path)).sigma == 0.3
    with pytest.raises(ConfigError, match="sparc_eval_sigma"):
        SparcScorer(model_cfg, scorer_config("sparc", path, sparc_sigma=0.2))
    item = manifest.items[0]
    batch = {"item_id": [item.item_id], "image_index": [0], "texts": [list(item.texts)],
             "image": [load_rgb(manifest.root, item.images[0])]}
    default = SparcScorer(model_cfg, scorer_config("sparc", weights["sparc"]))
    compat = SparcScorer(model_cfg, scorer_config("sparc", weights["sparc"], sparc_eval_sigma=0.95))
    assert compat.sigma == 0.95 and compat.head.sigma == 1 / PATCHES
    assert not np.allclose(default(batch)["score"], compat(batch)["score"])


SIGMA_576, SIGMA_625 = 1 / 576, 1 / 625  # the stored training value and the reference's shipped eval (§5.4)


def rope_from_spec(x: torch.Tensor) -> torch.Tensor:
    """PROTOCOLS §5.3 written out: phi = p * 10000^(-2k/d); [x_2k cos - x_2k+1 sin || x_2k sin + x_2k+1 cos]."""
    n, d = x.shape[-2], x.shape[-1]
    k = torch.arange(d // 2, dtype=torch.float32)
    phi = torch.arange(n, dtype=torch.float32)[:, None] * (10000.0 ** (-2.0 * k / d))[None]  # (N, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * phi.cos() - odd * phi.sin(), even * phi.sin() + odd * phi.cos()], dim=-1)


def sparc_rope_scores_from_spec(head, patches: torch.Tensor, states: torch.Tensor, sigma: float):
    """PROTOCOLS §5.4 / §3.5 SPARC eval (``--local``, padding included) for one image (1, N, Dv) and K texts
    (K, L, Dt); the head's own LN/Linear weights, everything else written out here. Returns (scores (K,),
    min-max normalised similarities (K, L, N))."""
    with torch.no_grad():
        pp = head.visual_projection(rope_from_spec(patches))[0]  # (N, E)
        tt = head.text_projection(states)  # (K, L, E)
        sim = torch.einsum("kle,ne->kln", tt, pp)  # unnormalised token-patch similarities
        low, high = sim.min(-1, keepdim=True).values, sim.max(-1, keepdim=True).values
        scaled = (sim - low) / (high - low + 1e-8)  # min-max over patches, per text token
        kept = torch.where(scaled < sigma, torch.zeros_like(scaled), scaled)  # zero entries below sigma
        weights = kept / (kept.sum(-1, keepdim=True) + 1e-8)  # renormalise to sum 1 over patches
        grouped = torch.nn.functional.normalize(weights @ pp, dim=-1)  # (K, L, E) language-grouped patches
        image = torch.nn.functional.normalize(grouped.mean(dim=1), dim=-1)  # mean over all L positions
        text = torch.nn.functional.normalize(torch.nn.functional.normalize(tt, dim=-1).mean(dim=1), dim=-1)
        return (image * text).sum(-1), scaled


def window_sparc_rope_head(patches: torch.Tensor, seed: int = 6):
    """A tiny SPARC+RoPE head (stored sigma 1/576) built so that sigma matters: the visual projection is rank one
    along u (non-linear branch zeroed) with v solved so that the 16 patches' coordinates along u are
    c = [1, 0, 14 values inside [1/625, 1/576)], and every text token points along +u. Each token's min-max
    normalised similarities are then c: sigma = 1/576 keeps patch 0 alone, sigma = 1/625 also the other 14."""
    head = random_head(spec("sparc", rope=True, sigma=SIGMA_576), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = head.visual_projection[0](rope_from_spec(patches))[0].double()  # (N, Dv) LayerNorm outputs
        target = torch.cat([torch.tensor([1.0, 0.0]), torch.linspace(0.00164, 0.00170, PATCHES - 2)]).double()
        v = torch.linalg.lstsq(z, target[:, None], driver="gelsd").solution[:, 0]  # z v = c exactly (N < Dv)
        u = torch.nn.functional.normalize(torch.randn(EMBED, generator=generator), dim=0)
        projection = head.visual_projection[2]
        projection.linear_projection[0].weight.copy_(torch.outer(u, v.float()))
        projection.linear_projection[0].bias.copy_(torch.randn(EMBED, generator=generator))
        projection.non_linear_projection[2].weight.zero_()
        projection.non_linear_projection[2].bias.zero_()
        text_linear = head.text_projection[2]
        text_linear.weight.mul_(0.1)
        text_linear.bias.copy_(10.0 * u)  # <T_t, u> ~ 10 > 0 for every token: the patch order is c's
    return head


def test_sparc_rope_at_both_sigmas_equals_the_spec(model_cfg, manifest, tmp_path):
    """sparc_rope_whatsup.yaml (sigma = 1/576, stored) and sparc_rope_whatsup_sigma625.yaml (sparc_eval_sigma =
    1/625): both equal a from-spec computation, and the two sigma give different scores."""
    bundle = load_clip(model_cfg)
    item = manifest.items[3]
    image = load_rgb(manifest.root, item.images[0])
    _, patches, ids, _, states = frozen_features(bundle, image, list(item.texts))
    assert ids.shape[1] == states.shape[1]  # all L positions (77), padding included
    head = window_sparc_rope_head(patches)
    _, scaled = sparc_rope_scores_from_spec(head, patches, states, SIGMA_576)
    between = (scaled >= SIGMA_625) & (scaled < SIGMA_576)
    assert int(between.sum()) == (PATCHES - 2) * scaled.shape[0] * scaled.shape[1]  # 14 per token
    assert min(float((scaled - s).abs().min()) for s in (SIGMA_576, SIGMA_625)) > 1e-5  # no rounding-edge case
    path = save_head(head, tmp_path / "sparc_rope_sigma.safetensors")
    batch = {"item_id": [item.item_id], "image_index": [0], "image": [image], "texts": [list(item.texts)]}
    got = {}
    for sigma, options in ((SIGMA_576, {}), (SIGMA_625, {"sparc_eval_sigma": 0.0016})):
        scorer = SparcRopeScorer(model_cfg, scorer_config("sparc_rope", path, **options))
        assert scorer.sigma == pytest.approx(sigma, rel=1e-12) and scorer.head.sigma == pytest.approx(SIGMA_576)
        expected, _ = sparc_rope_scores_from_spec(head, patches, states, sigma)
        got[sigma] = np.asarray(scorer(batch)["score"])
        np.testing.assert_allclose(got[sigma], expected.double().numpy(), rtol=0, atol=1e-5)
    assert np.abs(got[SIGMA_576] - got[SIGMA_625]).min() > 1e-3


def test_released_pth_without_metadata_takes_sigma_from_options(model_cfg, tmp_path):
    head = random_head(spec("sparc"), 5)
    torch.save({f"module.{k}": v for k, v in head.state_dict().items()}, tmp_path / "sparc_rope.pth")
    scorer = SparcScorer(model_cfg, scorer_config("sparc", tmp_path / "sparc_rope.pth", sparc_sigma=0.25))
    assert scorer.sigma == 0.25 and scorer.head.spec.rope is False  # the file name does not switch RoPE on


def test_option_and_config_errors(model_cfg, weights, tmp_path):
    with pytest.raises(ConfigError, match="scorer.options.pacl_pooling"):
        build_scorer(model_cfg, scorer_config("pacl", weights["pacl"], pacl_pooling="max"))
    with pytest.raises(ConfigError, match="scorer.options.sparc_sigma"):
        build_scorer(model_cfg, scorer_config("pacl", weights["pacl"], sparc_sigma=0.1))
    with pytest.raises(ConfigError, match="scorer.options.head_weights"):
        build_scorer(model_cfg, ScorerConfig(name="sparc", options={}))
    with pytest.raises(ConfigError, match="not found"):
        build_scorer(model_cfg, scorer_config("sparc", tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="embed_dim"):
        build_scorer(model_cfg, ScorerConfig(name="pacl", options={"head_weights": str(weights["pacl"])}))
    llava = ModelConfig(family="llava", source=model_cfg.source)
    with pytest.raises(ConfigError, match="model.family"):
        build_scorer(llava, scorer_config("sparc", weights["sparc"]))


def test_registered_names_resolve_to_the_head_scorers():
    for name in SCORERS:
        assert registry.resolve("scorers", name) is SCORERS[name]
