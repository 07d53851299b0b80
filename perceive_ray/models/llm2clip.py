"""LLM2CLIP loader: the finetuned CLIP vision tower, its text adapter, and an LLM2Vec text encoder or a vector store.

PROTOCOLS §3.3 / §5.5. The real model is two hub repos, both remote code, so ``ModelConfig.trust_remote_code`` must
be true (checked before anything is downloaded):

- vision + adapter: ``microsoft/LLM2CLIP-Openai-L-14-336`` through ``AutoModel``. It exposes ``vision_model`` (a CLIP
  ViT-L/14-336), ``get_image_features(pixel_values)`` (post-LN CLS -> projection, 1280-d) and
  ``get_text_features(x)`` (the adapter: 4096-d LLM vector -> 1280-d); images go through the ``CLIPImageProcessor``
  of ``openai/clip-vit-large-patch14-336`` (PIL backend, as the reference's slow processor).
- text: ``microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned`` through ``AutoModel``, pooled the LLM2Vec way
  (``pooling_mode="mean"``, ``max_length=512``, no instruction, the Llama-3-Instruct wrapping that the reference
  switches on by renaming the config to ``meta-llama/Meta-Llama-3-8B-Instruct``), giving 4096-d vectors.

Instead of the online LLM, the 4096-d vectors can come from a ``TextEmbeddingStore`` (``text_embeddings=``); the LLM
is then not loaded at all, and the store's manifest must name the same encoder.

A local directory with ``perceive_ray.json`` whose ``format`` is ``tiny`` (written by ``save_tiny_llm2clip``) needs no
remote code; its parts stand in for the real classes one to one:

| tiny part (transformers class / ours)            | stands in for                                             |
|--------------------------------------------------|-----------------------------------------------------------|
| ``vision/``: ``CLIPVisionModelWithProjection``    | the remote model's ``vision_model`` + ``visual_projection``|
| ``adapter.safetensors``: ``TextAdapter``          | the remote model's text adapter behind ``get_text_features``|
| ``text/``: ``LlamaModel`` + tokenizer             | the remote LLM2Vec Llama-3 encoder + its tokenizer         |
| ``processor/``: ``CLIPImageProcessorPil``         | ``openai/clip-vit-large-patch14-336``'s processor          |

``TinyLlm2ClipModel`` puts the first two behind the remote model's attribute names, so every caller runs the same code
for both. Any other local directory (e.g. a downloaded snapshot of the hub repo) takes the real, remote-code path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perceive_ray.config import ConfigError, ModelConfig
from perceive_ray.models.text_embeddings import (
    MissingTextEmbeddingError,
    TextEmbeddingError,
    TextEmbeddingStore,
)

SIDECAR = "perceive_ray.json"
TINY_FORMAT = "tiny"
ADAPTER_FILE = "adapter.safetensors"
LLM2VEC_SEPARATOR = "!@#$%^&*()"  # LLM2Vec splits instruction | text on this marker
LLAMA3_USER_PREFIX = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_EOT = "<|eot_id|>"
LLM2VEC_TEMPLATES = ("llama3_instruct", "none")
MAX_LENGTH = 512
POOLING = "mean"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Facts of the hub ids that have no sidecar (PROTOCOLS §3.3).
KNOWN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "microsoft/LLM2CLIP-Openai-L-14-336": {
        "text_model": "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned",
        "image_processor": "openai/clip-vit-large-patch14-336",
    },
}
KNOWN_TEXT_MODELS: dict[str, dict[str, Any]] = {
    "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned": {"template": "llama3_instruct", "llm_dim": 4096},
}


def compute_llm2vec_inputs(text: str, template: str) -> tuple[str, str]:
    """LLM2Vec's string handling for one text with no instruction -> (full text to tokenize, pooled part).

    ``encode`` builds ``" " + SEP + text``; the Llama-3-Instruct wrapping strips that and appends ``<|eot_id|>``
    (so the text's trailing whitespace goes, its leading whitespace stays); the text after SEP is the part whose
    token count decides how many final positions are mean-pooled.
    """
    if template not in LLM2VEC_TEMPLATES:
        raise ValueError(f"unknown LLM2Vec template {template!r}; known: {LLM2VEC_TEMPLATES}")
    joined = f" {LLM2VEC_SEPARATOR}{text}"
    if template == "llama3_instruct":
        joined = LLAMA3_USER_PREFIX + joined.strip() + LLAMA3_EOT
    head, _, tail = joined.partition(LLM2VEC_SEPARATOR)
    return head + tail, tail


@dataclass
class Llm2VecEncoder:
    """Mean-pooled LLM2Vec text vectors: mean of the final hidden states over the text's own tokens.

    Sequences are padded on the right (LLM2Vec pads left; with RoPE positions both give the same vectors, and right
    padding keeps every text's positions 0..L-1 whatever else is in the batch, so vectors are batch-invariant).
    """

    model: nn.Module
    tokenizer: Any
    template: str
    max_length: int = MAX_LENGTH
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def token_ids(self, text: str) -> tuple[list[int], int]:
        """Token ids of the full text (special tokens, truncated to max_length) and the pooled-span length."""
        full, part = compute_llm2vec_inputs(text, self.template)
        ids = self.tokenizer(full, truncation=True, max_length=self.max_length)["input_ids"]
        span = self.tokenizer(part, truncation=True, max_length=self.max_length, add_special_tokens=False)
        return list(ids), min(len(span["input_ids"]), len(ids))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """T texts -> (T, D_llm) float32 on CPU."""
        out = []
        for begin in range(0, len(texts), batch_size):
            encoded = [self.token_ids(t) for t in texts[begin: begin + batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.zeros(len(encoded), width, dtype=torch.long)  # right padding; pad id is never attended
            mask = torch.zeros(len(encoded), width, dtype=torch.long)
            pool = torch.zeros(len(encoded), width)
            for b, (row, span) in enumerate(encoded):
                ids[b, : len(row)] = torch.tensor(row)
                mask[b, : len(row)] = 1
                pool[b, len(row) - span: len(row)] = 1.0  # the last `span` real tokens, as LLM2Vec's embed_mask
            output = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (B, L, D)
            pool = pool.to(self.device)
            pooled = torch.einsum("bl,bld->bd", pool, hidden.float()) / pool.sum(1, keepdim=True).clamp(min=1)
            out.append(pooled.cpu())
        if not out:
            return torch.zeros(0, int(self.model.config.hidden_size))
        return torch.cat(out)


class TextAdapter(nn.Module):
    """Tiny stand-in for LLM2CLIP's text adapter: residual MLP blocks -> LayerNorm -> Linear(D_llm, D_proj)."""

    def __init__(self, in_dim: int, out_dim: int, *, blocks: int = 1, expansion: int = 2) -> None:
        super().__init__()
        self.config = {"in_dim": in_dim, "out_dim": out_dim, "blocks": blocks, "expansion": expansion}
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim * expansion), nn.GELU(),
                          nn.Linear(in_dim * expansion, in_dim))
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.proj(self.norm(x))


