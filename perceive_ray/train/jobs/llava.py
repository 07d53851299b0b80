"""LLaVA-1.5 training, both stages, for ``select_feature: patch | cls`` (TRAINING.md §3, PROTOCOLS §5.7).

Stage ``projector`` (``scripts/v1_5/pretrain.sh``): only ``multi_modal_projector`` trains; ``plain`` conversation
(``<image>`` + caption + ``\\n``, caption and newline supervised) on LCS-558K-format data; image samples only.
Stage ``lora`` (``finetune_lora.sh``): peft LoRA (r 128, alpha 256, dropout 0.05) on every linear layer of the LLM
but ``lm_head`` (q, k, v, o, gate, up, down), the projector trainable in its own parameter group at
``train.llava.projector_lr``; vicuna ``v1`` conversation (answers + ``</s>`` supervised) on mix-665K-format data with
its text-only rows (a zero image still runs through the tower: ZeRO-3-safe), ``pad`` image preprocessing,
LLaVA's modality-grouped length-balanced order. The model comes from the stage-1 run: ``model.source:
train:<run id>``. Stage ``full`` (``finetune.sh``): as ``lora`` but the whole LLM trains (no adapter); it may also
assemble its model (``vision_tower`` set), which trains an LLM from scratch together with its projector.

Labels come from ``train/llava_labels.py`` (the scorer's templates, exactly V ignored image ids per image, a sample
whose supervised tokens do not match its rounds is a ``LabelError`` naming it), built in ``collate`` on the worker
and, before anything starts, for every sample on the driver (``check_samples``).

Loss: the mean next-token cross-entropy over the supervised tokens of the GLOBAL batch (all chunks, all workers):
each row contributes its summed token losses and the step divides by the global count of supervised tokens
(all-reduced before the forward), so the objective is the same for any worker count and chunking. (LLaVA's 2023
trainer averaged per-device token means; transformers' Trainer has normalised by the global token count across
accumulation since 4.46.) Chunks are plain gradient accumulation (no contrastive term: no GradCache needed).

Export (the final checkpoint's ``export/``): a full transformers Llava directory (the LoRA merged into the weights
for stage 2) with tokenizer, CLIP image processor and the ``perceive_ray.json`` sidecar, the layout ``load_llava``
and the VQAScore scorer read; stage 2 also keeps the unmerged adapter in ``export/adapter/`` (peft layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ray.config import ConfigError
from perceive_ray.train import llava_labels
from perceive_ray.train.jobs import llava_common
from perceive_ray.train.jobs.base import DataSpec, count_parameters
from perceive_ray.training_config import TrainExperimentConfig

# Every linear layer of the LLM but lm_head (LLaVA's find_all_linear_names drops the vision tower, the projector and
# lm_head); matched by regex on the full module name so the CLIP tower's q/k/v/out_proj never match.
LORA_TARGETS = r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ADAPTER_DIR = "adapter"
# Samples labelled on the driver before the run starts: all of them up to this many, else a seeded uniform subset of
# this size (~0.6-3 ms each: all of mix-665K would hold the driver for 7-30 min). Workers label every row anyway, and
# a LabelError there fails the run naming the sample (its checkpoints are kept).
CHECK_LIMIT = 20_000


def data_spec(config: TrainExperimentConfig) -> DataSpec:
    llava = config.train.llava
    source = llava.vision_tower or str(config.model.source)
    return DataSpec(transform=None, kind="conversations",
                    images=llava_common.image_spec(source, llava.resolved_preprocess()),
                    keep_text_only=llava.stage != "projector",
                    order="modality_length" if llava.resolved_grouping() else "random",
                    caption_turn="all")


def check_samples(config: TrainExperimentConfig, samples: list[Any], *, limit: int = CHECK_LIMIT) -> None:
    """Label every sample (or a seeded subset of ``limit``, see ``CHECK_LIMIT``) before any worker starts: a
    LabelError names the source, file and row (exit 2)."""
    import numpy as np

    tokenizer = llava_common.training_tokenizer(config)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    v = llava_common.num_visual_tokens_for(config)
    llava = config.train.llava
    chosen = range(len(samples)) if len(samples) <= limit else \
        np.sort(np.random.default_rng(config.seed).choice(len(samples), size=limit, replace=False))
    if len(samples) > limit:
        print(f"[train] labelling a seeded subset of {limit} of {len(samples)} samples before the start (the workers "
              "label every row)", flush=True)
    for index in chosen:
        sample = samples[int(index)]
        try:
            llava_labels.build_example(sample, conversation=llava.conversation(), tokenizer=tokenizer,
                                       image_token_id=image_token_id, num_visual_tokens=v,
                                       max_length=llava.max_length)
        except llava_labels.LabelError as exc:
            paths = {s.name: s.path for s in config.data.sources}
            raise ConfigError(f"data.sources[{sample.source}] {paths[sample.source]} row {sample.row}: {exc}") from None


class LlavaLanguageModel(nn.Module):
    """The trainable module: LLaVA's forward to per-row summed token losses and supervised-token counts."""

    def __init__(self, net: nn.Module, llava: nn.Module, *, train_vision: bool) -> None:
        super().__init__()
        self.net = net  # the peft model (stage 2) or the Llava model itself (stage 1)
        self._llava = [llava]  # the Llava model inside (not registered twice)
        self.train_vision = train_vision

    @property
    def llava(self) -> nn.Module:
        return self._llava[0]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        llava = self.llava
        hidden = llava_common.encode(llava, batch["input_ids"], batch["attention_mask"], batch["pixels"],
                                     batch["has_image"], train_vision=self.train_vision)
        logits = llava.lm_head(hidden[:, :-1]).float()  # (B, T-1, vocab): position t predicts token t+1
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=llava_labels.IGNORE_INDEX,
                                 reduction="none")  # (B, T-1), 0 where ignored
        return {"loss_sum": losses.sum(dim=1), "tokens": (targets != llava_labels.IGNORE_INDEX).sum(dim=1),
                "norm": batch["norm"]}


