"""CLIP loader and clip_cosine scorer on a tiny random-init open_clip model loaded through the real loader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip import factory as open_clip_factory

from perceive_ray import registry
from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.images import load_rgb, scoring_rows, to_pil
from perceive_ray.data.synthetic import generate
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.models.clip import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    SeededRandomResizedCrop,
    load_clip,
    resolve_open_clip_args,
)
from perceive_ray.scoring.clip_cosine import ClipCosineScorer, compat_generator
from perceive_ray.scoring.local import build_scorer, run_local
from tests.component.tiny_clip import build_tiny_clip_dir, tiny_clip_model_config

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=3, pairs=3)
    return load_benchmark("whatsup_controlled_a", out / "whatsup")


def _scorer(tiny_dir: Path, **options) -> ClipCosineScorer:
    return build_scorer(tiny_clip_model_config(tiny_dir), ScorerConfig(name="clip_cosine", options=options))


def _by_key(table) -> dict[tuple[str, int, int], float]:
    rows = table.to_pydict()
    return {
        (item, image, text): score
        for item, image, text, score in zip(
            rows["item_id"], rows["image_index"], rows["text_index"], rows["score"], strict=True
        )
    }


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


def test_end_to_end_scores_table_is_accepted_by_metrics(tiny_dir, manifest):
    scorer = _scorer(tiny_dir)
    assert isinstance(scorer, ClipCosineScorer)  # resolved through the registry name
    result = run_local(manifest, scorer, batch_size=8)
    n_rows = sum(len(item.images) * len(item.texts) for item in manifest.items)
    assert result.scores.num_rows == n_rows
    assert str(result.scores.schema.field("score").type) == "double"
    scores = np.array(result.scores.column("score").to_pylist())
    assert np.all(np.abs(scores) <= 1.0 + 1e-6) and len(np.unique(scores)) > n_rows // 2
    report = compute_metrics(manifest, result.scores)
    assert report.benchmark == "whatsup_controlled_a"
    assert report.metrics and all(math.isfinite(v) for v in report.metrics.values())


def test_scores_equal_an_independent_open_clip_computation(tiny_dir, manifest):
    table = run_local(manifest, _scorer(tiny_dir), batch_size=8).scores
    name = f"local-dir:{tiny_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    expected = {}
    with torch.no_grad():
        for row in scoring_rows(manifest):
            image = to_pil(load_rgb(manifest.root, row["image_path"]))
            image_features = model.encode_image(preprocess(image).unsqueeze(0))  # (1, D)
            text_features = model.encode_text(tokenizer(row["texts"]))  # (T, D)
            cos = F.cosine_similarity(image_features, text_features, dim=-1)  # (T,)
            for t, value in enumerate(cos.tolist()):
                expected[(row["item_id"], row["image_index"], t)] = value
    assert _max_diff(_by_key(table), expected) < 1e-6


@pytest.mark.parametrize("transform", ["val", "train_compat"])
def test_batch_size_does_not_change_scores(tiny_dir, manifest, transform):
    scorer = _scorer(tiny_dir, clip_transform=transform, seed=5)
    one = _by_key(run_local(manifest, scorer, batch_size=1).scores)
    eight = _by_key(run_local(manifest, scorer, batch_size=8).scores)
    assert _max_diff(one, eight) < 1e-5


def test_train_compat_is_seeded_per_image(tiny_dir, manifest):
    seed0 = _by_key(run_local(manifest, _scorer(tiny_dir, clip_transform="train_compat"), batch_size=8).scores)
    again = _by_key(run_local(manifest, _scorer(tiny_dir, clip_transform="train_compat"), batch_size=3).scores)
    seed1 = _by_key(run_local(manifest, _scorer(tiny_dir, clip_transform="train_compat", seed=1), batch_size=8).scores)
    val = _by_key(run_local(manifest, _scorer(tiny_dir), batch_size=8).scores)
    assert _max_diff(seed0, again) < 1e-5
    assert _max_diff(seed0, seed1) > 1e-4
    assert _max_diff(seed0, val) > 1e-4
    # order independence: a generator depends on (seed, item, image) only
    a = compat_generator(0, "item-x", 1).initial_seed()
    assert a == compat_generator(0, "item-x", 1).initial_seed() != compat_generator(0, "item-x", 0).initial_seed()


def test_seeded_crop_matches_open_clip_train_transform(tiny_dir):
    _, train, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}")
    bundle = load_clip(tiny_clip_model_config(tiny_dir))
    assert isinstance(bundle.preprocess_train_compat, SeededRandomResizedCrop)
    rng = np.random.default_rng(0)
    for seed, shape in enumerate([(40, 60), (64, 64), (90, 30), (33, 47)]):
        image = to_pil(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
        torch.manual_seed(seed)
        reference = train(image)
        ours = bundle.preprocess_train_compat(image, torch.Generator().manual_seed(seed))
        assert ours.shape == (3, 32, 32)
        assert torch.equal(ours, reference)
    assert not torch.equal(bundle.preprocess_train_compat(image, 1), bundle.preprocess_train_compat(image, 2))


def test_loader_bundle(tiny_dir):
    bundle = load_clip(tiny_clip_model_config(tiny_dir))
    assert not bundle.model.training and not any(p.requires_grad for p in bundle.model.parameters())
    assert (bundle.context_length, bundle.embed_dim, bundle.pretrained) == (77, 32, None)
    assert bundle.name == f"local-dir:{tiny_dir.resolve()}"
    assert bundle.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    tokens = bundle.tokenizer(["a photo of a cat"])
    assert tokens.shape == (1, 77) and int(tokens[0, 0]) == 49406  # the real BPE vocab's <start_of_text>
    bf16 = load_clip(tiny_clip_model_config(tiny_dir, dtype="bfloat16"))
    assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16 and bf16.dtype == torch.bfloat16


def test_bfloat16_scores_track_float32(tiny_dir, manifest):
    fp32 = _by_key(run_local(manifest, _scorer(tiny_dir), batch_size=8).scores)
    scorer = ClipCosineScorer(tiny_clip_model_config(tiny_dir, dtype="bfloat16"), ScorerConfig(name="clip_cosine"))
    bf16 = _by_key(run_local(manifest, scorer, batch_size=8).scores)
    assert 0 < _max_diff(fp32, bf16) < 0.05


@pytest.mark.parametrize(
    ("options", "key"),
    [({"text_prefix": "a photo of "}, "scorer.options.text_prefix"), ({"clip_transform": "train"},
                                                                        "scorer.options.clip_transform")],
)
def test_bad_options_are_config_errors(tiny_dir, options, key):
    with pytest.raises(ConfigError, match=key):
        _scorer(tiny_dir, **options)


def test_wrong_family_is_a_config_error(tiny_dir):
    model = ModelConfig(family="llava", source=str(tiny_dir))
    with pytest.raises(ConfigError, match="model.family"):
        ClipCosineScorer(model, ScorerConfig(name="clip_cosine"))


def test_bad_sources_are_clear_errors(tmp_path, tiny_dir):
    def resolve(source, **kw):
        return resolve_open_clip_args(ModelConfig(family="clip", source=source, **kw))

    with pytest.raises(ConfigError, match="not a directory holding"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="neither a local directory nor an open_clip model name"):
        resolve("ViT-Q-99")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=CONFIG_FILE):
        resolve(str(tmp_path / "empty"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / CONFIG_FILE).write_text((tiny_dir / CONFIG_FILE).read_text())
    with pytest.raises(ConfigError, match="holds no weights"):
        resolve(str(no_weights))
    (no_weights / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve(str(no_weights))
    with pytest.raises(ConfigError, match="model.pretrained: must be unset"):
        resolve(str(tiny_dir), pretrained="openai")
    with pytest.raises(ConfigError, match="known tags: .*openai"):
        resolve("ViT-L-14-336", pretrained="no-such-tag")
    with pytest.raises(ConfigError, match="model.revision"):
        resolve("ViT-L-14-336", revision="main")


def test_real_names_resolve_to_open_clip_arguments():
    pretrained = open_clip.list_pretrained()
    assert ("ViT-L-14-336", "openai") in pretrained and ("EVA01-g-14", "laion400m_s11b_b41k") in pretrained
    default = resolve_open_clip_args(ModelConfig(family="clip", source="ViT-L-14-336"))
    # open_clip 3.x only warns on a QuickGELU mismatch; OpenAI weights need QuickGELU, as the reference's 2.32 used
    assert (default.model_name, default.pretrained, default.force_quick_gelu) == ("ViT-L-14-336", "openai", True)
    eva = resolve_open_clip_args(
        ModelConfig(family="clip", source="EVA01-g-14", pretrained="laion400m_s11b_b41k", dtype="bfloat16")
    )
    assert (eva.model_name, eva.pretrained, eva.precision, eva.force_quick_gelu) == (
        "EVA01-g-14", "laion400m_s11b_b41k", "bf16", False)
    siglip = resolve_open_clip_args(ModelConfig(family="clip", source="hf-hub:timm/ViT-B-16-SigLIP"))
    assert (siglip.model_name, siglip.pretrained) == ("hf-hub:timm/ViT-B-16-SigLIP", None)


def test_open_clip_name_with_checkpoint_file_loads_through_the_name_path(tmp_path, tiny_dir, monkeypatch):
    # register the tiny architecture under a built-in-style name (open_clip's config mechanism), on copies of
    # open_clip's registries so the name does not leak into other tests
    monkeypatch.setattr(open_clip_factory, "_MODEL_CONFIGS", dict(open_clip_factory._MODEL_CONFIGS))
    monkeypatch.setattr(open_clip_factory, "_MODEL_CONFIG_PATHS", list(open_clip_factory._MODEL_CONFIG_PATHS))
    name = "perceive-tiny-clip-test"
    model_cfg = json.loads((tiny_dir / CONFIG_FILE).read_text())["model_cfg"]
    (tmp_path / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    checkpoint = str(tiny_dir / WEIGHTS_FILE)

    by_name = load_clip(ModelConfig(family="clip", source=name, pretrained=checkpoint))
    by_dir = load_clip(tiny_clip_model_config(tiny_dir))
    assert (by_name.name, by_name.pretrained) == (name, checkpoint)
    pixels = torch.rand(2, 3, 32, 32)
    tokens = by_dir.tokenizer(["a mug to the left of a plate", "a mug on a plate"])
    with torch.no_grad():
        assert torch.equal(by_name.model.encode_image(pixels), by_dir.model.encode_image(pixels))
        assert torch.equal(by_name.model.encode_text(tokens), by_dir.model.encode_text(tokens))
    with pytest.raises(ConfigError, match="neither a pretrained tag"):
        load_clip(ModelConfig(family="clip", source=name, pretrained=str(tmp_path / "missing.safetensors")))


def test_registry_points_at_these_objects():
    assert registry.resolve("scorers", "clip_cosine") is ClipCosineScorer
    assert registry.resolve("models", "clip") is load_clip
