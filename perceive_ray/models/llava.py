"""LLaVA-family loader (transformers Llava layout), the LLaVA-cls variant, and tiny offline LLaVA checkpoints.

``load_llava`` loads ``llava-hf/llava-1.5-7b-hf`` or any local directory in the transformers Llava layout (the
LLaVA / LLaVA++ converter writes one) and returns a ``LlavaBundle``. Two facts travel with the weights:

- the conversation template (``chat`` | ``phi3_instruct`` | ``llama3``): read from ``perceive_ray.json`` next to
  the weights, else from the known-id table below;
- the vision feature: ``mm_vision_select_feature`` in ``config.json`` (``patch``, the default: layer -2 patches,
  CLS dropped, V = N patches; ``cls``: layer -2 position 0 only, pre-final-LN, V = 1; PROTOCOLS §5.7). transformers'
  ``LlavaConfig`` only accepts the ``default``/``full`` strategies, so ``cls`` is a separate key handled by
  ``LlavaClsForConditionalGeneration``, which keeps every weight name of the stock class.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.modeling_llava import LlavaModel, LlavaPreTrainedModel

from perceive_ray.config import ConfigError, ModelConfig
from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER, SYS, TEMPLATES

# The tiny tokenizers are trained on the VQAScore question so its words are single tokens, as in a real vocabulary.
# A copy, because models never import scoring; tests/unit/test_prompts.py checks it equals the scorer's question.
TINY_CORPUS_QUESTION = 'Does this figure show "{}"? Please answer yes or no.'

SIDECAR = "perceive_ray.json"  # {"template": ...} written next to converted / tiny weights
SELECT_FEATURE_KEY = "mm_vision_select_feature"  # the original LLaVA config key (PROTOCOLS §5.7)
SELECT_FEATURES = ("patch", "cls")

# Sidecar facts of hub ids that have no sidecar. LLaVA++ and the LoRA retrains are original-format and go through
# the converter, which writes the sidecar. ``reference_vocab_size``: the softmax width of the original model
# (liuhaotian/llava-v1.5-7b has 32000 rows; the llava-hf port pads to 32064 and adds <image>, <pad>).
KNOWN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "llava-hf/llava-1.5-7b-hf": {"template": "chat", "reference_vocab_size": 32000},
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LlavaClsModel(LlavaModel):
    """LlavaModel whose image features are the layer ``vision_feature_layer`` CLS token only: (B, 1, D_text)."""

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None,
                           vision_feature_select_strategy: str | None = None, **kwargs: Any):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"LLaVA-cls needs one vision feature layer, got {layer!r}")
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        # CLIP's hidden_states are pre-post_layernorm, so [layer][:, :1] is the CLS before the final LN.
        cls = outputs.hidden_states[layer][:, :1]  # (B, 1, D_vision)
        features = self.multi_modal_projector(cls)  # (B, 1, D_text)
        outputs.pooler_output = list(features)  # per image (1, D_text), as LlavaModel.forward expects
        return outputs


class LlavaClsForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration with ``LlavaClsModel`` inside; same module tree, same weight names."""

    def __init__(self, config: LlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)  # skip the parent's LlavaModel: build the cls one instead
        self.model = LlavaClsModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


@dataclass
class LlavaBundle:
    """A loaded LLaVA: eval-mode model, CLIP image processor, tokenizer and the facts the scorers need."""

    model: LlavaForConditionalGeneration
    image_processor: Any
    tokenizer: Any
    template: str
    select_feature: str  # "patch" | "cls"
    image_token_id: int
    num_visual_tokens: int  # V: positions one <image> placeholder expands to
    source: str
    reference_vocab_size: int | None = None  # softmax width of the original model, when rows were added after it
    llama3_pad_row: str | None = None  # the converter's switch (mean | none), when the converter wrote the sidecar
    pad_row_id: int | None = None  # the converter's mean-initialised <pad> row (inside reference_vocab_size)


def compute_num_visual_tokens(config: LlavaConfig) -> int:
    """V for a Llava config: 1 for cls; N patches (+1 with the ``full`` strategy) for patch."""
    if select_feature_of(config) == "cls":
        return 1
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def select_feature_of(config: Any) -> str:
    value = getattr(config, SELECT_FEATURE_KEY, None) or "patch"
    if value not in SELECT_FEATURES:
        raise ConfigError(f"{SELECT_FEATURE_KEY}={value!r} is not supported; use one of {SELECT_FEATURES}")
    return value


def read_sidecar(source: str) -> dict[str, Any]:
    """``<source>/perceive_ray.json`` (written by the converter and the tiny builder), else the known-id table."""
    sidecar = Path(source) / SIDECAR
    if sidecar.is_file():
        return json.loads(sidecar.read_text(encoding="utf-8"))
    return dict(KNOWN_CHECKPOINTS.get(source, {}))