class TinyLlm2ClipModel(nn.Module):
    """The remote LLM2CLIP model's interface over the tiny parts (see the module docstring)."""

    def __init__(self, vision: nn.Module, text_adapter: TextAdapter) -> None:
        super().__init__()
        self.vision_model = vision.vision_model
        self.visual_projection = vision.visual_projection
        self.text_adapter = text_adapter

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D_proj): post-LN CLS through the visual projection."""
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D_llm) LLM2Vec vectors -> (B, D_proj)."""
        return self.text_adapter(inputs)


def as_features(output: Any) -> torch.Tensor:
    """A tensor from ``get_*_features``: remote code returns tensors, transformers 5 returns output objects."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot read features from a {type(output).__name__}")


@dataclass
class Llm2ClipBundle:
    """A loaded LLM2CLIP (eval mode, frozen) with its image processor and one text source (LLM or store)."""

    model: nn.Module
    image_processor: Any
    text_encoder: Llm2VecEncoder | None
    text_store: TextEmbeddingStore | None
    text_meta: dict[str, Any]
    llm_dim: int | None
    image_size: tuple[int, int]
    vision_dim: int
    num_patches: int
    projection_dim: int
    dtype: torch.dtype
    device: torch.device
    source: str

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 (H, W, 3) images -> (B, 3, S, S) via the CLIPImageProcessor (resize, centre crop, CLIP norm)."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D_proj) fp32, ``get_image_features`` (not normalised)."""
        features = self.model.get_image_features(pixel_values.to(self.device, self.dtype))
        return as_features(features).float()

    @torch.inference_mode()
    def vision_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D_v) fp32: ``vision_model(...).last_hidden_state[:, 1:]`` (before post-LN)."""
        out = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype), return_dict=True)
        patches = out.last_hidden_state[:, 1:]
        if patches.shape[1] != self.num_patches:
            raise RuntimeError(f"expected {self.num_patches} patch tokens, got {patches.shape[1]}")
        return patches.float()

    def encode_llm(self, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """T texts -> (T, D_llm) fp32 LLM2Vec vectors, from the store when one is attached, else online."""
        if self.text_store is not None:
            return torch.from_numpy(self.text_store.lookup(list(texts)))
        if self.text_encoder is None:
            raise RuntimeError("this bundle has neither a text encoder nor a text embedding store")
        return self.text_encoder.encode(list(texts), batch_size=batch_size)

    @torch.inference_mode()
    def adapt_text(self, vectors: torch.Tensor) -> torch.Tensor:
        """(T, D_llm) -> (T, D_proj) fp32 through the frozen adapter (``get_text_features``)."""
        return as_features(self.model.get_text_features(vectors.to(self.device, self.dtype))).float()

    def encode_text(self, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """T texts -> (T, D_proj) fp32 (not normalised)."""
        return self.adapt_text(self.encode_llm(texts, batch_size=batch_size))


def read_sidecar(source: str) -> dict[str, Any] | None:
    path = Path(source).expanduser() / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model.source: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.source: {path} must hold a JSON object")
    return data


def load_llm2clip(model: ModelConfig, *, text_embeddings: str | Path | None = None, text_model: str | None = None,
                  text_revision: str | None = None, image_processor: str | None = None,
                  device: str | torch.device | None = None) -> Llm2ClipBundle:
    """Load LLM2CLIP (hub id / snapshot via remote code, or a tiny directory) with an online or stored text path.

    ``text_model`` / ``text_revision`` / ``image_processor`` override the known-id defaults of the real path;
    ``text_embeddings`` (a store directory) replaces the online LLM, whose manifest must match the encoder.
    """
    if model.family != "llm2clip":
        raise ConfigError(f"model.family: the LLM2CLIP loader needs family 'llm2clip', got {model.family!r}")
    if model.dtype not in _DTYPES:
        raise ConfigError(f"model.dtype {model.dtype!r} is not supported for LLM2CLIP")
    sidecar = read_sidecar(model.source)
    is_tiny = sidecar is not None and sidecar.get("format") == TINY_FORMAT
    if not is_tiny and not model.trust_remote_code:
        raise ConfigError(
            f"model.trust_remote_code: {model.source!r} is an LLM2CLIP checkpoint whose model code lives in its "
            "hub repo (as does the LLM2Vec text encoder's); set model.trust_remote_code: true to opt in to running "
            "that code (nothing was downloaded)"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype = _DTYPES[model.dtype]
    store = _open_store(text_embeddings)
    if is_tiny:
        if any(v is not None for v in (text_model, text_revision, image_processor)) or model.revision is not None:
            raise ConfigError(f"model.source: {model.source} is a tiny LLM2CLIP directory; text_model, "
                              "text_revision, image_processor and model.revision do not apply")
        net, processor, encoder, meta, llm_dim = _load_tiny(Path(model.source).expanduser(), sidecar, dtype,
                                                            device, load_text=store is None)
    else:
        net, processor, encoder, meta, llm_dim = _load_remote(model, dtype, device, text_model, text_revision,
                                                     image_processor, load_text=store is None)
    net.eval().requires_grad_(False)
    if store is not None:
        expected = dict(meta) if llm_dim is None else {**meta, "dim": llm_dim}
        try:
            store.check_compatible(expected, source="text_embeddings")
        except TextEmbeddingError as exc:
            raise ConfigError(str(exc)) from None
    vision_cfg = getattr(net.vision_model, "config", None) or net.config.vision_config
    size = int(vision_cfg.image_size)
    return Llm2ClipBundle(
        model=net, image_processor=processor, text_encoder=encoder, text_store=store, text_meta=meta, llm_dim=llm_dim,
        image_size=(size, size), vision_dim=int(vision_cfg.hidden_size),
        num_patches=(size // int(vision_cfg.patch_size)) ** 2, projection_dim=int(net.visual_projection.out_features),
        dtype=dtype, device=device, source=model.source,
    )


def _open_store(path: str | Path | None) -> TextEmbeddingStore | None:
    if path is None:
        return None
    try:
        return TextEmbeddingStore(path)
    except TextEmbeddingError as exc:
        raise ConfigError(f"text_embeddings: {exc}") from None


def build_text_meta(model: str, revision: str | None, template: str, max_length: int) -> dict[str, Any]:
    """The encoder description a store's manifest must repeat: pass it as ``write_text_embeddings(meta=...)``."""
    return {"encoder": "llm2vec", "model": model, "revision": revision, "pooling": POOLING, "max_length": max_length,
            "template": template, "instruction": ""}