class LlavaJob:
    name = "llava"
    decomposable = True  # the loss is a sum over rows: chunks are plain gradient accumulation

    def __init__(self, config: TrainExperimentConfig, *, device: torch.device) -> None:
        self.config = config
        self.llava_cfg = config.train.llava
        self.device = device
        parts = llava_common.build_llava(config, seed=config.seed, device=device)
        self.parts = parts
        model = parts.model
        model.requires_grad_(False)
        stage = self.llava_cfg.stage
        if self.llava_cfg.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if stage in ("projector", "full"):
            net = model
        else:
            from peft import LoraConfig, get_peft_model

            lora = self.llava_cfg.lora
            # The projector trains too: as a peft module to save, so the adapter file carries it (LLaVA saved it
            # beside the LoRA weights as non_lora_trainables.bin) and base + adapter is the whole trained model.
            peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                     target_modules=LORA_TARGETS, use_dora=lora.use_dora, bias="none",
                                     init_lora_weights="gaussian" if lora.init == "gaussian" else True,
                                     modules_to_save=["multi_modal_projector"])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 1)  # identical LoRA A matrices on every rank
                net = get_peft_model(model, peft_config)
            adapted = [n for n, m in net.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)
                       and m.lora_A]
            if not adapted or any(".language_model." not in n or n.endswith("lm_head") for n in adapted):
                raise ConfigError(f"LoRA must adapt only the LLM's linear layers; adapted {adapted[:5]}")
            self.peft_config = peft_config
        if stage in ("projector", "full"):
            model.model.multi_modal_projector.requires_grad_(True)
        if stage == "full":  # finetune.sh: the whole LLM (embeddings and lm_head included); the tower stays frozen
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
        model.train()
        self.module = LlavaLanguageModel(net, model, train_vision=True)
        self.conversation = self.llava_cfg.conversation()
        self.pad_id = parts.tokenizer.pad_token_id

    # -- setup ------------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        projector = [p for n, p in self.module.named_parameters() if p.requires_grad and "multi_modal_projector" in n]
        if not projector:
            raise ValueError("the projector has no trainable parameters")
        ids = {id(p) for p in projector}
        others = [p for p in self.module.parameters() if p.requires_grad and id(p) not in ids]
        wd = self.config.train.optim.weight_decay
        groups = [{"params": others, "weight_decay": wd}] if others else []
        projector_lr = self.llava_cfg.projector_lr
        group = {"params": projector, "weight_decay": wd}
        if projector_lr is not None:
            group["lr"] = projector_lr
        groups.append(group)
        return groups

    def init_checksum(self) -> dict[str, str]:
        """Checksums every rank must agree on right after the model is built (before any step)."""
        out = {llava_common.PROJECTOR_INIT: llava_common.tensor_checksum(self.parts.model.model.multi_modal_projector)}
        if self.llava_cfg.stage == "lora":
            lora = nn.ModuleDict({n.replace(".", "_"): m for n, m in self.module.named_modules()
                                  if n.endswith("lora_A") or n.endswith("lora_B")})
            out["lora_init"] = llava_common.tensor_checksum(lora)
        return out

    # -- one step ---------------------------------------------------------------------------------------------
    def build_examples(self, rows: dict[str, Any]) -> list[Any]:
        examples = []
        for i in range(len(rows["key"])):
            sample = SimpleNamespace(key=str(rows["key"][i]), image="image" if rows["has_image"][i] else None,
                                     human_turns=tuple(json.loads(rows["humans"][i])),
                                     gpt_turns=tuple(json.loads(rows["gpts"][i])))
            examples.append(llava_labels.build_example(
                sample, conversation=self.conversation, tokenizer=self.parts.tokenizer,
                image_token_id=self.parts.image_token_id, num_visual_tokens=self.parts.num_visual_tokens,
                max_length=self.llava_cfg.max_length))
        return examples

    def collate_chunks(self, chunks: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
        """Every chunk of the step, with the step's global supervised-token count (all chunks, all workers).

        A chunk left without rows (its images were unreadable and dropped) becomes one dummy row (BOS + V image ids,
        zero image, nothing supervised): it contributes an exact zero loss and gradient but keeps the step's number
        of forward/backward passes, and the tower in the graph (ZeRO-3), on every rank."""
        batches = []
        for rows in chunks:
            examples = self.build_examples(rows)
            if not examples:
                rows, examples = self.dummy_rows(), [self.dummy_example()]
            batches.append((rows, llava_labels.collate_examples(examples, self.pad_id)))
        local = sum(int((b["labels"] != llava_labels.IGNORE_INDEX).sum()) for _, b in batches)
        total = torch.tensor(float(local), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        if total.item() < 1:
            raise RuntimeError("a step without any supervised token (every row of it dropped or fully masked)")
        out = []
        for rows, batch in batches:
            out.append({"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device),
                        "attention_mask": batch["attention_mask"].to(device),
                        "pixels": torch.as_tensor(rows["pixels"]).to(device),
                        "has_image": torch.as_tensor(rows["has_image"], dtype=torch.bool).to(device),
                        "norm": total.clone()})
        return out

    def dummy_example(self) -> Any:
        tokenizer = self.parts.tokenizer
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids += [self.parts.image_token_id] * self.parts.num_visual_tokens
        return llava_labels.TrainingExample(input_ids=ids, labels=[llava_labels.IGNORE_INDEX] * len(ids),
                                            image_positions=(len(ids) - self.parts.num_visual_tokens, len(ids)),
                                            num_rounds=0, key="<dummy>")

    def dummy_rows(self) -> dict[str, Any]:
        import numpy as np

        size = tuple(self.module.llava.config.vision_config.image_size for _ in range(2))
        return {"pixels": np.zeros((1, 3, *size), dtype=np.float32), "has_image": np.ones(1, dtype=bool)}

    def compute_loss(self, reps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """world x (this chunk's summed token losses) / (global supervised tokens): DeepSpeed averages gradients
        over the workers, so the applied gradient is that of the global token-mean loss."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        loss = reps["loss_sum"].sum() * world / reps["norm"]
        return loss, {"tokens_local": reps["tokens"].sum().float().detach()}

    def after_step(self, module: nn.Module, gathered: Any = None) -> None:
        return None

    # -- export -----------------------------------------------------------------------------------------------
    def export(self, module: nn.Module, out_dir: Path) -> dict[str, Any]:
        """The trained model as a Llava directory (LoRA merged) + tokenizer + processor + sidecar (+ adapter/).

        Called with full parameters (under ZeRO-3 inside a gather on all ranks); works on copies, so the
        engine's module is untouched."""
        out_dir.mkdir(parents=True, exist_ok=True)
        llava = module.llava
        state = {k: v.detach().to("cpu", copy=True) for k, v in module.net.state_dict().items()}
        files = []
        if self.llava_cfg.stage == "lora":
            from peft import get_peft_model, get_peft_model_state_dict

            fresh = llava_common.empty_llava(type(llava), llava.config, llava.dtype)
            peft_model = get_peft_model(fresh, self.peft_config)
            peft_model.load_state_dict(state, strict=True)  # the same module tree as the trained one
            adapter = get_peft_model_state_dict(peft_model)
            empty = [k for k, v in adapter.items() if v.numel() == 0]
            if not any("lora_" in k for k in adapter) or empty:
                raise RuntimeError(f"the LoRA adapter to export is empty ({empty[:3]}): gather the parameters first")
            peft_model.save_pretrained(out_dir / ADAPTER_DIR, save_embedding_layers=False)
            (out_dir / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
            merged = peft_model.merge_and_unload()
            files.append(ADAPTER_DIR)
        else:
            merged = llava_common.empty_llava(type(llava), llava.config, llava.dtype)
            merged.load_state_dict(state, strict=True)
        merged.config.use_cache = True
        merged.save_pretrained(out_dir)
        self.parts.tokenizer.save_pretrained(out_dir)
        # the processor the job fed the tower with (an open_clip tower's is built from its preprocess_cfg)
        llava_common.load_image_processor(self.parts.image_processor_source).save_pretrained(out_dir)
        llava_common.write_llava_sidecar(out_dir, trained_stage=self.llava_cfg.stage,
                                         select_feature=self.parts.select_feature)
        return {"layout": "transformers Llava directory (+ perceive_ray.json)", "model_source": str(out_dir),
                "stage": self.llava_cfg.stage, "select_feature": self.parts.select_feature,
                "num_visual_tokens": self.parts.num_visual_tokens, "files": sorted(p.name for p in out_dir.iterdir()),
                "adapter": str(out_dir / ADAPTER_DIR) if files else None}

    def describe(self) -> dict[str, Any]:
        return {"job": self.name, "stage": self.llava_cfg.stage, "conversation": self.conversation,
                "select_feature": self.parts.select_feature, "num_visual_tokens": self.parts.num_visual_tokens,
                "assembled": self.parts.assembled, **count_parameters(self.module)}


def build_job(config: TrainExperimentConfig, *, device: torch.device) -> LlavaJob:
    return LlavaJob(config, device=device)

