"""Random-init CLIP and LLaVA checkpoints of any size, written in the layouts the real loaders read.

- ``save_clip`` writes an open_clip local directory (``open_clip_config.json`` + ``open_clip_model.safetensors``)
  that ``perceive_ray.models.clip.load_clip`` reads;
- ``save_llava`` writes the transformers Llava layout (config + safetensors), an offline tokenizer, the CLIP image
  processor and the ``perceive_ray.json`` sidecar that ``perceive_ray.models.llava.load_llava`` reads;
- ``llava_15_7b_shapes`` gives LLaVA-1.5-7B's exact shapes as ``save_llava`` keyword arguments.

The tests' tiny models (``save_tiny_clip``, ``save_tiny_llava``) and the benchmark scripts are calls into these
builders with their own sizes. Weights come from the model classes' own initialisers under ``torch.manual_seed``
(the caller's RNG state is restored), so the same seed, sizes and device give the same bytes. Large models can be
built straight on an accelerator (``device="cuda"``, ``dtype="bfloat16"``): nothing is initialised on the CPU.
Nothing here downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LLaVA-1.5-7B (liuhaotian/llava-v1.5-7b, llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 tower, mlp2x_gelu projector,
# LLaMA-2-7B (Vicuna-7B v1.5) LM. 32000 LLaMA tokens + 1 row for the added <image> token (llava-hf pads to 32064).
LLAVA_15_7B_VOCAB = 32000
LLAVA_15_7B_PARAMS = 7_062_910_976  # with 32001 LM rows: 303,507,456 vision + 20,979,712 projector + 6,738,423,808 LM


def llava_15_7b_shapes() -> dict[str, Any]:
    """LLaVA-1.5-7B's shapes as ``save_llava`` keyword arguments (plain data; no weights, no download)."""
    return {
        # CLIP ViT-L/14 at 336 px: 24 layers, width 1024, 16 heads, MLP 4096, QuickGELU; 24 x 24 = 576 patches.
        "image_size": 336, "patch_size": 14, "vision_width": 1024, "vision_layers": 24, "vision_heads": 16,
        "vision_intermediate": 4096, "projection_dim": 768,
        "projector": "mlp2x_gelu",  # Linear(1024 -> 4096), GELU, Linear(4096 -> 4096)
        # LLaMA-2-7B: width 4096, 32 layers, 32 heads (no GQA), SwiGLU MLP 11008, RMSNorm eps 1e-5, 4096 positions.
        "text_width": 4096, "text_layers": 32, "text_heads": 32, "text_kv_heads": 32, "text_intermediate": 11008,
        "vocab_size": LLAVA_15_7B_VOCAB + 1, "max_positions": 4096, "rms_norm_eps": 1e-5,
    }


# ---------------------------------------------------------------------------------------------------------------
# open_clip


def clip_model_config(*, image_size: int, patch_size: int, width: int, layers: int, text_width: int,
                      text_layers: int, text_heads: int, embed_dim: int, head_width: int | None = None,
                      heads: int | None = None, context_length: int = 77, vocab_size: int = 49408,
                      quick_gelu: bool = True) -> dict[str, Any]:
    """An open_clip ``model_cfg``: a ViT (``head_width`` or ``heads``; default 64-wide heads) and an OpenAI-style
    text tower (default: the real 49,408-token vocabulary and context 77, so open_clip's tokenizer drives it)."""
    if heads is not None and head_width is not None:
        raise ValueError("give the vision tower's heads or head_width, not both")
    if heads is not None:
        if width % heads:
            raise ValueError(f"vision width {width} is not divisible by {heads} heads")
        head_width = width // heads
    return {
        "embed_dim": embed_dim,
        "quick_gelu": quick_gelu,  # like the OpenAI checkpoints the paper uses
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                       "head_width": 64 if head_width is None else head_width, "patch_size": patch_size},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": text_width,
                     "heads": text_heads, "layers": text_layers},
    }


