"""Sized model builders (``perceive_ray.models.tiny``): real loaders read them, the tiny models keep their bytes,
and ``llava_15_7b_shapes`` is LLaVA-1.5-7B (checked on the meta device: no memory, no download)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from perceive_ray.config import ModelConfig
from perceive_ray.models.clip import WEIGHTS_FILE, load_clip, save_tiny_clip, tiny_clip_config
from perceive_ray.models.llava import build_tiny_tokenizer, load_llava, save_tiny_llava
from perceive_ray.models.tiny import (
    LLAVA_15_7B_PARAMS,
    build_llava_config,
    build_llava_model,
    count_parameters,
    llava_15_7b_shapes,
    save_clip,
    save_llava,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_llava_15_7b_shapes_on_meta():
    config = build_llava_config(tokenizer=build_tiny_tokenizer(), **llava_15_7b_shapes())
    model = build_llava_model(config, dtype="bfloat16", device="meta")
    assert count_parameters(model) == LLAVA_15_7B_PARAMS
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size, vision.hidden_act) == (1024, 24, 16, 4096, 336, 14, "quick_gelu")
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size, text.max_position_embeddings) == (
        4096, 32, 32, 32, 11008, 32001, 4096)
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features, projector.linear_2.out_features) == (
        1024, 4096, 4096)
    assert config.vision_feature_layer == -2 and config.image_seq_length == 576
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "meta"


def test_save_tiny_clip_matches_the_direct_open_clip_build(tmp_path):
    """The old save_tiny_clip: open_clip.CLIP(**tiny_clip_config()) right after torch.manual_seed(seed)."""
    import open_clip

    path = save_tiny_clip(tmp_path / "clip", seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        expected = open_clip.CLIP(**tiny_clip_config()).state_dict()
    written = load_file(str(path / WEIGHTS_FILE))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_save_tiny_llava_matches_the_direct_transformers_build(tmp_path):
    """The old save_tiny_llava: LlavaForConditionalGeneration(config) right after torch.manual_seed(seed)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    path = save_tiny_llava(tmp_path / "llava", seed=2)
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=4, projection_dim=32, initializer_range=0.2)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                       bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<unk>"),
                       initializer_range=0.2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        expected = LlavaForConditionalGeneration(config).state_dict()
    written = load_llava(ModelConfig(family="llava", source=str(path)), device="cpu").model.state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_sized_clip_loads_through_load_clip(tmp_path):
    path = save_clip(tmp_path / "clip", image_size=48, patch_size=16, width=96, layers=1, heads=3, text_width=64,
                     text_layers=1, text_heads=2, embed_dim=24)
    bundle = load_clip(ModelConfig(family="clip", source=str(path)), device="cpu")
    assert bundle.embed_dim == 24 and tuple(bundle.image_size) == (48, 48)
    with torch.no_grad():
        image = bundle.model.encode_image(torch.zeros(1, 3, 48, 48))
        text = bundle.model.encode_text(bundle.tokenizer(["a mug"]))
    assert image.shape == text.shape == (1, 24)


def test_sized_llava_loads_through_load_llava(tmp_path):
    path = save_llava(tmp_path / "llava", template="phi3_instruct", image_size=28, patch_size=14, vision_width=64,
                      vision_layers=2, vision_heads=2, vision_intermediate=128, text_width=64, text_layers=1,
                      text_heads=4, text_kv_heads=2, text_intermediate=96, vocab_size=1200, max_positions=1024,
                      rms_norm_eps=1e-5, dtype="bfloat16")
    bundle = load_llava(ModelConfig(family="llava", source=str(path), dtype="bfloat16"), device="cpu")
    assert bundle.template == "phi3_instruct" and bundle.num_visual_tokens == 4
    text = bundle.model.config.text_config
    assert (text.vocab_size, text.hidden_size, text.max_position_embeddings, text.rms_norm_eps) == (
        1200, 64, 1024, 1e-5)
    assert bundle.model.dtype == torch.bfloat16
    assert bundle.model.get_input_embeddings().weight.shape == (1200, 64)


def test_save_llava_rejects_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        save_llava(tmp_path / "x", image_size=28, patch_size=14, vision_width=32, vision_layers=1, vision_heads=2,
                   vision_intermediate=64, text_width=32, text_layers=1, text_heads=2, text_intermediate=64,
                   vocab_size=10)