def resolve_template(source: str) -> str:
    """Template name from ``<source>/perceive_ray.json`` or the known-id table."""
    name = read_sidecar(source).get("template")
    if name is None:
        raise ConfigError(f"model source {source!r}: no conversation template known; write {SIDECAR} with "
                          f'{{"template": ...}} next to the weights (one of {", ".join(TEMPLATES)})')
    if name not in TEMPLATES:
        raise ConfigError(f"model source {source!r}: unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return name


def load_llava(model: ModelConfig, *, device: str | torch.device | None = None,
               template: str | None = None) -> LlavaBundle:
    """Load a transformers-layout LLaVA (hub id or local dir) in eval mode, with its tokenizer and processor.

    ``template`` overrides the checkpoint's own conversation template (sidecar or known-id table).
    """
    if model.dtype not in _DTYPES:
        raise ConfigError(f"model.dtype {model.dtype!r} is not supported for LLaVA")
    common = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    config = AutoConfig.from_pretrained(model.source, **common)
    if not isinstance(config, LlavaConfig):
        raise ConfigError(f"model source {model.source!r} is a {type(config).__name__}, not a Llava checkpoint "
                          "(original LLaVA / LLaVA++ layouts need `perceive-ray convert llava` first)")
    select_feature = select_feature_of(config)
    if select_feature == "patch" and config.vision_feature_select_strategy != "default":
        raise ConfigError(f"{model.source}: patch features need vision_feature_select_strategy='default' "
                          f"(CLS dropped), got {config.vision_feature_select_strategy!r}")
    if template is not None and template not in TEMPLATES:
        raise ConfigError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    template = template or resolve_template(model.source)
    kind = LlavaClsForConditionalGeneration if select_feature == "cls" else LlavaForConditionalGeneration
    device_map = str(device) if device is not None and torch.device(device).type == "cuda" else None
    net = kind.from_pretrained(model.source, config=config, dtype=_DTYPES[model.dtype], device_map=device_map,
                               use_safetensors=True, **common)
    if device is not None and device_map is None:
        net = net.to(device)
    net.eval()
    tokenizer = AutoTokenizer.from_pretrained(model.source, **common)
    # The reference used the PIL (slow) CLIPImageProcessor; the torchvision backend resizes slightly differently.
    image_processor = AutoImageProcessor.from_pretrained(model.source, backend="pil", **common)
    image_token_id = int(config.image_token_id)
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) != image_token_id:
        raise ConfigError(f"{model.source}: tokenizer id of {IMAGE_PLACEHOLDER} "
                          f"({tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)}) != config image_token_id "
                          f"({image_token_id})")
    sidecar = read_sidecar(model.source)
    return LlavaBundle(model=net, image_processor=image_processor, tokenizer=tokenizer, template=template,
                       select_feature=select_feature, image_token_id=image_token_id,
                       num_visual_tokens=compute_num_visual_tokens(config), source=model.source,
                       reference_vocab_size=sidecar.get("reference_vocab_size"),
                       llama3_pad_row=sidecar.get("llama3_pad_row"), pad_row_id=sidecar.get("pad_row_id"))


# ---------------------------------------------------------------------------------------------------------------
# Tiny offline checkpoints (random init) written in the same layout load_llava reads.

# 32 px / patch 4 -> V = 64 visual tokens: fast. image_size=48, patch_size=2 gives the real model's V = 576, so
# that the shared prefix dominates the token count as it does for LLaVA-1.5 (PROTOCOLS §4 token arithmetic).
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 4
TINY_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER,
    "<|system|>", "<|end|>", "<|user|>", "<|assistant|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)
_TINY_WORDS = (
    "red blue green yellow purple orange cyan pink black white mug plate bottle chair table dog cat circle "
    "square triangle diamond star cube sphere cylinder butterfly elephant person picture photo of on under "
    "left right front behind above below top bottom in to the a an with wings open closed standing sitting"
).split()
_TINY_RELATIONS = ("on", "under", "to the left of", "to the right of", "in front of", "behind")


def _tiny_corpus() -> list[str]:
    """Template text + What'sUp-like captions, so common words become single tokens as in a real vocabulary."""
    captions = [f"A {a} {b} {rel} a {c}" for a, b, c in zip(_TINY_WORDS, _TINY_WORDS[8:], _TINY_WORDS[16:],
                                                            strict=False) for rel in _TINY_RELATIONS]
    captions += [f"a photo of {w}" for w in _TINY_WORDS]
    lines = []
    for caption in captions:
        question = TINY_CORPUS_QUESTION.replace("{}", caption)
        for template in TEMPLATES.values():
            for answer in ("Yes", "No"):
                text = template.render_question_part(question) + template.render_answer_part(answer)
                lines.append(text.replace(IMAGE_PLACEHOLDER, ""))
    lines += [SYS] * 4 + [" ".join(_TINY_WORDS)] * 4
    return lines


