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
  the tokenizer's length (Phi-3 stores 32064 rows for 32011 tokens);
- LLaMA-3 ``<pad>`` (``llama3_pad_row``, PROTOCOLS §3.2 step 4, §7): for the ``llama3`` template, when the
  tokenizer has no pad token, the reference's VQAScore loader adds ``<pad>`` and sets its new input and output
  embedding rows to the mean of the existing rows. ``mean`` (default) reproduces that row, which then takes part in
  the full-vocabulary softmax; ``none`` adds nothing (the tokenizer keeps no pad token);
- then an ``<image>`` token is appended with zero input/output rows. Its logit is therefore exactly 0;
  ``perceive_ray.json`` records ``reference_vocab_size`` (the softmax width of the reference loader: the
  tokenizer's rows plus the ``<pad>`` row when one was added, never ``<image>``) so a scorer can drop the added
  column, and ``llama3_pad_row`` / ``pad_row_id`` (the id of the added row, or null).
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
LLAMA3_PAD_TOKEN = "<pad>"  # what the reference adds to a LLaMA-3 tokenizer without a pad token
LLAMA3_PAD_ROWS = ("mean", "none")
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
                              dtype: torch.dtype, mean_rows: int = 0) -> dict[str, torch.Tensor]:
    """Rename original tensors to the in-memory names of transformers 5.x ``LlavaForConditionalGeneration``.

    Input and output embeddings get ``vocab_rows`` original rows, then ``mean_rows`` rows equal to the mean of
    those (the reference's ``<pad>`` initialisation, computed in float32), then ``new_rows`` zero rows.
    """
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
        # (vocab_rows + mean_rows + new_rows, D): the reference's resize to len(tokenizer), its mean-initialised
        # <pad> row(s), then zero rows for <image>.
        kept = rows[:vocab_rows]
        mean = kept.float().mean(dim=0, keepdim=True).to(rows.dtype).expand(mean_rows, -1)
        out[key] = torch.cat([kept, mean, rows.new_zeros(new_rows, rows.shape[1])])
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
                  vision_tower_dir: str | Path | None = None, dtype: str | None = None,
                  llama3_pad_row: str = "mean") -> Path:
    """Convert an original LLaVA / LLaVA++ checkpoint dir ``src`` into a transformers Llava dir ``dst``.

    ``template`` (chat | phi3_instruct | llama3) goes into ``perceive_ray.json``; None infers it from the LM.
    ``vision_tower_dir`` overrides the config's ``mm_vision_tower``. ``dtype`` (float32 | bfloat16 | float16)
    defaults to the LM embedding's dtype; every tensor is written in it, as safetensors. ``dst`` appears only
    when everything is written (it is assembled in a hidden sibling directory first). ``llama3_pad_row``
    (``mean`` | ``none``) decides whether a ``llama3`` checkpoint whose tokenizer has no pad token gets the
    reference's mean-initialised ``<pad>`` row (module docstring); other templates are never changed by it.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst}: output directory exists and is not empty")
    if template is not None and template not in TEMPLATES:
        raise ConversionError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConversionError(f"dtype {dtype!r} is not a torch dtype (float32 | bfloat16 | float16)")
    if llama3_pad_row not in LLAMA3_PAD_ROWS:
        raise ConversionError(f"llama3_pad_row={llama3_pad_row!r}; use one of {', '.join(LLAMA3_PAD_ROWS)}")
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
    template = template or infer_template(original.text_type, tokenizer)
    mean_rows, pad_row_id = 0, None
    if template == "llama3" and tokenizer.pad_token is None and llama3_pad_row == "mean":
        if LLAMA3_PAD_TOKEN in tokenizer.get_vocab():
            raise ConversionError(f"{src}: the tokenizer has {LLAMA3_PAD_TOKEN!r} but no pad token; "
                                  "the reference's added <pad> row cannot be reproduced")
        tokenizer.add_special_tokens({"pad_token": LLAMA3_PAD_TOKEN})
        mean_rows, pad_row_id = 1, tokenizer.pad_token_id
        if pad_row_id != vocab_rows:
            raise ConversionError(f"{src}: {LLAMA3_PAD_TOKEN!r} got id {pad_row_id}, expected {vocab_rows}")
    new_rows = 0
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
        new_rows = 1
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    embed = tensors.get("model.embed_tokens.weight")
    target_dtype = getattr(torch, dtype) if dtype is not None else (embed.dtype if embed is not None else torch.float32)
    state = compute_converted_weights(original, weights_origin, tensors, tower, vocab_rows=vocab_rows,
                                      new_rows=new_rows, dtype=target_dtype, mean_rows=mean_rows)
    reference_vocab = vocab_rows + mean_rows  # the reference's softmax width: its <pad> row included
    config = build_llava_config(original, vision_config, vocab_size=reference_vocab + new_rows,
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
            "template": template,
            "select_feature": original.select_feature,
            "converted_from": str(src),
            "vision_tower": str(tower_ref),
            "image_token_id": image_token_id,
            "reference_vocab_size": reference_vocab,  # logits columns >= this were added by the converter (zero rows)
            "llama3_pad_row": llama3_pad_row,
            "pad_row_id": pad_row_id,  # the mean-initialised <pad> row, or null when none was added
        }
        (partial / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        if dst.exists():
            dst.rmdir()  # empty, checked above
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst

