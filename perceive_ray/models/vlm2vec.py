"""VLM2Vec-converted LLaVA (PROTOCOLS §3.4, §5.6): a llava-hf LLaVA plus a peft LoRA/DoRA adapter, merged or not.

``load_vlm2vec(ModelConfig)`` accepts either

- a plain transformers-Llava directory / hub id whose adapter is already merged (no ``adapter_config.json``), or
- an adapter directory / hub id (``adapter_config.json`` + ``adapter_model.safetensors``) over a base LLaVA named by
  ``ModelConfig.pretrained`` or, failing that, by the adapter's ``base_model_name_or_path`` (the real adapter
  ``lst627/LLaVA-1.5-7B-VLM2Vec-LoRA`` sits on ``llava-hf/llava-1.5-7b-hf``). A relative base path that exists next
  to the adapter is resolved against the adapter directory (how ``save_tiny_vlm2vec`` writes it).

The base goes through ``load_llava``, so dtype, device and safe-loading rules are the LLaVA ones. The adapter is
merged on load by default (``merge_and_unload``), as the reference does; ``merge=False`` keeps the peft layers.
The real adapter's format is [U]: it was saved with a transformers 4.4x Llava class whose keys read
``language_model.model.layers...``; those legacy keys are renamed to the transformers 5 layout here, and every
adapter tensor in the file must land on a module (missing or unexpected adapter keys are errors, never ignored).

Pooling (§5.6): the final hidden layer (after the LM's final norm) at the last non-pad position of a right-padded
sequence, L2-normalised in fp32.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import LlavaProcessor

from perceive_ray.config import ConfigError, ModelConfig
from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER
from perceive_ray.models.llava import (
    SIDECAR,
    LlavaBundle,
    load_llava,
    save_tiny_llava,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
REFERENCE_BASE = "llava-hf/llava-1.5-7b-hf"
REFERENCE_ADAPTER = "lst627/LLaVA-1.5-7B-VLM2Vec-LoRA"

# §5.6 adapter: DoRA r 8 / alpha 64 / dropout 0.1, gaussian init, LLM q/k/v/o/down projections only. The
# reference's target list also names qkv_proj, gate_up_proj, out_proj (absent from LLaMA; out_proj is CLIP's) and
# excludes the vision tower; the projector's linear_1/linear_2 match nothing either way.
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
ADAPTER_EXCLUDE = r".*(vision_tower|multi_modal_projector).*"

# transformers 4.4x Llava keys -> transformers 5 keys (applied to adapter keys after the peft prefix).
LEGACY_KEY_MAPPING = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)
_PEFT_PREFIX = "base_model.model."


@dataclass
class Vlm2VecBundle:
    """A loaded VLM2Vec LLaVA: the LLaVA bundle (its ``model`` carries the adapter, merged or as peft layers),
    the llava-hf processor used for queries and targets, and where base and adapter came from."""

    llava: LlavaBundle
    processor: LlavaProcessor
    merged: bool  # True: plain weights (merged on load or pre-merged); False: live peft layers
    base_source: str
    adapter_source: str | None = None  # None for a pre-merged checkpoint
    adapter_config: dict[str, Any] = field(default_factory=dict)
    peft_model: PeftModel | None = None  # set only when merged is False

    @property
    def model(self):
        return self.llava.model

    @property
    def num_visual_tokens(self) -> int:
        return self.llava.num_visual_tokens


def build_vlm2vec_adapter_config(**overrides: Any) -> LoraConfig:
    """The §5.6 peft config (DoRA r 8, alpha 64, dropout 0.1, gaussian init, LLM q/k/v/o/down_proj only)."""
    kwargs: dict[str, Any] = {
        "r": 8, "lora_alpha": 64, "lora_dropout": 0.1, "init_lora_weights": "gaussian", "use_dora": True,
        "target_modules": list(ADAPTER_TARGETS), "exclude_modules": ADAPTER_EXCLUDE, "inference_mode": False,
    }
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def build_vlm2vec_adapter(model: torch.nn.Module, *, config: LoraConfig | None = None) -> PeftModel:
    """Wrap a Llava model with the §5.6 adapter; asserts only LLM projections are adapted (vision, projector frozen)."""
    peft_model = get_peft_model(model, config or build_vlm2vec_adapter_config())
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    wrong = [n for n in adapted if ".language_model." not in n or n.rsplit(".", 1)[-1] not in ADAPTER_TARGETS]
    if not adapted or wrong:
        raise ValueError(f"VLM2Vec adapter must target only the LLM's {ADAPTER_TARGETS}; got {wrong or 'nothing'}")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if trainable:
        raise ValueError(f"non-adapter parameters left trainable: {trainable[:5]}")
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _adapter_file(source: str, name: str, revision: str | None) -> Path | None:
    """``source/name`` for a local directory, else the hub file (None if the repo has no such file)."""
    local = Path(source)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, name, revision=revision))
    except EntryNotFoundError:
        return None


def _resolve_base(model: ModelConfig, adapter_config: dict[str, Any]) -> str:
    base = model.pretrained or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"VLM2Vec adapter {model.source!r} names no base model; set model.pretrained "
                          f"(the reference base is {REFERENCE_BASE!r})")
    relative = Path(model.source) / base
    if Path(model.source).is_dir() and not Path(base).is_absolute() and relative.is_dir():
        return str(relative)
    return str(base)


def load_adapter_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Adapter tensors from safetensors, or a ``.bin`` with ``torch.load(weights_only=True)``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def rename_legacy_adapter_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base_model.model.language_model.model.layers...`` (transformers 4.4x) -> the transformers 5 layout."""
    renamed = {}
    for key, value in state_dict.items():
        inner = key.removeprefix(_PEFT_PREFIX)
        for pattern, replacement in LEGACY_KEY_MAPPING:
            inner, count = re.subn(pattern, replacement, inner)
            if count:
                break
        new_key = _PEFT_PREFIX + inner if key.startswith(_PEFT_PREFIX) else inner
        if new_key in renamed:
            raise ValueError(f"adapter keys {key!r} and another key both map to {new_key!r}")
        renamed[new_key] = value
    return renamed


