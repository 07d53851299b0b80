"""LLM2CLIP loader, text embedding store and ``llm2clip`` scorer on a tiny LLM2CLIP saved and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPVisionModelWithProjection, LlamaModel

from perceive_ray import registry
from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.data.catalog import load_benchmark
from perceive_ray.data.images import load_rgb
from perceive_ray.data.synthetic import generate
from perceive_ray.metrics.compute import compute_metrics
from perceive_ray.models.llm2clip import Llm2ClipBundle, load_llm2clip, save_tiny_llm2clip
from perceive_ray.models.text_embeddings import (
    MissingTextEmbeddingError,
    TextEmbeddingError,
    TextEmbeddingStore,
    compute_text_sha256,
    write_text_embeddings,
)
from perceive_ray.scoring.llm2clip import Llm2ClipScorer
from perceive_ray.scoring.local import run_local

torch.set_num_threads(2)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAMA3_PREFIX = "<|start_header_id|>user<|end_header_id|>\n\n"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llm2clip(tmp_path_factory.mktemp("tiny_llm2clip"), seed=0)


@pytest.fixture(scope="module")
def model_cfg(tiny_dir) -> ModelConfig:
    return ModelConfig(family="llm2clip", source=str(tiny_dir))


@pytest.fixture(scope="module")
def bundle(model_cfg) -> Llm2ClipBundle:
    return load_llm2clip(model_cfg)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=3, pairs=3)
    return load_benchmark("whatsup_controlled_a", out / "whatsup")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, bundle, manifest) -> Path:
    """A store over every text of the manifest, written by the writer from the same encoder."""
    texts = sorted({t for item in manifest.items for t in item.texts})
    return write_text_embeddings(tmp_path_factory.mktemp("store") / "llm2vec", texts,
                                 bundle.encode_llm(texts).numpy(), meta=bundle.text_meta)


# ---- independent computations (transformers classes and plain tensor ops, not the loader) ----------------------

def reference_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """CLIPImageProcessor by hand: PIL bicubic resize of the shorter side, centre crop, rescale, CLIP mean/std."""
    pil = Image.fromarray(image)
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    pil = pil.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    w, h = pil.size
    top, left = (h - size) // 2, (w - size) // 2
    array = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def reference_llm_vectors(text_dir: Path, texts: list[str]) -> torch.Tensor:
    """LLM2Vec mean pooling, one unpadded text at a time: mean of the last n final states, n = tokens of the text
    (trailing whitespace stripped) + <|eot_id|>; the BOS and the Llama-3 user header are not pooled."""
    llm = LlamaModel.from_pretrained(text_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    out = []
    with torch.no_grad():
        for text in texts:
            body = text.rstrip() + "<|eot_id|>"
            ids = tokenizer(LLAMA3_PREFIX + body)["input_ids"]
            assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
            n = len(tokenizer(body, add_special_tokens=False)["input_ids"])
            hidden = llm(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (L, D)
            out.append(hidden[-n:].mean(0))
    return torch.stack(out)


def reference_adapter(tiny_dir: Path, vectors: torch.Tensor) -> torch.Tensor:
    """The tiny adapter written out functionally from its safetensors: x + MLP(LN(x)) -> LN -> Linear."""
    w = load_file(str(tiny_dir / "adapter.safetensors"))
    x = vectors
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), w["blocks.0.0.weight"], w["blocks.0.0.bias"])
    h = F.linear(F.gelu(F.linear(h, w["blocks.0.1.weight"], w["blocks.0.1.bias"])), w["blocks.0.3.weight"],
                 w["blocks.0.3.bias"])
    x = F.layer_norm(x + h, (d,), w["norm.weight"], w["norm.bias"])
    return F.linear(x, w["proj.weight"], w["proj.bias"])


def reference_scores(tiny_dir: Path, image: np.ndarray, texts: list[str]) -> np.ndarray:
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_dir / "vision").eval()
    with torch.no_grad():
        image_embeds = vision(pixel_values=reference_pixels(image, 32).unsqueeze(0)).image_embeds  # (1, P)
    text_embeds = reference_adapter(tiny_dir, reference_llm_vectors(tiny_dir / "text", texts))  # (K, P)
    return (F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T)[0].double().numpy()


def llm2clip_scorer(model_cfg: ModelConfig, **options) -> Llm2ClipScorer:
    return Llm2ClipScorer(model_cfg, ScorerConfig(name="llm2clip", options=options))


def one_row_batch(manifest, index: int) -> dict:
    item = manifest.items[index]
    return {"item_id": [item.item_id], "image_index": [0], "texts": [list(item.texts)],
            "image": [load_rgb(manifest.root, item.images[0])]}


# ---- loader ------------------------------------------------------------------------------------------------------

def test_tiny_round_trip_is_seeded_and_loads_every_part(tiny_dir, bundle, tmp_path):
    again = save_tiny_llm2clip(tmp_path / "again", seed=0)
    other = save_tiny_llm2clip(tmp_path / "other", seed=1)
    for part in ("vision/model.safetensors", "text/model.safetensors", "adapter.safetensors"):
        assert (again / part).read_bytes() == (tiny_dir / part).read_bytes()
        assert (other / part).read_bytes() != (tiny_dir / part).read_bytes()
    sidecar = json.loads((tiny_dir / "perceive_ray.json").read_text())
    assert sidecar["format"] == "tiny" and sidecar["text"]["template"] == "llama3_instruct"
    # the loaded adapter holds the saved (non-identity) tensors
    saved = load_file(str(tiny_dir / "adapter.safetensors"))
    for name, tensor in bundle.model.text_adapter.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert (bundle.vision_dim, bundle.num_patches, bundle.projection_dim, bundle.llm_dim) == (32, 16, 24, 48)
    assert bundle.text_meta["pooling"] == "mean" and bundle.text_meta["max_length"] == 512
    assert not any(p.requires_grad for p in bundle.model.parameters())


def test_preprocessing_and_features_match_independent_computation(tiny_dir, bundle, manifest):
    item = manifest.items[0]
    image = load_rgb(manifest.root, item.images[0])
    pixels = bundle.pixel_values([image])
    torch.testing.assert_close(pixels[0], reference_pixels(image, 32), rtol=0, atol=1e-5)
    texts = list(item.texts) + ["  leading spaces stay, trailing go   "]
    torch.testing.assert_close(bundle.encode_llm(texts), reference_llm_vectors(tiny_dir / "text", texts),
                               rtol=0, atol=1e-5)
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_dir / "vision").eval()
    with torch.no_grad():
        out = vision(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(bundle.encode_image(pixels), out.image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(bundle.vision_patches(pixels), out.last_hidden_state[:, 1:], rtol=0, atol=1e-6)


def test_right_padding_equals_llm2vec_left_padded_batch(tiny_dir, bundle):
    """LLM2Vec pads left and pools the last n positions; with RoPE that gives the vectors we get by right padding."""
    texts = ["a dog", "A red mug to the left of a blue plate on the table", "cat"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "text")
    tokenizer.padding_side = "left"
    full = [LLAMA3_PREFIX + t + "<|eot_id|>" for t in texts]
    batch = tokenizer(full, return_tensors="pt", padding=True)
    llm = LlamaModel.from_pretrained(tiny_dir / "text").eval()
    with torch.no_grad():
        hidden = llm(**batch).last_hidden_state
    spans = [len(tokenizer(t + "<|eot_id|>", add_special_tokens=False)["input_ids"]) for t in texts]
    left = torch.stack([hidden[i, -n:].mean(0) for i, n in enumerate(spans)])
    torch.testing.assert_close(bundle.encode_llm(texts, batch_size=3), left, rtol=0, atol=1e-5)


def test_remote_code_needs_an_explicit_opt_in_before_any_download(tmp_path):
    for source in ("microsoft/LLM2CLIP-Openai-L-14-336", str(tmp_path)):  # hub id, or a snapshot directory
        with pytest.raises(ConfigError, match="trust_remote_code"):
            load_llm2clip(ModelConfig(family="llm2clip", source=source))
    with pytest.raises(ConfigError, match="model.family"):
        load_llm2clip(ModelConfig(family="clip", source="microsoft/LLM2CLIP-Openai-L-14-336"))


def test_tiny_directory_rejects_real_path_overrides(model_cfg):
    with pytest.raises(ConfigError, match="text_model"):
        load_llm2clip(model_cfg, text_model="microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned")


# ---- text embedding store -----------------------------------------------------------------------------------------

def test_store_is_keyed_by_text_hash_not_position(tmp_path):
    texts = ["b", "a", "b", "c "]
    vectors = np.array([[1, 0], [2, 0], [1, 0], [3, 0]], dtype=np.float64)
    path = write_text_embeddings(tmp_path / "s", texts, vectors, meta={"model": "m"})
    store = TextEmbeddingStore(path)
    assert len(store) == 3 and store.dim == 2 and store.vectors.dtype == np.float32
    assert isinstance(store.vectors, np.memmap)
    np.testing.assert_array_equal(store.lookup(["c ", "a", "b", "a"])[:, 0], [3, 2, 1, 2])
    assert "c" not in store and "c " in store  # byte-exact: the trailing space is part of the key
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["count"] == 3 and manifest["dim"] == 2 and manifest["model"] == "m"
    assert manifest["text_sha256"] == [compute_text_sha256(t) for t in ("b", "a", "c ")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging leftovers
    with pytest.raises(ValueError, match="different vectors"):
        write_text_embeddings(tmp_path / "t", ["x", "x"], np.eye(2), meta={})
    with pytest.raises(FileExistsError):
        write_text_embeddings(path, ["z"], np.ones((1, 2)), meta={})
    write_text_embeddings(path, ["z"], np.ones((1, 2)), meta={}, overwrite=True)
    assert TextEmbeddingStore(path).lookup(["z"]).tolist() == [[1.0, 1.0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_store_lookup_error_names_the_text_and_the_store(tmp_path):
    path = write_text_embeddings(tmp_path / "s", ["known"], np.ones((1, 3)), meta={})
    long_text = "A mug to the left of a plate, seen from above on a wooden kitchen table in the morning light"
    with pytest.raises(MissingTextEmbeddingError) as info:
        TextEmbeddingStore(path).lookup(["known", long_text])
    message = str(info.value)
    assert repr(long_text[:60] + "...")[1:-1] in message and str(path) in message
    assert long_text[:61] not in message


def test_store_rejects_corruption(tmp_path):
    path = write_text_embeddings(tmp_path / "s", ["a", "b"], np.ones((2, 3)), meta={})
    (path / "index.json").write_text(json.dumps({compute_text_sha256("a"): 1, compute_text_sha256("b"): 0}))
    with pytest.raises(TextEmbeddingError, match="disagrees"):
        TextEmbeddingStore(path)
    with pytest.raises(TextEmbeddingError, match="not a text embedding store"):
        TextEmbeddingStore(tmp_path / "missing")


def test_store_of_another_encoder_is_refused(model_cfg, bundle, tmp_path):
    wrong_model = write_text_embeddings(tmp_path / "m", ["a"], np.ones((1, bundle.llm_dim)),
                                        meta={**bundle.text_meta, "model": "some-other-llm"})
    with pytest.raises(ConfigError, match="some-other-llm"):
        load_llm2clip(model_cfg, text_embeddings=wrong_model)
    wrong_dim = write_text_embeddings(tmp_path / "d", ["a"], np.ones((1, 7)), meta=bundle.text_meta)
    with pytest.raises(ConfigError, match="dim"):
        load_llm2clip(model_cfg, text_embeddings=wrong_dim)


# ---- scorer -------------------------------------------------------------------------------------------------------

def test_scores_equal_independent_computation(tiny_dir, model_cfg, manifest):
    scorer = llm2clip_scorer(model_cfg)
    batch = one_row_batch(manifest, 1)
    out = scorer(batch)
    assert out["text_index"] == [0, 1, 2, 3] and out["item_id"] == batch["item_id"] * 4
    expected = reference_scores(tiny_dir, batch["image"][0], batch["texts"][0])
    np.testing.assert_allclose(out["score"], expected, rtol=0, atol=1e-5)
    assert np.ptp(out["score"]) > 1e-4  # the options get different scores


def test_online_text_equals_store_text(model_cfg, bundle, manifest, store_dir):
    texts = list(manifest.items[2].texts)
    stored = load_llm2clip(model_cfg, text_embeddings=store_dir)
    assert stored.text_encoder is None  # the LLM is not even loaded
    torch.testing.assert_close(stored.encode_llm(texts), bundle.encode_llm(texts), rtol=0, atol=1e-6)
    online = llm2clip_scorer(model_cfg)
    offline = llm2clip_scorer(model_cfg, text_embeddings=str(store_dir))
    for index in range(3):
        batch = one_row_batch(manifest, index)
        np.testing.assert_allclose(offline(batch)["score"], online(batch)["score"], rtol=0, atol=1e-6)
    batch = one_row_batch(manifest, 0)
    batch["texts"] = [["a text nobody precomputed"]]
    with pytest.raises(ConfigError, match="a text nobody precomputed"):
        offline(batch)


def _by_key(table) -> dict[tuple[str, int, int], float]:
    d = table.to_pydict()
    return {(i, m, t): s for i, m, t, s in zip(d["item_id"], d["image_index"], d["text_index"], d["score"],
                                                 strict=True)}


def test_batch_invariance_and_metrics_accept_the_scores(model_cfg, manifest):
    scorer = llm2clip_scorer(model_cfg, text_batch_size=3)
    one = run_local(manifest, scorer, batch_size=1).scores
    eight = run_local(manifest, scorer, batch_size=8).scores
    assert one.num_rows == eight.num_rows == 4 * len(manifest)
    a, b = _by_key(one), _by_key(eight)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-5
    report = compute_metrics(manifest, eight)
    assert 0.0 <= report.metrics["4way/individual_acc"] <= 1.0


def test_option_errors(model_cfg):
    with pytest.raises(ConfigError, match="scorer.options.text_embedding"):
        llm2clip_scorer(model_cfg, text_embedding="typo")
    with pytest.raises(ConfigError, match="text_embeddings"):
        llm2clip_scorer(model_cfg, text_embeddings="/nonexistent/store")
    with pytest.raises(ConfigError, match="model.family"):
        Llm2ClipScorer(ModelConfig(family="clip", source=model_cfg.source), ScorerConfig(name="llm2clip"))


def test_registry_entries():
    expected = {("scorers", "llm2clip"): "perceive_ray.scoring.llm2clip:Llm2ClipScorer",
                ("models", "llm2clip"): "perceive_ray.models.llm2clip:load_llm2clip",
                ("tiny", "llm2clip"): "perceive_ray.models.llm2clip:save_tiny_llm2clip"}
    for (kind, name), target in expected.items():
        assert registry.target(kind, name) == target
        registry.resolve(kind, name)
