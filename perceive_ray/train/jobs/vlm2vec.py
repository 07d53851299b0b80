"""LLaVA-1.5 converted to a contrastive embedding model, VLM2Vec-style (PROTOCOLS §5.6, TRAINING.md §4).

Adapter: peft DoRA, r 8 / alpha 64 / dropout 0.1, gaussian init, on the LLM's q/k/v/o/down_proj only (the
scorer's ``build_vlm2vec_adapter_config``, which asserts the vision tower and the projector are untouched); every
other weight is frozen, and the frozen tower + projector run without autograd.

Pairs (``vlm2vec_pair``): LCS-558K rows: query = image + first human turn (holds ``<image>``), target = first gpt
turn. mix-665K rows: a human turn drawn per (seed, epoch, sample key); the target is the gpt turn after it; a turn
holding ``<image>`` is used as is, otherwise image rows get ``<image> Represent the given image with the following
question: {q}`` and text-only rows ``Find the text that can answer the given query: {q}``. Tokenised as the
VLM2Vec scorer does: ``<image>`` expanded to V image ids (the llava-hf processor's rule), the tokenizer's BOS, right
padding; targets are text alone. Truncation at ``train.vlm2vec.max_length`` (right) never cuts an image span.

Embedding: the final hidden state at the last non-pad position, L2-normalised (``compute_last_token_embeddings``).
Loss: one-directional InfoNCE query -> target over the GLOBAL batch, logits = Q Tᵀ / 0.02, embeddings gathered from
every worker with gradient (``losses.gather_with_grad``), mean cross-entropy over all rows: the same objective for
any worker count. GradCache (``train/gradcache.py``) keeps all ``train.batch.global`` rows as negatives at any
memory: queries are cut into ``train.batch.micro`` rows per chunk, targets into ``train.batch.micro_target``.

Export: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, keys in the transformers 5 layout)
with ``base_model_name_or_path`` = the base model's absolute path or hub id: ``model.family: vlm2vec`` with
``model.source: train:<run id>`` loads it (``models/vlm2vec.py::load_vlm2vec``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from perceive_ray.config import ConfigError
from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER
from perceive_ray.models.vlm2vec import (
    ADAPTER_CONFIG,
    build_vlm2vec_adapter,
    build_vlm2vec_adapter_config,
    compute_last_token_embeddings,
)
from perceive_ray.randomness import keyed_rng
from perceive_ray.train import losses
from perceive_ray.train.jobs import llava_common
from perceive_ray.train.jobs.base import DataSpec, count_parameters
from perceive_ray.training_config import TrainExperimentConfig

IMAGE_QUERY = "<image> Represent the given image with the following question: {}"
TEXT_QUERY = "Find the text that can answer the given query: {}"
TURN_PURPOSE = "vlm2vec_turn"


class PairError(ValueError):
    """A sample that yields no valid (query, target) pair; the message names it."""


def data_spec(config: TrainExperimentConfig) -> DataSpec:
    return DataSpec(transform=None, kind="conversations",
                    images=llava_common.image_spec(str(config.model.source), config.train.vlm2vec.image_preprocess),
                    keep_text_only=True, order="random", caption_turn="vlm2vec",
                    extra={"formats": {s.name: s.format for s in config.data.sources}})


def vlm2vec_pair(sample: Any, *, fmt: str, seed: int, epoch: int) -> tuple[str, str]:
    """(query text, target text) of one sample (§5.6); ``fmt`` is its source's format (pretrain | mix)."""
    humans, gpts = list(sample.human_turns), list(sample.gpt_turns)
    if not humans or not gpts:
        raise PairError(f"sample {sample.key}: no human/gpt turn pair")
    if fmt == "pretrain":
        index = 0
    else:
        index = int(keyed_rng(seed, TURN_PURPOSE, int(epoch), str(sample.key)).integers(min(len(humans), len(gpts))))
    return pair_for_turn(sample, index, fmt=fmt)


