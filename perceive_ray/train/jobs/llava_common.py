"""What the LLaVA-1.5 and VLM2Vec training jobs share: building the model, decoding images, the multimodal forward.

Model. Either a Llava checkpoint in the transformers layout (``model.source``: a llava-hf directory or hub id, or
``train:<run id>`` of an earlier stage, resolved to its export), loaded as ``LlavaForConditionalGeneration`` or the
project's ``LlavaClsForConditionalGeneration`` by its ``mm_vision_select_feature``; or, for LLaVA-1.5's stage 1,
*assembled*: ``model.source`` is a plain causal LM (Vicuna-7B v1.5) and ``train.llava.vision_tower`` a CLIP vision
model (ViT-L/14-336): a transformers CLIPVisionModel directory, or an open_clip local directory converted in memory
(``perceive_ray.models.clip_to_hf``; its image processor is open_clip's eval transform). Assembly adds ``<image>`` to
the tokenizer when missing (mean-initialised embedding row), pads with ``unk`` (the ``chat`` template's pad), and
builds a fresh ``mlp2x_gelu`` projector with torch's default ``nn.Linear`` init under ``torch.manual_seed(seed)`` --
the same bytes on every rank (LLaVA#1440), which the worker checks with a checksum all-gather.

Forward (``encode``): token embeddings, the image features of the rows that have an image scattered into their V
``<image>`` positions, then the language model. Rows without an image carry a zero image that still runs through
the vision tower and the projector, and ``0 * features.sum()`` joins the graph: under ZeRO-3 every rank must
gather every module's parameters in the same order, so a text-only batch on one rank must not skip the tower
(DeepSpeed#7170). A frozen tower (VLM2Vec, ZeRO <= 2) runs under ``no_grad`` on the image rows only.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perceive_ray.config import ConfigError
from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER
from perceive_ray.models.llava import (
    SELECT_FEATURE_KEY,
    SIDECAR,
    LlavaClsForConditionalGeneration,
    compute_num_visual_tokens,
    select_feature_of,
)
from perceive_ray.train.jobs.base import ConversationImageSpec

PROJECTOR_INIT = "projector_init"


@dataclass
class LlavaParts:
    """A Llava model ready for a training job, with the facts the job needs."""

    model: Any  # LlavaForConditionalGeneration or LlavaClsForConditionalGeneration
    tokenizer: Any
    image_processor_source: str
    image_token_id: int
    num_visual_tokens: int
    select_feature: str
    assembled: bool
    template: str = "chat"


def is_llava_checkpoint(source: str) -> bool:
    from transformers import AutoConfig, LlavaConfig

    return isinstance(AutoConfig.from_pretrained(source), LlavaConfig)


def load_tokenizer(source: str) -> Any:
    """The tokenizer of a Llava checkpoint, or of an LLM to assemble (``<image>`` added, pad = unk)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def training_tokenizer(config: Any) -> Any:
    return load_tokenizer(str(config.model.source))


