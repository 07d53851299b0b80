"""`perceive-ray convert llava`: tiny original-layout LLaVA / LLaVA++ checkpoints -> transformers Llava, logit parity.

The reference side never touches the converter: it rebuilds the LM (Llama / Phi-3) and the CLIP tower from the
original-layout files, runs vision -> hidden_states[-2] -> patch / CLS selection -> Linear-GELU-Linear with the
original projector tensors, splices the result into the LM's inputs_embeds at the <image> position, and compares
logits with the converted model loaded by transformers and by ``load_llava``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPModel,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from perceive_ray.config import ConfigError, ModelConfig
from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER, TEMPLATES
from perceive_ray.models.convert import ConversionError, convert_llava, save_tiny_original_llava
from perceive_ray.models.llava import LlavaClsForConditionalGeneration, load_llava
from perceive_ray.scoring.prompts import VQASCORE_QUESTION

torch.set_num_threads(2)

# The LM fields of an original config.json, listed here so the reference LM does not reuse converter logic.
LM_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "vocab_size", "bos_token_id",
             "eos_token_id", "pad_token_id", "tie_word_embeddings", "sliding_window",
             "original_max_position_embeddings")
CAPTIONS = ("a mug on a table", "a dog to the left of a chair")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _original_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        return load_file(src / "model.safetensors")
    weights = {}
    for shard in sorted(src.glob("pytorch_model-*.bin")):
        weights.update(torch.load(shard, map_location="cpu", weights_only=True))
    return weights


def _prompt_chunks(tokenizer, template: str, caption: str) -> tuple[list[int], list[int]]:
    """LLaVA's tokenizer_image_token: tokenise around <image>, dropping the later chunk's BOS."""
    conv = TEMPLATES[template]
    prompt = conv.render_question_part(VQASCORE_QUESTION.replace("{}", caption)) + conv.render_answer_part("Yes")
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    return tokenizer(before).input_ids, tokenizer(after).input_ids[1:]


def compute_reference_logits(src: Path, chunks: list[tuple[list[int], list[int]]], pixel_values: torch.Tensor,
                             *, tower: str = "dir") -> torch.Tensor:
    """(B, L, vocab_orig) logits from the original-layout tensors; ``tower='embedded'`` uses the in-checkpoint one."""
    raw = json.loads((src / "config.json").read_text())
    text_type = "phi3" if raw["model_type"] == "llava_phi" else "llama"
    lm = AutoModelForCausalLM.from_config(CONFIG_MAPPING[text_type](**{k: raw[k] for k in LM_FIELDS if k in raw}))
    weights = _original_weights(src)
    lm.load_state_dict({k: v for k, v in weights.items() if k.startswith(("model.layers", "model.embed_tokens",
                                                                          "model.norm", "lm_head"))
                        and not k.endswith("inv_freq")}, strict=True)
    vision = CLIPModel.from_pretrained(src / "vision_tower").vision_model  # the tower dir is a full CLIPModel
    if tower == "embedded":
        prefix = "model.vision_tower.vision_tower.vision_model."
        vision.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)},
                               strict=False)
    lm.eval(), vision.eval()
    with torch.no_grad():
        layer = vision(pixel_values, output_hidden_states=True).hidden_states[raw["mm_vision_select_layer"]]
        feats = layer[:, :1] if raw["mm_vision_select_feature"] == "cls" else layer[:, 1:]  # (B, V, D_vision)
        w = {i: (weights[f"model.mm_projector.{i}.weight"], weights[f"model.mm_projector.{i}.bias"]) for i in (0, 2)}
        visual = F.linear(F.gelu(F.linear(feats, *w[0])), *w[2])  # (B, V, D_text)
        embed = lm.get_input_embeddings()
        rows = [torch.cat([embed(torch.tensor(a)), visual[b], embed(torch.tensor(z))]) for b, (a, z) in
                enumerate(chunks)]  # per image (L_b, D_text): prompts differ in length, so no padding is involved
        return [lm(inputs_embeds=row[None]).logits[0] for row in rows]  # per image (L_b, vocab of the original)


def compute_converted_logits(model, chunks, pixel_values: torch.Tensor, image_token_id: int,
                             num_visual: int) -> list[torch.Tensor]:
    """Per image (L_b, vocab) logits of a converted model: <image> repeated V times at the placeholder."""
    out = []
    with torch.no_grad():
        for b, (a, z) in enumerate(chunks):
            ids = torch.tensor([a + [image_token_id] * num_visual + z])
            out.append(model.eval()(input_ids=ids, pixel_values=pixel_values[b:b + 1]).logits[0])
    return out


def _pixels(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _check_parity(converted: list[torch.Tensor], reference: list[torch.Tensor], vocab: int) -> None:
    for conv, ref in zip(converted, reference, strict=True):
        assert conv.shape == (ref.shape[0], vocab + 1)  # + the <image> column: zero rows, a logit of exactly 0
        assert torch.equal(conv[:, vocab], torch.zeros_like(conv[:, vocab]))
        torch.testing.assert_close(conv[:, :vocab], ref[:, :vocab], atol=1e-5, rtol=0)
        assert ref[:, :vocab].abs().max() > 1.0  # not a degenerate all-near-zero model
    assert (reference[0][-3:] - reference[1][-3:]).abs().max() > 1e-2  # the image (and caption) matter


@pytest.mark.parametrize(("template", "weights_format"),
                         [("chat", "bin"), ("phi3_instruct", "safetensors"), ("llama3", "safetensors")])
def test_convert_matches_original_logits(tmp_path, template, weights_format):
    src = save_tiny_original_llava(tmp_path / "orig", template=template, seed=3, weights_format=weights_format)
    dst = convert_llava(src, tmp_path / "converted")

    original_tok = PreTrainedTokenizerFast.from_pretrained(src)  # the class: AutoTokenizer would parse config.json
    tokenizer = AutoTokenizer.from_pretrained(dst)
    vocab = len(original_tok)
    sidecar = json.loads((dst / "perceive_ray.json").read_text())
    assert sidecar["template"] == template  # inferred from the LM and its vocabulary
    assert sidecar["select_feature"] == "patch" and sidecar["reference_vocab_size"] == vocab
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert image_token_id == vocab == sidecar["image_token_id"]

    chunks = [_prompt_chunks(original_tok, template, c) for c in CAPTIONS]
    assert chunks == [_prompt_chunks(tokenizer, template, c) for c in CAPTIONS]  # same text ids after conversion
    pixels = _pixels()
    reference = compute_reference_logits(src, chunks, pixels)

    model, info = LlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not any(info.values())  # nothing missing, unexpected or mismatched
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.image_token_id == image_token_id and cfg.text_config.model_type == (
        "phi3" if template == "phi3_instruct" else "llama")
    _check_parity(compute_converted_logits(model, chunks, pixels, image_token_id, 16), reference, vocab)

    bundle = load_llava(ModelConfig(family="llava", source=str(dst), dtype="float32"))
    assert (bundle.template, bundle.select_feature, bundle.num_visual_tokens) == (template, "patch", 16)
    assert bundle.image_processor.crop_size == {"height": 32, "width": 32}
    _check_parity(compute_converted_logits(bundle.model, chunks, pixels, bundle.image_token_id, 16), reference,
                  vocab)


def test_convert_cls_variant_has_one_visual_token(tmp_path):
    src = save_tiny_original_llava(tmp_path / "orig", template="chat", select_feature="cls", seed=5)
    dst = convert_llava(src, tmp_path / "converted", template="chat")
    config = json.loads((dst / "config.json").read_text())
    assert config["mm_vision_select_feature"] == "cls" and config["image_seq_length"] == 1
    assert json.loads((dst / "perceive_ray.json").read_text())["select_feature"] == "cls"

    tokenizer = AutoTokenizer.from_pretrained(dst)
    chunks = [_prompt_chunks(tokenizer, "chat", c) for c in CAPTIONS]
    pixels = _pixels(seed=1)
    reference = compute_reference_logits(src, chunks, pixels)
    vocab = json.loads((dst / "perceive_ray.json").read_text())["reference_vocab_size"]

    bundle = load_llava(ModelConfig(family="llava", source=str(dst)))
    assert isinstance(bundle.model, LlavaClsForConditionalGeneration)
    assert (bundle.select_feature, bundle.num_visual_tokens) == ("cls", 1)
    _check_parity(compute_converted_logits(bundle.model, chunks, pixels, bundle.image_token_id, 1), reference,
                  vocab)
    # The stock class would feed 16 patch tokens: one placeholder cannot take them, so cls must be honoured.
    stock = LlavaForConditionalGeneration.from_pretrained(dst)
    with pytest.raises(ValueError, match="do not match"):
        compute_converted_logits(stock, chunks, pixels, bundle.image_token_id, 1)


@pytest.mark.parametrize("unfreeze", [False, True])
def test_embedded_vision_tower_used_only_when_unfrozen(tmp_path, unfreeze):
    src = save_tiny_original_llava(tmp_path / "orig", seed=2, embedded_tower_seed=11,
                                   unfreeze_vision_tower=unfreeze)
    dst = convert_llava(src, tmp_path / "converted")
    tokenizer = AutoTokenizer.from_pretrained(dst)
    chunks = [_prompt_chunks(tokenizer, "chat", c) for c in CAPTIONS]
    pixels = _pixels(seed=2)
    reference = compute_reference_logits(src, chunks, pixels, tower="embedded" if unfreeze else "dir")
    other = compute_reference_logits(src, chunks, pixels, tower="dir" if unfreeze else "embedded")
    model = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    converted = compute_converted_logits(model, chunks, pixels, model.config.image_token_id, 16)
    _check_parity(converted, reference, len(tokenizer) - 1)
    assert (converted[0][:, :-1] - other[0]).abs().max() > 1e-3  # the two towers really differ


def test_vision_tower_dir_overrides_config(tmp_path):
    src = save_tiny_original_llava(tmp_path / "orig", seed=4)
    moved = tmp_path / "elsewhere"
    shutil.move(src / "vision_tower", moved)
    with pytest.raises(ConversionError, match="vision_tower_dir"):  # the config's path is gone; hub is offline
        convert_llava(src, tmp_path / "a")
    dst = convert_llava(src, tmp_path / "b", vision_tower_dir=moved, dtype="bfloat16")
    model = LlavaForConditionalGeneration.from_pretrained(dst)
    assert model.dtype == torch.bfloat16 and json.loads((dst / "perceive_ray.json").read_text())["template"] == "chat"


@pytest.fixture(scope="module")
def tiny_original(tmp_path_factory) -> Path:
    return save_tiny_original_llava(tmp_path_factory.mktemp("orig") / "orig", seed=1)


def _copy(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "orig"
    shutil.copytree(src, out)
    return out


def _edit_config(src: Path, **changes) -> None:
    raw = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (src / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"mm_projector_type": "linear"}, r"config\.json: mm_projector_type='linear' is not supported"),
    ({"mm_projector_type": "qformer"}, r"config\.json: mm_projector_type='qformer'"),
    ({"mm_projector_type": None}, r"config\.json: missing key 'mm_projector_type'"),
    ({"mm_vision_select_layer": None}, r"config\.json: missing key 'mm_vision_select_layer'"),
    ({"mm_vision_select_feature": "cls_patch"}, r"config\.json: mm_vision_select_feature='cls_patch'"),
    ({"mm_hidden_size": 1024}, r"config\.json: mm_hidden_size=1024 but the vision tower"),
    ({"mm_vision_tower": None}, r"config\.json: missing key 'mm_vision_tower'"),
    ({"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen"}, r"not a known LLaVA LM"),
])
def test_malformed_config_errors_name_file_and_key(tiny_original, tmp_path, changes, pattern):
    src = _copy(tiny_original, tmp_path)
    _edit_config(src, **changes)
    with pytest.raises(ConversionError, match=pattern) as err:
        convert_llava(src, tmp_path / "out")
    assert isinstance(err.value, ConfigError)  # the CLI reports ConfigError as bad input, not a crash
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("dropped", ["model.mm_projector.2.bias", "model.mm_projector.0.weight"])
def test_missing_projector_weight_names_file_and_key(tiny_original, tmp_path, dropped):
    src = _copy(tiny_original, tmp_path)
    weights = load_file(src / "model.safetensors")
    del weights[dropped]
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=rf"model\.safetensors: missing weight '{dropped}'"):
        convert_llava(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_or_unexpected_weights(tiny_original, tmp_path):
    src = _copy(tiny_original, tmp_path)
    weights = load_file(src / "model.safetensors")
    save_file({**weights, "model.vision_resampler.x": torch.zeros(1)}, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected \['model\.vision_resampler\.x'\]"):
        convert_llava(src, tmp_path / "out")
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        convert_llava(src, tmp_path / "out")
    (src / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"no weights found"):
        convert_llava(src, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"config\.json: not found"):
        convert_llava(tmp_path / "nowhere", tmp_path / "out")


def test_refuses_non_empty_output_and_unknown_template(tiny_original, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert_llava(tiny_original, tmp_path / "out")
    with pytest.raises(ConversionError, match="unknown template 'vicuna'"):
        convert_llava(tiny_original, tmp_path / "out2", template="vicuna")
    assert convert_llava(tiny_original, tmp_path / "empty_ok") == tmp_path / "empty_ok"
