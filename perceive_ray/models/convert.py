"""Convert original LLaVA / LLaVA++ checkpoints (haotian-liu/LLaVA layout) into the transformers Llava layout.

The paper's Phi-3-V (``MBZUAI/LLaVA-Phi-3-mini-4k-instruct``), LLaMA-3-V (``MBZUAI/LLaVA-Meta-Llama-3-8B-
Instruct``), ``liuhaotian/llava-v1.5-7b`` and the LoRA-merged patch/cls retrains are a causal-LM checkpoint with
``mm_*`` config keys: LM weights ``model.*`` + ``lm_head.weight``, projector ``model.mm_projector.{0,2}.*`` and
usually no vision tower (it is loaded from ``mm_vision_tower``, e.g. ``openai/clip-vit-large-patch14-336``).
``convert_llava`` maps them 1:1 onto ``LlavaForConditionalGeneration`` (PROTOCOLS §3.2 "Conversion", §8 item 7):

- LM: the Llama / Phi-3 / Mistral text config from the original config (``mm_*`` and training keys dropped);
- projector: ``mlp2x_gelu`` = Linear -> GELU(erf) -> Linear = ``multi_modal_projector.linear_1/act/linear_2``;
- vision: CLIP from ``vision_tower_dir`` or ``mm_vision_tower`` (a local dir or an HF id). Like the reference's
  ``CLIPVisionTower(delay_load=True)``, vision weights stored in the checkpoint are used only when the config says
  ``unfreeze_mm_vision_tower``; otherwise the tower comes from its own checkpoint;
- feature: ``vision_feature_layer = mm_vision_select_layer`` (-2) with the CLS-dropping ``default`` strategy;
  ``mm_vision_select_feature`` (``patch`` | ``cls``) is kept in config.json, where ``perceive_ray.models.llava``
  reads it to build ``LlavaClsForConditionalGeneration`` for the one-token cls models (PROTOCOLS §5.7);
- vocabulary: like the reference loader (``resize_token_embeddings(len(tokenizer))``) the embedding rows are cut to
  the tokenizer's length (Phi-3 stores 32064 rows for 32011 tokens), then an ``<image>`` token is appended with
  zero input/output rows. Its logit is therefore exactly 0; ``perceive_ray.json`` records ``reference_vocab_size``
  (the softmax width of the original loader) so a scorer can drop the added column.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import AddedToken
from transformers import CONFIG_MAPPING, AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig

from perceive_ray.config import ConfigError
from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER, TEMPLATES
from perceive_ray.models.llava import (
    SELECT_FEATURE_KEY,
    SELECT_FEATURES,
    SIDECAR,
    LlavaClsForConditionalGeneration,
    LlavaForConditionalGeneration,
)

CONFIG_FILE = "config.json"
SUPPORTED_PROJECTOR = "mlp2x_gelu"
PROJECTOR_PREFIX = "model.mm_projector."
EMBEDDED_TOWER_PREFIX = "model.vision_tower.vision_tower."  # original CLIPVisionTower wraps CLIPVisionModel
_WEIGHT_LAYOUTS = (  # (index file, single file), in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# Original LM class -> transformers text model_type. LLaVA++ names its Phi-3 model type "llava_phi".
_TEXT_TYPE_BY_ARCH = {
    "LlavaLlamaForCausalLM": "llama", "LlavaLlama3ForCausalLM": "llama", "LlavaPhiForCausalLM": "phi3",
    "LlavaPhi3ForCausalLM": "phi3", "LlavaMistralForCausalLM": "mistral",
}
_TEXT_TYPE_BY_MODEL_TYPE = {"llava": "llama", "llava_llama": "llama", "llava_phi": "phi3", "llava_mistral": "mistral"}
# Keys of the original config that belong to LLaVA's wrapper or trainer, not to the text model.
_WRAPPER_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map",
    "vocab_size", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
    "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
    "unfreeze_mm_vision_tower", "tune_mm_vision_resampler", "freeze_mm_vision_resampler", "max_length",
}


class ConversionError(ConfigError):
    """The original checkpoint cannot be converted; the message names the file and the key."""


@dataclass(frozen=True)
class OriginalLlava:
    """What the converter needs from an original-layout config.json, validated."""

    config_path: Path
    text_type: str  # transformers model_type of the LM: llama | phi3 | mistral
    text_kwargs: dict[str, Any]
    vocab_size: int
    mm_hidden_size: int
    select_layer: int
    select_feature: str  # patch | cls
    vision_tower: str | None
    unfreeze_vision_tower: bool


def load_original_config(src: str | Path) -> OriginalLlava:
    """Read and validate ``<src>/config.json`` of an original LLaVA / LLaVA++ checkpoint."""
    path = Path(src) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: not found (expected an original LLaVA checkpoint directory)")
    raw = json.loads(path.read_text(encoding="utf-8"))

    def need(key: str) -> Any:
        if key not in raw or raw[key] is None:
            raise ConversionError(f"{path}: missing key {key!r} (not an original LLaVA / LLaVA++ config?)")
        return raw[key]

    archs = raw.get("architectures") or []
    text_type = next((_TEXT_TYPE_BY_ARCH[a] for a in archs if a in _TEXT_TYPE_BY_ARCH), None)
    text_type = text_type or _TEXT_TYPE_BY_MODEL_TYPE.get(raw.get("model_type", ""))
    if text_type is None:
        raise ConversionError(f"{path}: architectures={archs!r} / model_type={raw.get('model_type')!r} is not a "
                              f"known LLaVA LM (known: {sorted(_TEXT_TYPE_BY_ARCH)})")
    projector = need("mm_projector_type")
    if projector != SUPPORTED_PROJECTOR:
        raise ConversionError(f"{path}: mm_projector_type={projector!r} is not supported; only "
                              f"{SUPPORTED_PROJECTOR!r} maps onto transformers' LlavaMultiModalProjector")
    feature = raw.get(SELECT_FEATURE_KEY, "patch")  # the original CLIPVisionTower's default
    if feature not in SELECT_FEATURES:
        raise ConversionError(f"{path}: {SELECT_FEATURE_KEY}={feature!r} is not supported; use one of "
                              f"{SELECT_FEATURES}")
    layer = need("mm_vision_select_layer")
    if not isinstance(layer, int):
        raise ConversionError(f"{path}: mm_vision_select_layer={layer!r} must be one integer layer")
    text_kwargs = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in _WRAPPER_KEYS
                   and not (k == "rope_scaling" and v is None)}  # a null legacy key only triggers a warning
    return OriginalLlava(config_path=path, text_type=text_type, text_kwargs=text_kwargs,
                         vocab_size=int(need("vocab_size")), mm_hidden_size=int(need("mm_hidden_size")),
                         select_layer=layer, select_feature=feature, vision_tower=raw.get("mm_vision_tower"),
                         unfreeze_vision_tower=bool(raw.get("unfreeze_mm_vision_tower", False)))


def _weight_files(root: Path) -> tuple[Path, list[Path]]:
    """(the file to name in errors, the weight files) of a checkpoint directory."""
    for index_name, single_name in _WEIGHT_LAYOUTS:
        index = root / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise ConversionError(f"{index}: shard(s) {missing} listed in weight_map are missing")
            return index, [root / s for s in shards]
        if (root / single_name).is_file():
            return root / single_name, [root / single_name]
    wanted = ", ".join(name for pair in _WEIGHT_LAYOUTS for name in pair)
    raise ConversionError(f"{root}: no weights found (looked for {wanted})")


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                yield key, handle.get_tensor(key)
    else:  # never unpickle arbitrary objects
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def load_checkpoint_tensors(root: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """All tensors of a safetensors / ``weights_only`` torch checkpoint dir; returns (origin file, tensors)."""
    origin, files = _weight_files(Path(root))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_iter_tensors(file))
    return origin, tensors


def resolve_vision_tower_dir(ref: str | Path) -> Path:
    """A local CLIP directory as is; an HF id through the hub cache (downloads unless HF_HUB_OFFLINE is set)."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(str(ref), allow_patterns=[CONFIG_FILE, "preprocessor_config.json",
                                                                 "model*.safetensors*"]))
        if not any(root.glob("model*.safetensors")):  # e.g. an older repo with only pytorch_model.bin
            root = Path(snapshot_download(str(ref), allow_patterns=["pytorch_model*.bin*"]))
        return root
    except Exception as exc:  # offline, unknown id, no access: say which tower and how to supply it
        raise ConversionError(f"vision tower {str(ref)!r} is neither a local directory nor downloadable ({exc}); "
                              "pass vision_tower_dir=") from exc