def save_clip(path: str | Path, *, seed: int = 0, image_size: int, patch_size: int, width: int, layers: int,
              text_width: int, text_layers: int, text_heads: int, embed_dim: int, head_width: int | None = None,
              heads: int | None = None, context_length: int = 77, vocab_size: int = 49408,
              quick_gelu: bool = True) -> Path:
    """Write a random-init open_clip model of the given size as a local directory ``load_clip`` reads."""
    model_cfg = clip_model_config(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                                  text_width=text_width, text_layers=text_layers, text_heads=text_heads,
                                  embed_dim=embed_dim, head_width=head_width, heads=heads,
                                  context_length=context_length, vocab_size=vocab_size, quick_gelu=quick_gelu)
    return save_clip_config(path, model_cfg, seed=seed)


def save_clip_config(path: str | Path, model_cfg: dict[str, Any], *, seed: int = 0) -> Path:
    """Write a random-init open_clip model built from ``model_cfg`` (config JSON + safetensors) and return ``path``."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    from perceive_ray.models.clip import CONFIG_FILE, WEIGHTS_FILE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # open_clip initialises from the global RNG; keep callers' state
        torch.manual_seed(seed)
        clip = open_clip.CLIP(**model_cfg)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {key: value.detach().contiguous() for key, value in clip.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    return path


# ---------------------------------------------------------------------------------------------------------------
# LLaVA (transformers Llava layout)


def build_llava_config(*, template: str = "chat", select_feature: str = "patch", tokenizer: Any,
                       image_size: int, patch_size: int, vision_width: int, vision_layers: int, vision_heads: int,
                       vision_intermediate: int, projection_dim: int | None = None, text_width: int,
                       text_layers: int, text_heads: int, text_kv_heads: int | None = None, text_intermediate: int,
                       vocab_size: int | None = None, max_positions: int = 2048, rms_norm_eps: float | None = None,
                       initializer_range: float | None = None, projector: str = "mlp2x_gelu") -> Any:
    """The ``LlavaConfig`` ``save_llava`` writes (vision layer -2, CLS dropped; ``mm_vision_select_feature`` set).

    ``vocab_size``: LM rows (default: the tokenizer's length; it must cover every tokenizer id).
    ``initializer_range``: None keeps transformers' default (0.02) for both towers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER
    from perceive_ray.models.llava import SELECT_FEATURE_KEY, SELECT_FEATURES

    if select_feature not in SELECT_FEATURES:
        raise ValueError(f"unknown select_feature {select_feature!r}")
    if projector != "mlp2x_gelu":
        raise ValueError(f"projector {projector!r}: only LLaVA-1.5's mlp2x_gelu (Linear-GELU-Linear) is built")
    ids = tokenizer.convert_tokens_to_ids
    bos, pad = tokenizer.bos_token, tokenizer.pad_token
    rows = len(tokenizer) if vocab_size is None else int(vocab_size)
    if rows < len(tokenizer):
        raise ValueError(f"vocab_size {rows} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    init = {} if initializer_range is None else {"initializer_range": initializer_range}
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=vision_intermediate,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size,
                              projection_dim=vision_width if projection_dim is None else projection_dim, **init)
    text_extra = dict(init)
    if rms_norm_eps is not None:
        text_extra["rms_norm_eps"] = rms_norm_eps
    text = LlamaConfig(hidden_size=text_width, intermediate_size=text_intermediate, num_hidden_layers=text_layers,
                       num_attention_heads=text_heads, num_key_value_heads=text_kv_heads or text_heads,
                       vocab_size=rows, max_position_embeddings=max_positions, bos_token_id=ids(bos),
                       eos_token_id=ids("</s>"), pad_token_id=ids(pad), tie_word_embeddings=False, **text_extra)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids(IMAGE_PLACEHOLDER),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=1 if select_feature == "cls" else (image_size // patch_size) ** 2)
    setattr(config, SELECT_FEATURE_KEY, select_feature)
    return config


def build_llava_model(config: Any, *, seed: int = 0, dtype: str = "float32", device: str = "cpu") -> Any:
    """A random-init Llava (or LLaVA-cls) model for ``config``, created directly on ``device`` in ``dtype``.

    float32 on the CPU uses the plain constructor (the tiny test models' bytes depend on it); anything else goes
    through transformers' ``_from_config`` under ``torch.device(device)``, so a 7B model is initialised on the GPU
    in bf16 rather than materialised on the CPU first. ``device="meta"`` builds shapes only (no memory)."""
    from perceive_ray.models.llava import (
        LlavaClsForConditionalGeneration,
        LlavaForConditionalGeneration,
        select_feature_of,
    )

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    kind = LlavaClsForConditionalGeneration if select_feature_of(config) == "cls" else LlavaForConditionalGeneration
    target = torch.device(device)
    devices = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # keep the callers' RNG state
        torch.manual_seed(seed)
        if dtype == "float32" and target.type == "cpu":
            model = kind(config)
        else:
            with torch.device(target):
                model = kind._from_config(config, dtype=_DTYPES[dtype])
    return model.eval()


def save_llava(path: str | Path, *, seed: int = 0, template: str = "chat", select_feature: str = "patch",
               image_size: int, patch_size: int, vision_width: int, vision_layers: int, vision_heads: int,
               vision_intermediate: int, projection_dim: int | None = None, projector: str = "mlp2x_gelu",
               text_width: int, text_layers: int, text_heads: int, text_kv_heads: int | None = None,
               text_intermediate: int, vocab_size: int | None = None, max_positions: int = 2048,
               rms_norm_eps: float | None = None, initializer_range: float | None = None, tokenizer: Any = None,
               tokenizer_vocab: int = 1000, dtype: str = "float32", device: str = "cpu",
               max_shard_size: str = "50GB") -> Path:
    """Write a random-init LLaVA of the given size + tokenizer + CLIP image processor + sidecar; return ``path``.

    ``tokenizer``: None trains the offline LLaMA-like BPE (``build_tiny_tokenizer``, ``tokenizer_vocab`` tokens;
    the llama3 template gets ``<|begin_of_text|>`` as BOS and ``<pad>`` as pad, the others ``<s>`` / ``<unk>``),
    else a tokenizer object holding ``<image>``, ``</s>`` and the template's tokens. ``vocab_size`` can exceed the
    tokenizer (e.g. LLaVA-1.5-7B's 32001 rows with the offline tokenizer): the softmax then spans every row.
    """
    from transformers import CLIPImageProcessorPil

    from perceive_ray.models.chat_templates import TEMPLATES
    from perceive_ray.models.llava import SIDECAR, build_tiny_tokenizer

    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        bos, pad = ("<|begin_of_text|>", "<pad>") if template == "llama3" else ("<s>", "<unk>")
        tokenizer = build_tiny_tokenizer(bos=bos, pad=pad, vocab_size=tokenizer_vocab)
    config = build_llava_config(
        template=template, select_feature=select_feature, tokenizer=tokenizer, image_size=image_size,
        patch_size=patch_size, vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_heads,
        vision_intermediate=vision_intermediate, projection_dim=projection_dim, projector=projector,
        text_width=text_width, text_layers=text_layers, text_heads=text_heads, text_kv_heads=text_kv_heads,
        text_intermediate=text_intermediate, vocab_size=vocab_size, max_positions=max_positions,
        rms_norm_eps=rms_norm_eps, initializer_range=initializer_range)
    model = build_llava_model(config, seed=seed, dtype=dtype, device=device)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    del model
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    (path / SIDECAR).write_text(json.dumps({"template": template}, indent=2) + "\n", encoding="utf-8")
    return path


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