def build_tiny_tokenizer(*, bos: str = "<s>", pad: str = "<unk>", vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A LLaMA-like (Metaspace, no byte merges across newlines) BPE tokenizer trained in-process, deterministic.

    Like SentencePiece LLaMA, every chunk starts with "▁" and a trailing space stays a lone "▁" token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.add_special_tokens(list(TINY_SPECIAL_TOKENS))  # so training never splits them into characters
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [c for c in string.printable if c not in "\x0b\x0c\r"] + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    extra = [t for t in TINY_SPECIAL_TOKENS if t not in ("<unk>", bos, "</s>", pad)]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>",
                                   pad_token=pad, additional_special_tokens=extra)


# The tests' tiny LLaVA: 3-layer CLIP tower (hidden 32, MLP 64, 2 heads), 2-layer LLaMA (hidden 32, MLP 64, 4 heads,
# 2 KV heads). A larger init range than the default 0.02 makes the random model position- and content-sensitive, so
# equivalence tests would notice a wrong position id or a leaked pad.
TINY_LLAVA_SIZES = {"vision_width": 32, "vision_layers": 3, "vision_heads": 2, "vision_intermediate": 64,
                    "projection_dim": 32, "text_width": 32, "text_layers": 2, "text_heads": 4, "text_kv_heads": 2,
                    "text_intermediate": 64, "max_positions": 2048, "initializer_range": 0.2}


def save_tiny_llava(path: str | Path, *, template: str = "chat", select_feature: str = "patch", seed: int = 0,
                    image_size: int = TINY_IMAGE_SIZE, patch_size: int = TINY_PATCH_SIZE) -> Path:
    """Write a random-init tiny LLaVA (3-layer CLIP, 2-layer LLaMA, hidden 32) + tokenizer + CLIP processor.

    The llama3 variant uses ``<|begin_of_text|>`` as BOS and ``<pad>`` as pad, so the double BOS of the real
    LLaMA-3 template is reproduced; the others use ``<s>`` and pad with ``<unk>`` (PROTOCOLS §3.2).
    """
    from perceive_ray.models.tiny import save_llava

    return save_llava(path, seed=seed, template=template, select_feature=select_feature, image_size=image_size,
                      patch_size=patch_size, **TINY_LLAVA_SIZES)


def save_tiny_llava_phi3(path: str | Path, *, seed: int = 0) -> Path:
    """Tiny LLaVA with the ``phi3_instruct`` template (stands in for a converted LLaVA-Phi-3-mini)."""
    return save_tiny_llava(path, template="phi3_instruct", seed=seed)


def save_tiny_llava_llama3(path: str | Path, *, seed: int = 0) -> Path:
    """Tiny LLaVA with the ``llama3`` template (stands in for a converted LLaVA-Meta-Llama-3-8B)."""
    return save_tiny_llava(path, template="llama3", seed=seed)


def save_tiny_llava_cls(path: str | Path, *, seed: int = 0) -> Path:
    """Tiny LLaVA-cls: one visual token, the penultimate-layer CLS (stands in for the LoRA cls release)."""
    return save_tiny_llava(path, select_feature="cls", seed=seed)


def save_tiny_llava_parts(path: str | Path, *, seed: int = 0) -> Path:
    """The tiny LLaVA's two halves, as LLaVA-1.5's stage 1 starts: ``path/llm`` (a LLaMA causal LM + tokenizer, the
    Vicuna stand-in) and ``path/vision`` (a CLIP vision model + CLIP image processor, the ViT-L/14-336 stand-in).
    ``train.llava.vision_tower: <path>/vision`` with ``model.source: <path>/llm`` assembles them."""
    import tempfile

    from transformers import CLIPImageProcessorPil, CLIPVisionModel, LlamaForCausalLM

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        whole = save_tiny_llava(Path(tmp) / "llava", seed=seed)
        net = LlavaForConditionalGeneration.from_pretrained(whole, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(whole)
    llm = LlamaForCausalLM(net.config.text_config)
    llm.model.load_state_dict(net.model.language_model.state_dict())
    llm.lm_head.load_state_dict(net.lm_head.state_dict())
    llm.save_pretrained(path / "llm")
    tokenizer.save_pretrained(path / "llm")
    vision = CLIPVisionModel(net.config.vision_config)
    vision.load_state_dict(net.model.vision_tower.state_dict())
    vision.save_pretrained(path / "vision")
    size = net.config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        path / "vision")
    return path


def save_tiny_llm(path: str | Path, *, seed: int = 0, width: int = 64, layers: int = 2, heads: int = 4,
                  intermediate: int = 128, max_positions: int = 512) -> Path:
    """A random-init LLaMA causal LM + the offline tiny tokenizer (``<image>`` included): the LLM a LLaVA is assembled
    from (``model.source``) when ``train.llava.vision_tower`` is set. Same seed and sizes, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tokenizer),
                         max_position_embeddings=max_positions, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"),
                         pad_token_id=ids(tokenizer.pad_token), tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