def _load_tiny(path: Path, sidecar: dict[str, Any], dtype: torch.dtype, device: torch.device, *, load_text: bool):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModelWithProjection, LlamaModel

    vision = CLIPVisionModelWithProjection.from_pretrained(path / "vision", dtype=dtype, use_safetensors=True)
    adapter = TextAdapter(**sidecar["adapter"])
    adapter.load_state_dict(load_file(str(path / ADAPTER_FILE)), strict=True)
    net = TinyLlm2ClipModel(vision, adapter.to(dtype)).to(device)
    processor = CLIPImageProcessorPil.from_pretrained(path / "processor")
    text = sidecar["text"]
    meta = build_text_meta(text["name"], None, text["template"], int(text["max_length"]))
    encoder = None
    if load_text:
        llm = LlamaModel.from_pretrained(path / "text", dtype=dtype, use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path / "text")
        encoder = Llm2VecEncoder(llm, tokenizer, text["template"], int(text["max_length"]), device)
    return net, processor, encoder, meta, int(sidecar["adapter"]["in_dim"])


def _load_remote(model: ModelConfig, dtype: torch.dtype, device: torch.device, text_model: str | None,
                 text_revision: str | None, image_processor: str | None, *, load_text: bool):
    from transformers import AutoModel, AutoTokenizer, CLIPImageProcessorPil

    known = KNOWN_CHECKPOINTS.get(model.source, {})
    text_model = text_model or known.get("text_model")
    image_processor = image_processor or known.get("image_processor")
    if text_model is None or image_processor is None:
        raise ConfigError(f"model.source: {model.source!r} is not a known LLM2CLIP id; set the scorer options "
                          "text_model and image_processor")
    text_known = KNOWN_TEXT_MODELS.get(text_model, {})
    template = text_known.get("template", "none")
    net = AutoModel.from_pretrained(model.source, revision=model.revision, trust_remote_code=True, dtype=dtype)
    net = net.to(device)
    processor = CLIPImageProcessorPil.from_pretrained(image_processor)
    encoder, dim = None, text_known.get("llm_dim")
    if load_text:
        llm = AutoModel.from_pretrained(text_model, revision=text_revision, trust_remote_code=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(text_model, revision=text_revision)
        encoder = Llm2VecEncoder(llm.to(device).eval(), tokenizer, template, MAX_LENGTH, device)
        dim = int(llm.config.hidden_size)
    return net, processor, encoder, build_text_meta(text_model, text_revision, template, MAX_LENGTH), dim


# ---------------------------------------------------------------------------------------------------------------
# Tiny offline checkpoint (random init), read by the tiny branch of load_llm2clip.

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8  # -> 16 patches
TINY_VISION_DIM = 32
TINY_PROJECTION_DIM = 24
TINY_LLM_DIM = 48


def save_tiny_llm2clip(path: str | Path, *, seed: int = 0) -> Path:
    """Write a random-init tiny LLM2CLIP directory (see the module docstring for the parts) and return it."""
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        LlamaConfig,
        LlamaModel,
    )

    from perceive_ray.models.llava import build_tiny_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(bos="<|begin_of_text|>", pad="<pad>")
    ids = tokenizer.convert_tokens_to_ids
    # init range 0.2 (not 0.02) so the random towers are sensitive to content and position
    vision_cfg = CLIPVisionConfig(hidden_size=TINY_VISION_DIM, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE,
                                  projection_dim=TINY_PROJECTION_DIM, initializer_range=0.2)
    text_cfg = LlamaConfig(hidden_size=TINY_LLM_DIM, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                           bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|eot_id|>"),
                           pad_token_id=ids("<pad>"), initializer_range=0.2)
    adapter_cfg = {"in_dim": TINY_LLM_DIM, "out_dim": TINY_PROJECTION_DIM, "blocks": 1, "expansion": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = CLIPVisionModelWithProjection(vision_cfg)
        llm = LlamaModel(text_cfg)
        adapter = TextAdapter(**adapter_cfg)
        with torch.no_grad():  # move LayerNorm affine params off identity so loading them is checked
            for parameter in adapter.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    vision.save_pretrained(path / "vision")
    llm.save_pretrained(path / "text")
    tokenizer.save_pretrained(path / "text")
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path / ADAPTER_FILE))
    CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE},
                          crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(
        path / "processor")
    weights = hashlib.sha256((path / "text" / "model.safetensors").read_bytes()).hexdigest()[:16]
    sidecar = {
        "family": "llm2clip",
        "format": TINY_FORMAT,
        "adapter": adapter_cfg,
        # The store key: a name that changes with the text weights, so vectors of another tiny LLM are refused.
        "text": {"name": f"tiny-llm2vec-{weights}", "template": "llama3_instruct", "max_length": MAX_LENGTH},
        "stands_in_for": {
            "vision": "microsoft/LLM2CLIP-Openai-L-14-336 vision_model + visual_projection",
            "adapter": "microsoft/LLM2CLIP-Openai-L-14-336 get_text_features (text adapter)",
            "text": "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned via LLM2Vec (mean, 512)",
            "processor": "openai/clip-vit-large-patch14-336 CLIPImageProcessor",
        },
    }
    (path / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return path


def encode_llm_checked(bundle: Llm2ClipBundle, texts: list[str], batch_size: int) -> torch.Tensor:
    """(T, D_llm) LLM2Vec vectors; a text missing from the store is a configuration error, not a crash."""
    try:
        return bundle.encode_llm(texts, batch_size=batch_size)
    except MissingTextEmbeddingError as exc:
        raise ConfigError(f"scorer.options.text_embeddings: {exc}") from None