def attach_adapter(model: torch.nn.Module, adapter_config: dict[str, Any],
                   state_dict: dict[str, torch.Tensor], *, source: str) -> PeftModel:
    """Inject the adapter layers described by ``adapter_config`` and load ``state_dict`` into them, strictly."""
    if adapter_config.get("peft_type") != "LORA":
        raise ConfigError(f"{source}: VLM2Vec adapters are LoRA/DoRA, got peft_type {adapter_config.get('peft_type')!r}")
    # As LoraConfig.from_pretrained does after reading the file (drops keys of other peft versions, with a warning).
    kwargs = {k: v for k, v in adapter_config.items() if k != "runtime_config"}
    config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**kwargs))
    config.inference_mode = True
    peft_model = PeftModel(model, config)
    state_dict = rename_legacy_adapter_keys(state_dict)
    result = set_peft_model_state_dict(peft_model, state_dict)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        raise ConfigError(f"{source}: adapter weights do not fit the base model: "
                          f"unexpected {unexpected[:4]} ({len(unexpected)}), missing {missing[:4]} ({len(missing)})")
    # Belt and braces: every file tensor must be what the adapter now holds (peft drops keys it cannot place).
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    if set(loaded) != set(state_dict):
        raise ConfigError(f"{source}: adapter keys differ after loading: "
                          f"{sorted(set(loaded) ^ set(state_dict))[:4]}")
    for key, value in state_dict.items():
        if not torch.equal(loaded[key].cpu(), value.to(loaded[key].dtype).cpu()):
            raise ConfigError(f"{source}: adapter tensor {key!r} did not load verbatim")
    peft_model.eval()
    return peft_model


def build_processor(bundle: LlavaBundle) -> LlavaProcessor:
    """The llava-hf processor for this checkpoint: <image> expands to V positions, no chat template."""
    if bundle.select_feature != "patch":
        raise ConfigError(f"{bundle.source}: VLM2Vec needs a patch-feature LLaVA, got {bundle.select_feature!r}")
    config = bundle.model.config
    # llava-hf counts N patches + 1 (CLS) and drops 1 for the "default" strategy: V = N.
    processor = LlavaProcessor(image_processor=bundle.image_processor, tokenizer=bundle.tokenizer,
                               patch_size=config.vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               image_token=IMAGE_PLACEHOLDER, num_additional_image_tokens=1)
    return processor