def load_vision_tower(tower_dir: Path) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """CLIP vision config + weights (keys relative to ``CLIPVisionModel``) from a CLIPModel or CLIPVisionModel dir."""
    config_path = tower_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: not found (vision tower directory)")
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    vision_raw = raw.get("vision_config", raw) if raw.get("model_type") == "clip" else raw
    if vision_raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConversionError(f"{config_path}: model_type={raw.get('model_type')!r} is not a CLIP vision tower")
    vision_config = CLIPVisionConfig(**{k: v for k, v in vision_raw.items() if k not in _WRAPPER_KEYS})
    _, tensors = load_checkpoint_tensors(tower_dir)
    weights = {}
    for key, value in tensors.items():
        key = key.removeprefix("vision_model.")
        if key.split(".")[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm") \
                and not key.endswith("position_ids"):  # position_ids is a buffer in old checkpoints
            weights[key] = value
    return vision_config, weights


def build_image_processor(tower_dir: Path, image_size: int) -> CLIPImageProcessorPil:
    """The tower's own CLIPImageProcessor if it ships one, else OpenAI-CLIP defaults at ``image_size``."""
    if (tower_dir / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessorPil.from_pretrained(tower_dir)
        crop = processor.crop_size
        if (crop["height"], crop["width"]) != (image_size, image_size):
            raise ConversionError(f"{tower_dir / 'preprocessor_config.json'}: crop_size {crop} != the vision "
                                  f"tower's image_size {image_size}")
        return processor
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def infer_template(text_type: str, tokenizer: Any) -> str:
    """The paper's template for the LM: phi3_instruct for Phi-3, llama3 for a LLaMA-3 vocabulary, else chat."""
    if text_type == "phi3":
        return "phi3_instruct"
    return "llama3" if "<|eot_id|>" in tokenizer.get_added_vocab() else "chat"


def compute_converted_weights(original: OriginalLlava, weights_origin: Path, tensors: dict[str, torch.Tensor],
                              tower: dict[str, torch.Tensor], *, vocab_rows: int, new_rows: int,
                              dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rename original tensors to the in-memory names of transformers 5.x ``LlavaForConditionalGeneration``."""
    out: dict[str, torch.Tensor] = {}
    embedded_tower: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer that old LLaMA checkpoints saved; recomputed
            continue
        if key.startswith(PROJECTOR_PREFIX):
            match = re.fullmatch(r"([02])\.(weight|bias)", key.removeprefix(PROJECTOR_PREFIX))
            if match is None:
                raise ConversionError(f"{weights_origin}: unexpected projector weight {key!r} for "
                                      f"{SUPPORTED_PROJECTOR} (expects {PROJECTOR_PREFIX}{{0,2}}.{{weight,bias}})")
            linear = "linear_1" if match.group(1) == "0" else "linear_2"
            out[f"model.multi_modal_projector.{linear}.{match.group(2)}"] = value
        elif key.startswith(EMBEDDED_TOWER_PREFIX):
            embedded_tower[key.removeprefix(EMBEDDED_TOWER_PREFIX).removeprefix("vision_model.")] = value
        elif key.startswith("model."):
            out["model.language_model." + key.removeprefix("model.")] = value
        elif key == "lm_head.weight":
            out[key] = value
        else:
            raise ConversionError(f"{weights_origin}: unexpected weight {key!r} (not LM, projector or vision tower)")
    for index in (0, 2):
        for part in ("weight", "bias"):
            key = f"model.multi_modal_projector.linear_{1 if index == 0 else 2}.{part}"
            if key not in out:
                raise ConversionError(f"{weights_origin}: missing weight '{PROJECTOR_PREFIX}{index}.{part}'")
    in_features = out["model.multi_modal_projector.linear_1.weight"].shape[1]
    if in_features != original.mm_hidden_size:
        raise ConversionError(f"{weights_origin}: {PROJECTOR_PREFIX}0.weight takes {in_features} features but "
                              f"{original.config_path} says mm_hidden_size={original.mm_hidden_size}")
    # Vision weights inside the checkpoint are what the reference loader ignores unless unfreeze_mm_vision_tower.
    source = embedded_tower if original.unfreeze_vision_tower and embedded_tower else tower
    for key, value in source.items():
        if not key.endswith("position_ids"):
            out["model.vision_tower." + key] = value
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key not in out:
            if key == "lm_head.weight" and original.text_kwargs.get("tie_word_embeddings"):
                continue
            name = "model.embed_tokens.weight" if key.startswith("model.") else key
            raise ConversionError(f"{weights_origin}: missing weight {name!r}")
        rows = out[key]
        if rows.shape[0] != original.vocab_size:
            raise ConversionError(f"{weights_origin}: {_original_name(key)} has {rows.shape[0]} rows but "
                                  f"{original.config_path} "
                                  f"says vocab_size={original.vocab_size}")
        # (vocab_rows + new_rows, D): the reference's resize to len(tokenizer), then zero rows for <image>.
        out[key] = torch.cat([rows[:vocab_rows], rows.new_zeros(new_rows, rows.shape[1])])
    return {k: v.to(dtype) for k, v in out.items()}


def _original_name(key: str) -> str:
    """The original-layout name of a converted key, for error messages."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("model.multi_modal_projector.linear_"):
        return PROJECTOR_PREFIX + ("0" if key[len("model.multi_modal_projector.linear_")] == "1" else "2") \
            + key[len("model.multi_modal_projector.linear_1"):]
    if key.startswith("model.vision_tower."):
        return "vision tower: vision_model." + key.removeprefix("model.vision_tower.")
    return key


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def load_original_tokenizer(src: Path) -> Any:
    """The checkpoint's tokenizer, read from a copy of its tokenizer files only.

    Loading from ``src`` itself would make transformers parse the original config.json (model_type ``llava`` is
    also transformers' own Llava type) while looking for the tokenizer class.
    """
    with tempfile.TemporaryDirectory() as tmp:
        copied = [shutil.copy2(src / name, Path(tmp) / name) for name in TOKENIZER_FILES if (src / name).is_file()]
        if not copied:
            raise ConversionError(f"{src}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
        return AutoTokenizer.from_pretrained(tmp)


def build_llava_config(original: OriginalLlava, vision_config: CLIPVisionConfig, *, vocab_size: int,
                       image_token_id: int) -> LlavaConfig:
    """The transformers LlavaConfig: original LM config + CLIP config + layer -2, CLS-dropping, mlp2x_gelu."""
    text_config = CONFIG_MAPPING[original.text_type](**original.text_kwargs, vocab_size=vocab_size)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         projector_hidden_act="gelu",  # nn.GELU() of the original: exact erf form
                         vision_feature_layer=original.select_layer, vision_feature_select_strategy="default",
                         multimodal_projector_bias=True, tie_word_embeddings=text_config.tie_word_embeddings,
                         image_seq_length=1 if original.select_feature == "cls" else patches)
    setattr(config, SELECT_FEATURE_KEY, original.select_feature)  # read by perceive_ray.models.llava
    return config


def convert_llava(src: str | Path, dst: str | Path, *, template: str | None = None,
                  vision_tower_dir: str | Path | None = None, dtype: str | None = None) -> Path:
    """Convert an original LLaVA / LLaVA++ checkpoint dir ``src`` into a transformers Llava dir ``dst``.

    ``template`` (chat | phi3_instruct | llama3) goes into ``perceive_ray.json``; None infers it from the LM.
    ``vision_tower_dir`` overrides the config's ``mm_vision_tower``. ``dtype`` (float32 | bfloat16 | float16)
    defaults to the LM embedding's dtype; every tensor is written in it, as safetensors. ``dst`` appears only
    when everything is written (it is assembled in a hidden sibling directory first).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst}: output directory exists and is not empty")
    if template is not None and template not in TEMPLATES:
        raise ConversionError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConversionError(f"dtype {dtype!r} is not a torch dtype (float32 | bfloat16 | float16)")
    original = load_original_config(src)
    tower_ref = vision_tower_dir if vision_tower_dir is not None else original.vision_tower
    if tower_ref is None:
        raise ConversionError(f"{original.config_path}: missing key 'mm_vision_tower' and no vision_tower_dir given")
    tower_dir = resolve_vision_tower_dir(tower_ref)
    vision_config, tower = load_vision_tower(tower_dir)
    if vision_config.hidden_size != original.mm_hidden_size:
        raise ConversionError(f"{original.config_path}: mm_hidden_size={original.mm_hidden_size} but the vision "
                              f"tower {tower_dir} has hidden_size={vision_config.hidden_size}")
    weights_origin, tensors = load_checkpoint_tensors(src)

    tokenizer = load_original_tokenizer(src)
    vocab_rows = len(tokenizer)  # the reference loader resizes the LM to len(tokenizer)
    if vocab_rows > original.vocab_size:
        raise ConversionError(f"{src}: tokenizer has {vocab_rows} tokens but {original.config_path} says "
                              f"vocab_size={original.vocab_size}; the missing rows cannot be reproduced")
    new_rows = 0
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
        new_rows = 1
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    embed = tensors.get("model.embed_tokens.weight")
    target_dtype = getattr(torch, dtype) if dtype is not None else (embed.dtype if embed is not None else torch.float32)
    state = compute_converted_weights(original, weights_origin, tensors, tower, vocab_rows=vocab_rows,
                                      new_rows=new_rows, dtype=target_dtype)
    config = build_llava_config(original, vision_config, vocab_size=vocab_rows + new_rows,
                                image_token_id=image_token_id)
    kind = LlavaClsForConditionalGeneration if original.select_feature == "cls" else LlavaForConditionalGeneration
    with torch.device("meta"):  # no allocation: the loaded tensors are assigned in place
        model = kind(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [_original_name(k) for k in result.missing_keys
               if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = [_original_name(k) for k in result.unexpected_keys]
    if missing or unexpected:
        raise ConversionError(f"{weights_origin} (+ vision tower {tower_dir}): weights do not fit a "
                              f"{original.text_type} LLaVA: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()

    partial = dst.parent / f".{dst.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if (src / "tokenizer.model").is_file() and not (partial / "tokenizer.model").exists():
            shutil.copy2(src / "tokenizer.model", partial / "tokenizer.model")  # the SentencePiece model
        build_image_processor(tower_dir, vision_config.image_size).save_pretrained(partial)
        sidecar = {
            "template": template or infer_template(original.text_type, tokenizer),
            "select_feature": original.select_feature,
            "converted_from": str(src),
            "vision_tower": str(tower_ref),
            "image_token_id": image_token_id,
            "reference_vocab_size": vocab_rows,  # logits columns >= this were added by the converter (zero rows)
        }
        (partial / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        if dst.exists():
            dst.rmdir()  # empty, checked above
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Tiny checkpoints in the ORIGINAL layout (random init), the converter's test input.

# Vision width 24 != LM width 32, so a transposed projector cannot pass; 32 px / patch 8 -> V = 16 patches.
TINY_ORIGINAL_VISION = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 2,
                        "image_size": 32, "patch_size": 8, "initializer_range": 0.2}
_TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "initializer_range": 0.2, "tie_word_embeddings": False, "use_cache": True}
# template -> (original architecture, model_type, text type, specials, bos, eos, pad, extra LM fields, padded rows)
_TINY_FLAVOURS = {
    "chat": ("LlavaLlamaForCausalLM", "llava", "llama", ("<unk>", "<s>", "</s>"), "<s>", "</s>", "<unk>",
             {"num_key_value_heads": 2, "rope_theta": 10000.0, "pretraining_tp": 1}, 0),
    # Phi-3 stores more embedding rows than tokens (32064 vs 32011): 13 padded rows exercise the resize.
    "phi3_instruct": ("LlavaPhiForCausalLM", "llava_phi", "phi3",
                      ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
                      "<s>", "<|endoftext|>", "<unk>",
                      {"num_key_value_heads": 4, "rope_theta": 10000.0, "sliding_window": 2047,
                       "original_max_position_embeddings": 2048}, 13),
    "llama3": ("LlavaLlamaForCausalLM", "llava_llama", "llama",
               ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"), "<|begin_of_text|>", "<|end_of_text|>", None,
               {"num_key_value_heads": 2, "rope_theta": 500000.0, "pretraining_tp": 1}, 0),
}


def build_tiny_original_tokenizer(template: str = "chat"):
    """A small LLaMA-like BPE tokenizer trained in-process on the §3.2 prompts; no ``<image>`` token (as shipped)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from perceive_ray.models.llava import TINY_CORPUS_QUESTION as VQASCORE_QUESTION

    _, _, _, specials, bos, eos, pad, _, _ = _TINY_FLAVOURS[template]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.add_special_tokens(list(specials))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    corpus = []
    for caption in ("a mug on a table", "a dog to the left of a chair", "a photo of a red cube", "Yes", "No"):
        conv = TEMPLATES[template]  # only its own template: no other model's markers merge into tokens
        text = conv.render_question_part(VQASCORE_QUESTION.replace("{}", caption)) + conv.render_answer_part("Yes")
        corpus.append(text.replace(IMAGE_PLACEHOLDER, ""))
    alphabet = [c for c in string.printable if c not in "\x0b\x0c\r"] + ["▁"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                                         initial_alphabet=alphabet, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   pad_token=pad)


def save_tiny_original_llava(path: str | Path, *, template: str = "chat", seed: int = 0,
                             select_feature: str = "patch", weights_format: str = "safetensors",
                             embedded_tower_seed: int | None = None, unfreeze_vision_tower: bool = False) -> Path:
    """Write a random-init tiny checkpoint in the original LLaVA / LLaVA++ layout; return ``path``.

    ``path/vision_tower`` holds a tiny full ``CLIPModel`` (the layout of ``openai/clip-vit-large-patch14-336``)
    that ``mm_vision_tower`` points to. ``weights_format="bin"`` writes two ``pytorch_model-*.bin`` shards with an
    index and the ``rotary_emb.inv_freq`` buffers old LLaMA checkpoints carry. ``embedded_tower_seed`` also stores
    a different random vision tower inside the checkpoint (``model.vision_tower.vision_tower.vision_model.*``).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CLIPConfig, CLIPModel

    if template not in _TINY_FLAVOURS:
        raise ValueError(f"unknown template {template!r}")
    arch, model_type, text_type, _, bos, eos, pad, extra, padded_rows = _TINY_FLAVOURS[template]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_original_tokenizer(template)
    tokenizer.save_pretrained(path)
    ids = tokenizer.convert_tokens_to_ids
    lm_fields = {**_TINY_LM, **extra, "vocab_size": len(tokenizer) + padded_rows, "bos_token_id": ids(bos),
                 "eos_token_id": ids(eos), "pad_token_id": ids(pad) if pad else None}

    def build_clip(clip_seed: int) -> CLIPModel:
        text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
        torch.manual_seed(clip_seed)
        return CLIPModel(CLIPConfig(vision_config=TINY_ORIGINAL_VISION, text_config=text, projection_dim=16))

    with torch.random.fork_rng(devices=[]):
        clip = build_clip(seed + 1)
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(CONFIG_MAPPING[text_type](**lm_fields))
        width, mm = _TINY_LM["hidden_size"], TINY_ORIGINAL_VISION["hidden_size"]
        state = {k: v.contiguous() for k, v in lm.state_dict().items()}  # already model.* / lm_head.weight
        state.update({f"{PROJECTOR_PREFIX}0.weight": 0.2 * torch.randn(width, mm),
                      f"{PROJECTOR_PREFIX}0.bias": 0.2 * torch.randn(width),
                      f"{PROJECTOR_PREFIX}2.weight": 0.2 * torch.randn(width, width),
                      f"{PROJECTOR_PREFIX}2.bias": 0.2 * torch.randn(width)})
        if embedded_tower_seed is not None:
            embedded = build_clip(embedded_tower_seed).vision_model.state_dict()
            state.update({f"{EMBEDDED_TOWER_PREFIX}vision_model.{k}": v for k, v in embedded.items()})
    tower_dir = path / "vision_tower"
    clip.save_pretrained(tower_dir)
    size = TINY_ORIGINAL_VISION["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}) \
        .save_pretrained(tower_dir)

    # Legacy (transformers 4.3x/4.4x) config fields, as the released checkpoints have them.
    config = {"architectures": [arch], "model_type": model_type, **lm_fields, "torch_dtype": "float32",
              "transformers_version": "4.37.2", "rope_scaling": None, "mm_vision_tower": str(tower_dir.resolve()),
              "mm_hidden_size": TINY_ORIGINAL_VISION["hidden_size"], "mm_projector_type": SUPPORTED_PROJECTOR,
              "mm_vision_select_layer": -2, "mm_vision_select_feature": select_feature,
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
              "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
              "use_mm_proj": True, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
              "unfreeze_mm_vision_tower": unfreeze_vision_tower}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if weights_format == "safetensors":
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    elif weights_format == "bin":
        for layer in range(_TINY_LM["num_hidden_layers"]):  # (head_dim / 2,) buffers the converter must drop
            state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, shard_keys in shards.items():
            torch.save({k: state[k] for k in shard_keys}, path / name)
        weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(f"unknown weights_format {weights_format!r}")
    return path