def pair_for_turn(sample: Any, index: int, *, fmt: str) -> tuple[str, str]:
    """The (query, target) of human turn ``index`` and the gpt turn after it."""
    key, has_image = str(sample.key), sample.image is not None
    query, target = sample.human_turns[index], sample.gpt_turns[index]
    if fmt == "pretrain" and query.count(IMAGE_PLACEHOLDER) != 1:
        raise PairError(f"sample {key}: a 558K query must hold exactly one {IMAGE_PLACEHOLDER}")
    if IMAGE_PLACEHOLDER in query:
        if not has_image or query.count(IMAGE_PLACEHOLDER) != 1:
            raise PairError(f"sample {key}: turn {index} holds {query.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
                            f"but the sample has {'an' if has_image else 'no'} image")
    elif has_image:
        query = IMAGE_QUERY.format(query)
    else:
        query = TEXT_QUERY.format(query)
    if IMAGE_PLACEHOLDER in target:
        raise PairError(f"sample {key}: target turn {index} holds {IMAGE_PLACEHOLDER}")
    return query, target


def check_samples(config: TrainExperimentConfig, samples: list[Any]) -> None:
    """Every turn any epoch can draw yields a valid pair (errors name the source, file and row; exit 2)."""
    sources = {s.name: s for s in config.data.sources}
    for sample in samples:
        fmt = sources[sample.source].format
        turns = 1 if fmt == "pretrain" else min(len(sample.human_turns), len(sample.gpt_turns))
        try:
            if turns == 0:
                raise PairError(f"sample {sample.key}: no human/gpt turn pair")
            for index in range(turns):
                pair_for_turn(sample, index, fmt=fmt)
        except PairError as exc:
            raise ConfigError(f"data.sources[{sample.source}] {sources[sample.source].path} row {sample.row}: "
                              f"{exc}") from None