def load_vlm2vec(model: ModelConfig, *, device: str | torch.device | None = None, merge: bool = True) -> Vlm2VecBundle:
    """Load a VLM2Vec LLaVA (pre-merged, or base + LoRA/DoRA adapter, merged on load unless ``merge=False``).

    ``model.revision`` applies to ``model.source`` (the adapter, or the merged checkpoint); the base of an adapter
    loads at its default revision. Conversation templates are irrelevant (VLM2Vec uses none).
    """
    config_file = _adapter_file(model.source, ADAPTER_CONFIG, model.revision)
    if config_file is None:  # a merged (plain Llava) checkpoint
        llava = load_llava(model.model_copy(update={"family": "llava"}), device=device, template="chat")
        return Vlm2VecBundle(llava=llava, processor=build_processor(llava), merged=True, base_source=model.source)
    adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    weights = next((f for f in (_adapter_file(model.source, n, model.revision) for n in ADAPTER_WEIGHTS) if f), None)
    if weights is None:
        raise ConfigError(f"{model.source}: {ADAPTER_CONFIG} but no {' / '.join(ADAPTER_WEIGHTS)}")
    base = _resolve_base(model, adapter_config)
    base_cfg = ModelConfig(family="llava", source=base, dtype=model.dtype, trust_remote_code=model.trust_remote_code)
    llava = load_llava(base_cfg, device=device, template="chat")
    state_dict = load_adapter_state_dict(weights)
    peft_model = attach_adapter(llava.model, adapter_config, state_dict, source=model.source)
    if merge:
        llava.model = peft_model.merge_and_unload()
        llava.model.eval()
        peft_model = None
    else:
        llava.model = peft_model.get_base_model()  # the same modules, with live peft layers inside
    return Vlm2VecBundle(llava=llava, processor=build_processor(llava), merged=merge, base_source=base,
                         adapter_source=model.source, adapter_config=adapter_config, peft_model=peft_model)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


def compute_last_token_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) final hidden states of right-padded rows -> (B, D) fp32 L2-normalised last non-pad states."""
    lengths = attention_mask.sum(dim=1)  # (B,)
    if bool((lengths < 1).any()):
        raise ValueError("an empty sequence has no last token")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not bool((attention_mask.bool() == (positions[None] < lengths[:, None])).all()):
        raise ValueError("last-token pooling needs right padding (attention_mask = 1...1 0...0)")
    reps = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (B, D)
    return torch.nn.functional.normalize(reps.float(), p=2, dim=-1)


def compute_embeddings(bundle: Vlm2VecBundle, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Forward (image + text, or text only) -> (B, D) normalised embeddings."""
    out = bundle.model.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             use_cache=False)
    return compute_last_token_embeddings(out.last_hidden_state, attention_mask)  # (B, T, D) -> (B, D)


# ---------------------------------------------------------------------------------------------------------------
# Tiny offline checkpoints


def save_tiny_vlm2vec(path: str | Path, *, seed: int = 0) -> Path:
    """Write ``path/base`` (tiny LLaVA) and, in ``path`` itself, a random §5.6 DoRA adapter over it.

    Gaussian init leaves lora_B = 0 (a no-op adapter), so lora_B and the DoRA magnitudes are redrawn from a
    seeded generator: the adapter then changes every embedding, and merge-vs-unmerge tests can fail.
    Returns ``path``: ``ModelConfig(family="vlm2vec", source=str(path))`` loads it.
    """
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    base = save_tiny_llava(path / "base", template="chat", seed=seed)
    net = LlavaForConditionalGeneration.from_pretrained(base, use_safetensors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        peft_model = build_vlm2vec_adapter(net)
        generator = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
                elif "lora_magnitude_vector" in name:
                    param.mul_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(path, save_embedding_layers=False)
    config_path = path / ADAPTER_CONFIG
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = "base"  # relative: resolved against the adapter directory
    config_path.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    (path / "README.md").unlink(missing_ok=True)
    return path


def save_merged_vlm2vec(model: ModelConfig, out_dir: str | Path) -> Path:
    """Merge an adapter checkpoint and write a plain Llava directory (weights, tokenizer, processor, sidecar)."""
    bundle = load_vlm2vec(model, merge=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(out)
    bundle.llava.tokenizer.save_pretrained(out)
    bundle.llava.image_processor.save_pretrained(out)
    (out / SIDECAR).write_text(json.dumps({"template": "chat", "vlm2vec_adapter": str(model.source)}, indent=2)
                               + "\n", encoding="utf-8")
    return out
