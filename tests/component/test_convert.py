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

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPModel,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from perceive_ray.config import ConfigError, ModelConfig, ScorerConfig
from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER, TEMPLATES
from perceive_ray.models.convert import ConversionError, convert_llava
from perceive_ray.models.llava import LlavaClsForConditionalGeneration, load_llava
from perceive_ray.scoring.prompts import VQASCORE_QUESTION
from tests.fixtures.original_llava import save_tiny_original_llava

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


def _check_parity(converted: list[torch.Tensor], reference: list[torch.Tensor], vocab: int,
                  pad_rows: int = 0) -> None:
    """Converted logits = original ones, then ``pad_rows`` mean-row columns, then the <image> column."""
    for conv, ref in zip(converted, reference, strict=True):
        image = vocab + pad_rows
        assert conv.shape == (ref.shape[0], image + 1)  # + the <image> column: zero rows, a logit of exactly 0
        assert torch.equal(conv[:, image], torch.zeros_like(conv[:, image]))
        torch.testing.assert_close(conv[:, :vocab], ref[:, :vocab], atol=1e-5, rtol=0)
        for column in range(vocab, image):  # a mean output row: its logit is the mean of the original logits
            torch.testing.assert_close(conv[:, column], ref[:, :vocab].mean(-1), atol=1e-5, rtol=0)
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
    pad = 1 if template == "llama3" else 0  # the tiny llama3 tokenizer has no pad token: <pad> row added (mean)
    sidecar = json.loads((dst / "perceive_ray.json").read_text())
    assert sidecar["template"] == template  # inferred from the LM and its vocabulary
    assert sidecar["select_feature"] == "patch" and sidecar["reference_vocab_size"] == vocab + pad
    assert sidecar["pad_row_id"] == (vocab if pad else None) and sidecar["llama3_pad_row"] == "mean"
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert image_token_id == vocab + pad == sidecar["image_token_id"]

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
    _check_parity(compute_converted_logits(model, chunks, pixels, image_token_id, 16), reference, vocab, pad)

    bundle = load_llava(ModelConfig(family="llava", source=str(dst), dtype="float32"))
    assert (bundle.template, bundle.select_feature, bundle.num_visual_tokens) == (template, "patch", 16)
    assert bundle.image_processor.crop_size == {"height": 32, "width": 32}
    assert bundle.reference_vocab_size == vocab + pad
    _check_parity(compute_converted_logits(bundle.model, chunks, pixels, bundle.image_token_id, 16), reference,
                  vocab, pad)


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


# -- LLaMA-3 <pad> row (llama3_pad_row, PROTOCOLS §3.2 step 4, §7) -----------------------------------------------

def _independent_t2v(src: Path, caption: str, image: np.ndarray, *, pad_row: bool) -> float:
    """VQAScore t2v from the ORIGINAL-layout tensors: the reference's tokenisation (double BOS kept), the plain
    LM + CLIP + projector forward of ``compute_reference_logits``, and a log-softmax over the reference vocabulary:
    the original rows plus, with ``pad_row``, the <pad> row whose output weights are the mean of the original
    rows. Its logit <h, mean_v W_v> = mean_v <h, W_v> is appended as the mean of the original logits."""
    tok = PreTrainedTokenizerFast.from_pretrained(src)
    before, after = _prompt_chunks(tok, "llama3", caption)
    assert before[:2] == [tok.bos_token_id] * 2  # the literal <|begin_of_text|> plus the tokenizer's BOS
    assert tok.convert_ids_to_tokens(after[-2:]) == ["Yes", "<|eot_id|>"]  # the unmasked answer span
    processor = CLIPImageProcessorPil.from_pretrained(src / "vision_tower")
    pixels = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]  # square: no pad
    logits = compute_reference_logits(src, [(before, after)], pixels)[0].double()  # (L, vocab)
    if pad_row:
        logits = torch.cat([logits, logits.mean(-1, keepdim=True)], dim=-1)
    logprobs = logits.log_softmax(-1)
    length = logits.shape[0]  # the answer tokens sit at L-2 and L-1, predicted by rows L-3 and L-2
    yes, eot = after[-2:]
    return float(torch.exp((logprobs[length - 3, yes] + logprobs[length - 2, eot]) / 2))