def num_visual_tokens_for(config: Any) -> int:
    """V of the model ``config`` trains, read from config files only (no weights)."""
    from transformers import AutoConfig

    source = str(config.model.source)
    vision_tower = getattr(getattr(config.train, "llava", None), "vision_tower", None) \
        if config.job == "llava" else None
    if vision_tower is None:
        return compute_num_visual_tokens(AutoConfig.from_pretrained(source))
    if config.train.llava.select_feature == "cls":
        return 1
    vision = vision_tower_config(vision_tower)
    return (vision.image_size // vision.patch_size) ** 2


def vision_tower_config(source: str) -> Any:
    """The CLIPVisionConfig of a vision tower: a transformers CLIP (vision) model directory / hub id, or an
    open_clip local directory (``open_clip_config.json``, converted by ``perceive_ray.models.clip_to_hf``)."""
    from transformers import AutoConfig

    from perceive_ray.models import clip_to_hf

    if clip_to_hf.is_open_clip_dir(source):
        return clip_to_hf.hf_vision_config(source)
    vision = AutoConfig.from_pretrained(source)
    return getattr(vision, "vision_config", vision)


def load_vision_tower_parts(source: str, *, dtype: torch.dtype) -> tuple[Any, Any]:
    """(CLIPVisionConfig, CLIPVisionModel) of a vision tower. An open_clip directory is converted in memory
    (``clip_to_hf.convert_open_clip_vision``, loaded with ``strict=True``); a transformers directory loads as-is."""
    from transformers import CLIPVisionModel

    from perceive_ray.models import clip_to_hf

    if clip_to_hf.is_open_clip_dir(source):
        vision = clip_to_hf.load_hf_vision_model(source, dtype=dtype)
        return vision.config, vision
    vision_config = vision_tower_config(source)
    vision = CLIPVisionModel.from_pretrained(source, config=vision_config, dtype=dtype, use_safetensors=True)
    return vision_config, vision


def image_spec(processor_source: str, preprocess: str) -> ConversationImageSpec:
    processor = load_image_processor(processor_source)
    crop = processor.crop_size
    return ConversationImageSpec(processor_source=processor_source, preprocess=preprocess,
                                 size=(int(crop["height"]), int(crop["width"])))


@functools.lru_cache(maxsize=4)
def load_image_processor(source: str) -> Any:
    """The CLIP image processor of a Llava checkpoint or vision tower; for an open_clip directory, the processor
    equal to open_clip's eval transform (``clip_to_hf.hf_image_processor``)."""
    from transformers import AutoImageProcessor

    from perceive_ray.models import clip_to_hf

    if clip_to_hf.is_open_clip_dir(source):
        return clip_to_hf.hf_image_processor(source)
    return AutoImageProcessor.from_pretrained(source, backend="pil")


def preprocess_image(path: str, spec: dict[str, Any]) -> np.ndarray:
    """(3, H, W) float32 pixel values of one image file, as LLaVA / VLM2Vec feed it to the vision tower."""
    from PIL import Image

    from perceive_ray.data.images import pad_to_square

    processor = load_image_processor(spec["processor_source"])
    with Image.open(path) as handle:
        image = handle.convert("RGB")
    if spec["preprocess"] == "pad":  # LLaVA's expand2square with the processor's mean colour
        image = pad_to_square(image, tuple(int(x * 255) for x in processor.image_mean))
    elif spec["preprocess"] == "resize":  # §5.6: aspect-distorting resize to the square crop size
        height, width = spec["size"]
        image = image.resize((int(width), int(height)), Image.BICUBIC)
    pixels = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0], dtype=np.float32)
    if tuple(pixels.shape[1:]) != tuple(spec["size"]):
        raise ValueError(f"{path}: processed to {tuple(pixels.shape)}, expected (3, {spec['size']})")
    return pixels


def build_llava(config: Any, *, seed: int, device: torch.device) -> LlavaParts:
    """The Llava model the job starts from (loaded, or assembled for stage 1), fp32 on CPU / bf16 on GPU."""
    from transformers import AutoConfig

    source = str(config.model.source)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    vision_tower = config.train.llava.vision_tower if config.job == "llava" else None
    tokenizer = load_tokenizer(source)
    if vision_tower is not None:
        model = assemble_llava(source, vision_tower, tokenizer=tokenizer,
                               select_feature=config.train.llava.select_feature, seed=seed, dtype=dtype)
        processor_source, assembled = vision_tower, True
    else:
        llava_config = AutoConfig.from_pretrained(source)
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        if not isinstance(llava_config, LlavaConfig):
            raise ConfigError(f"model.source {source!r} is a {type(llava_config).__name__}, not a Llava checkpoint; "
                              "to assemble one from an LLM, set train.llava.vision_tower (stage projector)")
        kind = LlavaClsForConditionalGeneration if select_feature_of(llava_config) == "cls" \
            else LlavaForConditionalGeneration
        model = kind.from_pretrained(source, config=llava_config, dtype=dtype, use_safetensors=True)
        processor_source, assembled = source, False
    model.to(device)
    image_token_id = int(model.config.image_token_id)
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) != image_token_id:
        raise ConfigError(f"{source}: tokenizer id of {IMAGE_PLACEHOLDER} differs from the config's image_token_id")
    return LlavaParts(model=model, tokenizer=tokenizer, image_processor_source=processor_source,
                      image_token_id=image_token_id, num_visual_tokens=compute_num_visual_tokens(model.config),
                      select_feature=select_feature_of(model.config), assembled=assembled)


