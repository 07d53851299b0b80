"""``pacl_llm_text`` (PROTOCOLS §5.5): PACL+RoPE head on a tiny LLM2CLIP's patches and adapted LLM2Vec text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from transformers import CLIPVisionModelWithProjection

from perceive_ray import registry
from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.images import load_rgb, to_pil
from perceive_ray.data.synthetic import generate
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.models.clip_features import IMAGENET_MEAN, IMAGENET_STD
from perceive_ray.models.heads.pacl import HeadSpec, PaclHead, save_head
from perceive_ray.models.llm2clip import load_llm2clip, save_tiny_llm2clip
from perceive_ray.models.text_embeddings import write_text_embeddings
from perceive_ray.scoring.heads import PaclLlmTextScorer
from perceive_ray.scoring.local import run_local
from tests.component.test_llm2clip import reference_adapter, reference_llm_vectors

torch.set_num_threads(2)

# Tiny LLM2CLIP: ViT width 32, 32 px / patch 8 -> 16 patches; adapter 48 -> 24. Head width 16.
VISION, PROJ, PATCHES, EMBED = 32, 24, 16, 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llm2clip(tmp_path_factory.mktemp("tiny_llm2clip"), seed=2)


@pytest.fixture(scope="module")
def model_cfg(tiny_dir) -> ModelConfig:
    return ModelConfig(family="llm2clip", source=str(tiny_dir))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=4, pairs=3)
    return load_benchmark("whatsup_controlled_a", out / "whatsup")


def spec(*, rope: bool = True) -> HeadSpec:
    return HeadSpec(kind="pacl", vision_dim=VISION, text_dim=PROJ, embed_dim=EMBED, rope=rope, num_patches=PATCHES)


def random_head(head_spec: HeadSpec, seed: int = 0) -> PaclHead:
    torch.manual_seed(seed)
    head = PaclHead(head_spec)
    with torch.no_grad():  # move LayerNorm affine params off identity so loading them is checked
        for parameter in head.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return head.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_head(random_head(spec()), tmp_path_factory.mktemp("heads") / "pacl_rope_llm.safetensors")


def scorer_config(path: Path, **options) -> ScorerConfig:
    return ScorerConfig(name="pacl_llm_text", options={"head_weights": str(path), "embed_dim": EMBED, **options})


def one_row_batch(manifest, index: int) -> dict:
    item = manifest.items[index]
    return {"item_id": [item.item_id], "image_index": [0], "texts": [list(item.texts)],
            "image": [load_rgb(manifest.root, item.images[0])]}


@pytest.mark.parametrize("pooling", ["uniform", "sigmoid"])
def test_scores_equal_direct_computation(tiny_dir, model_cfg, manifest, weights, pooling):
    scorer = PaclLlmTextScorer(model_cfg, scorer_config(weights, pacl_pooling=pooling))
    assert scorer.head.spec.rope is True and scorer.head.spec.text_dim == PROJ
    batch = one_row_batch(manifest, 1)
    texts = batch["texts"][0]
    # Independent path: torchvision transform, transformers vision tower (pre-post-LN states), LLM2Vec by hand.
    pixels = T.Compose([T.ToTensor(), T.Resize((32, 32)), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(
        to_pil(batch["image"][0]))
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_dir / "vision").eval()
    head = random_head(spec())
    head.pooling = pooling
    with torch.no_grad():
        patches = vision(pixel_values=pixels.unsqueeze(0)).last_hidden_state[:, 1:]  # (1, N, Dv)
        text = reference_adapter(tiny_dir, reference_llm_vectors(tiny_dir / "text", texts))  # (K, P)
        v, t = head(patches.expand(len(texts), -1, -1), text)  # the reference: image repeated per option
        expected = (v @ t.T).diagonal()
    out = scorer(batch)
    assert out["text_index"] == [0, 1, 2, 3]
    np.testing.assert_allclose(out["score"], expected.double().numpy(), rtol=0, atol=1e-5)


def test_online_text_equals_store_text(model_cfg, manifest, weights, tmp_path):
    bundle = load_llm2clip(model_cfg)
    texts = sorted({t for item in manifest.items for t in item.texts})
    store = write_text_embeddings(tmp_path / "store", texts, bundle.encode_llm(texts).numpy(), meta=bundle.text_meta)
    online = PaclLlmTextScorer(model_cfg, scorer_config(weights))
    offline = PaclLlmTextScorer(model_cfg, scorer_config(weights, text_embeddings=str(store)))
    assert offline.bundle.text_encoder is None
    for index in range(3):
        batch = one_row_batch(manifest, index)
        np.testing.assert_allclose(offline(batch)["score"], online(batch)["score"], rtol=0, atol=1e-6)


def _by_key(table) -> dict[tuple[str, int, int], float]:
    d = table.to_pydict()
    return {(i, m, t): s for i, m, t, s in zip(d["item_id"], d["image_index"], d["text_index"], d["score"],
                                                 strict=True)}


def test_batch_invariance_and_metrics_accept_the_scores(model_cfg, manifest, weights):
    scorer = PaclLlmTextScorer(model_cfg, scorer_config(weights))
    one = run_local(manifest, scorer, batch_size=1).scores
    eight = run_local(manifest, scorer, batch_size=8).scores
    assert one.num_rows == eight.num_rows == 4 * len(manifest)
    a, b = _by_key(one), _by_key(eight)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-5
    assert len({round(s, 6) for s in a.values()}) > len(manifest)
    report = compute_metrics(manifest, eight)
    assert 0.0 <= report.metrics["4way/individual_acc"] <= 1.0


def test_config_errors(model_cfg, tmp_path):
    no_rope = save_head(random_head(spec(rope=False)), tmp_path / "pacl_llm.safetensors")
    with pytest.raises(ConfigError, match="rope"):
        PaclLlmTextScorer(model_cfg, scorer_config(no_rope))
    wrong_text = HeadSpec(kind="pacl", vision_dim=VISION, text_dim=768, embed_dim=EMBED, rope=True,
                          num_patches=PATCHES)
    with pytest.raises(ConfigError, match="text_dim"):
        PaclLlmTextScorer(model_cfg, scorer_config(save_head(random_head(wrong_text), tmp_path / "t.safetensors")))
    with pytest.raises(ConfigError, match="scorer.options.head_weights"):
        PaclLlmTextScorer(model_cfg, ScorerConfig(name="pacl_llm_text", options={}))
    with pytest.raises(ConfigError, match="model.family"):
        PaclLlmTextScorer(ModelConfig(family="clip", source=model_cfg.source), scorer_config(no_rope))


def test_released_dataparallel_pth_loads_without_the_frozen_llm2clip(model_cfg, manifest, weights, tmp_path):
    """``pacl_rope_llm_all.pth`` layout: ``module.``-prefixed head keys plus the frozen ``clip_model.*`` tower."""
    head = random_head(spec())
    state = {f"module.{k}": v for k, v in head.state_dict().items()}
    state["module.clip_model.vision_model.embeddings.class_embedding"] = torch.zeros(VISION)
    torch.save(state, tmp_path / "pacl_rope_llm_all.pth")
    released = PaclLlmTextScorer(model_cfg, scorer_config(tmp_path / "pacl_rope_llm_all.pth"))
    ours = PaclLlmTextScorer(model_cfg, scorer_config(weights))
    batch = one_row_batch(manifest, 0)
    np.testing.assert_allclose(released(batch)["score"], ours(batch)["score"], rtol=0, atol=1e-6)


def test_registry_entry():
    assert registry.resolve("scorers", "pacl_llm_text") is PaclLlmTextScorer