class Vlm2VecEmbedder(nn.Module):
    """The trainable module: queries and targets of one chunk -> L2-normalised last-token embeddings."""

    def __init__(self, net: nn.Module, llava: nn.Module) -> None:
        super().__init__()
        self.net = net  # the peft model
        self._llava = [llava]

    @property
    def llava(self) -> nn.Module:
        return self._llava[0]

    def embed(self, side: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = llava_common.encode(self.llava, side["input_ids"], side["attention_mask"], side.get("pixels"),
                                     side["has_image"], train_vision=False)
        return compute_last_token_embeddings(hidden, side["attention_mask"])  # (B, D) fp32

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for side in ("query", "target"):
            if batch[side] is not None:
                out[side] = self.embed(batch[side])
            else:  # this chunk has no rows of this side (query and target chunk sizes differ)
                width = self.llava.config.text_config.hidden_size
                out[side] = torch.zeros((0, width), device=batch["device_probe"].device)
        return out


class Vlm2VecJob:
    name = "vlm2vec"

    def __init__(self, config: TrainExperimentConfig, *, device: torch.device) -> None:
        self.config = config
        self.options = config.train.vlm2vec
        parts = llava_common.build_llava(config, seed=config.seed, device=device)
        if parts.select_feature != "patch":
            raise ConfigError(f"model.source {config.model.source}: VLM2Vec converts a patch-feature LLaVA, "
                              f"got {parts.select_feature!r}")
        self.parts = parts
        model = parts.model
        model.requires_grad_(False)
        if self.options.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        adapter = self.options.adapter
        self.peft_config = build_vlm2vec_adapter_config(
            r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, use_dora=adapter.use_dora,
            init_lora_weights="gaussian" if adapter.init == "gaussian" else True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)  # identical adapter init on every rank
            net = build_vlm2vec_adapter(model, config=self.peft_config)
        net.train()
        self.module = Vlm2VecEmbedder(net, model)
        self.formats = {s.name: s.format for s in config.data.sources}
        self.pad_id = parts.tokenizer.pad_token_id
        self.micro = config.train.batch.micro
        self.micro_target = config.train.batch.micro_target or config.train.batch.micro

    def parameter_groups(self) -> list[dict[str, Any]]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the VLM2Vec adapter has no trainable parameters")
        return [{"params": params, "weight_decay": self.config.train.optim.weight_decay}]

    def init_checksum(self) -> dict[str, str]:
        adapter = nn.ModuleDict({n.replace(".", "_"): m for n, m in self.module.named_modules()
                                 if n.endswith(("lora_A", "lora_B", "lora_magnitude_vector"))})
        return {"adapter_init": llava_common.tensor_checksum(adapter)}

    # -- inputs -----------------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, key: str, image: bool) -> list[int]:
        v = self.parts.num_visual_tokens
        ids = list(self.parts.tokenizer(text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * v))["input_ids"])
        limit = self.options.max_length
        if len(ids) > limit:
            image_id = self.parts.image_token_id
            if image and image_id in ids[limit:]:
                raise PairError(f"sample {key}: truncating to train.vlm2vec.max_length={limit} would cut its image "
                                f"span ({len(ids)} tokens)")
            ids = ids[:limit]
        if image and ids.count(self.parts.image_token_id) != v:
            raise PairError(f"sample {key}: query holds {ids.count(self.parts.image_token_id)} image ids, not {v}")
        return ids

    def _side(self, sequences: list[list[int]], has_image: list[bool], pixels: torch.Tensor | None,
              device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), int(self.pad_id), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, :len(seq)] = 1
        side = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "has_image": torch.tensor(has_image, dtype=torch.bool, device=device)}
        if pixels is not None:
            side["pixels"] = pixels.to(device)
        return side

    def collate_chunks(self, chunks: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
        """All rows of the step -> chunk i = (query rows of query chunk i, target rows of target chunk i)."""
        rows = {k: [v for chunk in chunks for v in chunk[k]] for k in ("key", "has_image", "humans", "gpts", "epoch")}
        pixels = torch.as_tensor(np.concatenate([c["pixels"] for c in chunks]))
        queries, targets = [], []
        for i, key in enumerate(rows["key"]):
            source = str(key).split(":", 1)[0]
            sample = SimpleNamespace(key=str(key), image="image" if rows["has_image"][i] else None,
                                     human_turns=json.loads(rows["humans"][i]), gpt_turns=json.loads(rows["gpts"][i]))
            query, target = vlm2vec_pair(sample, fmt=self.formats[source], seed=self.config.seed,
                                         epoch=int(rows["epoch"][i]))
            uses_image = IMAGE_PLACEHOLDER in query
            queries.append(self.tokenize(query, key=str(key), image=uses_image))
            targets.append(self.tokenize(target, key=str(key), image=False))
        n = len(queries)
        n_chunks = len(chunks)
        out = []
        for c in range(n_chunks):
            q = slice(c * self.micro, (c + 1) * self.micro)
            t = slice(c * self.micro_target, (c + 1) * self.micro_target)
            q_rows = list(range(n))[q]
            t_rows = list(range(n))[t]
            batch: dict[str, Any] = {"device_probe": torch.empty(0, device=device), "query": None, "target": None}
            if q_rows:
                has = [bool(rows["has_image"][i]) for i in q_rows]
                px = pixels[q_rows] if any(has) else None
                batch["query"] = self._side([queries[i] for i in q_rows], has, px, device)
            if t_rows:
                batch["target"] = self._side([targets[i] for i in t_rows], [False] * len(t_rows), None, device)
            out.append(batch)
        return out

    # -- loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, reps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = compute_vlm2vec_loss(reps["query"], reps["target"], self.options.temperature)
        return loss, {}

    def after_step(self, module: nn.Module, gathered: Any = None) -> None:
        return None

    # -- export -----------------------------------------------------------------------------------------------
    def export(self, module: nn.Module, out_dir: Path) -> dict[str, Any]:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(module.net, save_embedding_layers=False)
        empty = [k for k, v in state.items() if v.numel() == 0]
        if not state or empty:
            raise RuntimeError(f"the adapter to export is empty ({empty[:3]})")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()},
                  str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        payload = self.peft_config.to_dict()
        payload["base_model_name_or_path"] = str(self.config.model.source)
        payload["inference_mode"] = True
        payload = {k: (sorted(v) if isinstance(v, set) else v) for k, v in payload.items()}
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        return {"layout": "peft adapter (VLM2Vec scorer: model.family vlm2vec)", "model_source": str(out_dir),
                "base": str(self.config.model.source), "tensors": len(state),
                "files": [ADAPTER_CONFIG, "adapter_model.safetensors"]}

    def describe(self) -> dict[str, Any]:
        return {"job": self.name, "adapter": self.options.adapter.model_dump(), "temperature": self.options.temperature,
                "query_chunk": self.micro, "target_chunk": self.micro_target, **count_parameters(self.module)}


def compute_vlm2vec_loss(queries: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE query -> target over the global batch (rank order), mean over all rows; every rank returns it."""
    all_q = losses.gather_with_grad(queries)  # (N, D)
    all_t = losses.gather_with_grad(targets)  # (N, D)
    logits = all_q @ all_t.T / temperature
    labels = torch.arange(all_q.shape[0], device=logits.device)
    return torch.nn.functional.cross_entropy(logits, labels)


def build_job(config: TrainExperimentConfig, *, device: torch.device) -> Vlm2VecJob:
    return Vlm2VecJob(config, device=device)