def test_llama3_pad_row_is_the_mean_row_and_enters_the_vqascore_softmax(tmp_path):
    from perceive_ray.scoring.vqascore import VQAScoreScorer

    src = save_tiny_original_llava(tmp_path / "orig", template="llama3", seed=6)
    assert PreTrainedTokenizerFast.from_pretrained(src).pad_token is None  # as the original LLaMA-3 tokenizer
    vocab = len(PreTrainedTokenizerFast.from_pretrained(src))
    dsts = {mode: convert_llava(src, tmp_path / mode, llama3_pad_row=mode) for mode in ("mean", "none")}
    with pytest.raises(ConversionError, match="llama3_pad_row='zero'"):
        convert_llava(src, tmp_path / "bad", llama3_pad_row="zero")

    original = _original_weights(src)
    model = LlavaForConditionalGeneration.from_pretrained(dsts["mean"])
    converted = {"model.embed_tokens.weight": model.get_input_embeddings().weight.detach(),
                 "lm_head.weight": model.get_output_embeddings().weight.detach()}
    for name, new in converted.items():  # input and output rows
        rows = original[name]
        assert new.shape == (vocab + 2, rows.shape[1])  # + <pad> + <image>
        assert torch.equal(new[:vocab], rows)
        torch.testing.assert_close(new[vocab], rows.mean(dim=0), atol=1e-7, rtol=0)
        assert torch.equal(new[vocab + 1], torch.zeros_like(new[vocab + 1]))
        assert not torch.allclose(new[vocab], torch.zeros_like(new[vocab]))
    tok_mean, tok_none = (AutoTokenizer.from_pretrained(dsts[m]) for m in ("mean", "none"))
    assert (tok_mean.pad_token, tok_mean.pad_token_id) == ("<pad>", vocab) and tok_none.pad_token is None
    sidecars = {m: json.loads((d / "perceive_ray.json").read_text()) for m, d in dsts.items()}
    assert (sidecars["mean"]["reference_vocab_size"], sidecars["mean"]["pad_row_id"]) == (vocab + 1, vocab)
    assert (sidecars["none"]["reference_vocab_size"], sidecars["none"]["pad_row_id"]) == (vocab, None)
    assert sidecars["mean"]["image_token_id"] == vocab + 1 and sidecars["none"]["image_token_id"] == vocab

    image = np.random.default_rng(6).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    captions = ["a mug on a table", "a dog to the left of a chair"]
    batch = {"item_id": ["i"], "image_index": [0], "image": [image], "texts": [captions]}
    scores = {}
    for mode, dst in dsts.items():
        for sharing in ("shared", "none"):
            scorer = VQAScoreScorer(ModelConfig(family="llava", source=str(dst)),
                                    ScorerConfig(name="vqascore", options={"sharing": sharing}))
            record = scorer.describe()
            width = vocab + (1 if mode == "mean" else 0)
            assert scorer.vocab_size == record["vocab_size"] == width
            assert record["llama3_pad_row"] == mode and record["reference_vocab_size"] == width
            out = scorer(batch)["score_t2v"]
            for k, caption in enumerate(captions):
                expected = _independent_t2v(src, caption, image, pad_row=mode == "mean")
                assert abs(out[k] - expected) < 1e-5 and abs(np.log(out[k]) - np.log(expected)) < 1e-5
            scores[mode] = out
    # The <pad> row takes probability mass from every answer token: the two modes really differ.
    assert all(m < n for m, n in zip(scores["mean"], scores["none"], strict=True))
    assert min(np.log(n) - np.log(m) for m, n in zip(scores["mean"], scores["none"], strict=True)) > 1e-3