def assemble_llava(llm_source: str, vision_source: str, *, tokenizer: Any, select_feature: str, seed: int,
                   dtype: torch.dtype) -> Any:
    """LLM + CLIP vision tower + a fresh mlp2x_gelu projector -> a Llava(-cls) model (stage 1's starting point).

    ``vision_source``: a transformers CLIP vision model or an open_clip local directory (see
    ``load_vision_tower_parts``)."""
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    llm = AutoModelForCausalLM.from_pretrained(llm_source, dtype=dtype, use_safetensors=True)
    vision_config, vision = load_vision_tower_parts(vision_source, dtype=dtype)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))  # <image> row: transformers' mean resizing
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=llm.config,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_seq_length=1 if select_feature == "cls" else patches)
    setattr(config, SELECT_FEATURE_KEY, select_feature)
    kind = LlavaClsForConditionalGeneration if select_feature == "cls" else LlavaForConditionalGeneration
    model = empty_llava(kind, config, dtype)
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(llm.lm_head.state_dict(), strict=True)
    del llm, vision
    projector_type = type(model.model.multi_modal_projector)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical on every rank: torch's default nn.Linear init, as LLaVA builds it
        model.model.multi_modal_projector = projector_type(config).to(dtype)
    return model


def empty_llava(kind: type, config: Any, dtype: torch.dtype) -> Any:
    """A Llava(-cls) model with allocated but uninitialised weights (every weight is loaded next)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return kind._from_config(config, dtype=dtype)


def tensor_checksum(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters (names, shapes and bytes, fp32)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def encode(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor | None,
           has_image: torch.Tensor, *, train_vision: bool) -> torch.Tensor:
    """(B, T, D) final hidden states of the LLM (after its final norm) for right-padded multimodal rows.

    ``model`` is the LlavaForConditionalGeneration (peft layers may live inside). ``pixels`` (B, 3, H, W) holds a
    zero image for rows without one; ``train_vision``: the tower runs on every row with autograd (ZeRO-3-safe,
    see the module docstring), else on the image rows only, without autograd."""
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    image_mask = input_ids == model.config.image_token_id
    features = None
    if pixels is not None and (train_vision or bool(has_image.any())):
        rows = pixels if train_vision else pixels[has_image]
        with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
            features = image_features(model, rows.to(embeds.dtype))  # (rows, V, D)
        real = features[has_image] if train_vision else features
        expected = int(image_mask[has_image].sum())
        if real.shape[0] * real.shape[1] != expected or int(image_mask.sum()) != expected:
            raise ValueError(f"{int(image_mask.sum())} image-token positions for {real.shape[0]} image(s) of "
                             f"{real.shape[1]} features each")
        embeds = embeds.masked_scatter(image_mask[..., None], real.reshape(-1, real.shape[-1]).to(embeds.dtype))
        if train_vision and bool((~has_image).any()):
            embeds = embeds + 0.0 * features[~has_image].sum()  # text-only rows: keep the tower in the graph
    elif bool(image_mask.any()):
        raise ValueError("image-token positions without pixels")
    out = inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def image_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(B, V, D_text): projector output of the selected vision features (patch or cls, layer -2)."""
    cfg = model.config
    out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                         output_hidden_states=True, return_dict=True)
    return torch.stack(list(out.pooler_output))


def write_llava_sidecar(out_dir: Path, **facts: Any) -> None:
    (out_dir / SIDECAR).write_text(json.dumps({"template": "chat", **facts}, indent=2) + "\n", encoding="utf-8")
