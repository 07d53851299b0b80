"""LLaVA-1.5 training job (train/jobs/llava.py): stage projector assembled from the tiny halves (trainables, seeded
projector init), the loss against transformers' own Llava loss (one chunk and accumulated chunks), text-only rows
next to image rows (the tower stays in the graph), stage lora (trainables, parameter groups, export: merged
directory and peft adapter reproduce the trained module's logits), and select_feature cls.

Precision: the loss comparisons run the model in float64 (``module.double()``); both the job and transformers
compute the token cross-entropy on float32 logits (``.float()`` in both), so losses agree to ~1e-7 relative and
gradients to ~1e-7 of their scale. The export comparisons stay float32 (the exported dtype): LoRA merging rounds
the merged weights once, ~1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from perceive_ray import registry
from perceive_ray.config import ModelConfig, load_config
from perceive_ray.models.llava import load_llava, save_tiny_llava, save_tiny_llava_parts
from perceive_ray.train import llava_labels
from perceive_ray.train.gradcache import chunk_seed, run_accumulation_step
from perceive_ray.train.jobs import llava_common

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments" / "train"
PROJECTOR = EXPERIMENTS / "llava15_patch_projector.yaml"
LORA = EXPERIMENTS / "llava15_patch_lora.yaml"
CPU = torch.device("cpu")
V = 64


@pytest.fixture(scope="module", autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_job")
    return {"llava": str(save_tiny_llava(root / "llava", seed=0)), "parts": save_tiny_llava_parts(root / "parts")}


def projector_job(tiny, **overrides):
    parts = tiny["parts"]
    config = load_config(PROJECTOR, {"model.source": str(parts / "llm"),
                                     "train.llava.vision_tower": str(parts / "vision"), **overrides}, smoke=True)
    return registry.resolve("jobs", "llava")(config, device=CPU)


def lora_job(tiny, **overrides):
    config = load_config(LORA, {"model.source": tiny["llava"], **overrides}, smoke=True)
    assert config.train.llava.stage == "lora" and config.train.llava.vision_tower is None
    return registry.resolve("jobs", "llava")(config, device=CPU)


def make_rows(specs, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows as the worker's shard yields them: (key, has_image, human turns, gpt turns); zero image if text-only."""
    pixels = np.random.default_rng(seed).standard_normal((len(specs), 3, 32, 32)).astype(np.float32)
    for i, spec in enumerate(specs):
        if not spec[1]:
            pixels[i] = 0.0
    return {"key": np.array([s[0] for s in specs]), "has_image": np.array([s[1] for s in specs]),
            "humans": np.array([json.dumps(s[2]) for s in specs]), "gpts": np.array([json.dumps(s[3]) for s in specs]),
            "epoch": np.zeros(len(specs), dtype=np.int64), "pixels": pixels,
            "step": np.zeros(len(specs), dtype=np.int64), "slot": np.arange(len(specs))}


def split_rows(rows: dict[str, np.ndarray], chunks: int) -> list[dict[str, np.ndarray]]:
    """As the worker splits a step's rows into chunks (run/training.py::split_rows)."""
    n = len(rows["step"])
    bounds = np.linspace(0, n, chunks + 1).round().astype(int)
    return [{k: v[bounds[i]: bounds[i + 1]] for k, v in rows.items()} for i in range(chunks)]


# 558K-format image rows (plain conversation), captions of different lengths: the token weighting matters.
CAPTIONS = [
    ("llava_558k:0", True, ["<image>\nDescribe the image briefly."], ["a red cat sleeping on a soft mat by the door"]),
    ("llava_558k:1", True, ["Render a short caption.\n<image>"], ["two dogs"]),
]
IMAGE_V1 = ("llava_665k:0", True, ["<image>\nWhat is the cat doing?", "What colour is it?"],
            ["It is sleeping on the mat.", "Red."])
TEXT_V1 = ("llava_665k:1", False, ["Write one sentence about a dog."], ["The dog ran home before dinner."])


class Engine:
    """What the step functions drive: forward = the module, backward recorded then ``loss.backward()``."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.scales: list[bool] = []
        self.steps = 0

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        assert loss.ndim == 0
        self.scales.append(scale_wrt_gas)
        loss.backward()

    def step(self) -> None:
        self.steps += 1


def trainable(job) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in job.module.named_parameters() if p.requires_grad}


def grads(job, names=None) -> dict[str, torch.Tensor]:
    """Gradients of the job's trainable parameters (or of ``names``); every one must have been reached."""
    out = {}
    params = dict(job.module.named_parameters())
    for name in sorted(names if names is not None else trainable(job)):
        param = params[name]
        assert param.grad is not None, name
        out[name] = param.grad.detach().clone()
    return out


def step(job, rows, chunks: int, names=None):
    """One worker step (world 1): collate into ``chunks`` chunks, plain accumulation; (loss, grads, engine, ...)."""
    batches = job.collate_chunks(split_rows(rows, chunks), CPU)
    job.module.zero_grad(set_to_none=True)
    engine = Engine(job.module)
    loss, logs = run_accumulation_step(engine, job.compute_loss, batches,
                                       [chunk_seed(job.config.seed, 0, 0, c) for c in range(chunks)])
    return loss.item(), grads(job, names), engine, batches, logs


def assert_close_grads(got, want, *, rel: float):
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=rel * scale, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# Stage projector (assembled from the tiny halves)


def test_projector_stage_trains_only_the_projector(tiny):
    job = projector_job(tiny)
    assert job.parts.assembled and job.llava_cfg.stage == "projector" and job.conversation == "plain"
    assert job.parts.num_visual_tokens == V and job.parts.select_feature == "patch"
    names = set(trainable(job))
    projector = {n for n, _ in job.module.named_parameters() if "multi_modal_projector" in n}
    assert names == projector and len(names) == 4  # linear_1 / linear_2 weight + bias
    assert all(not p.requires_grad for n, p in job.module.named_parameters()
               if "vision_tower" in n or "language_model" in n or "lm_head" in n)
    groups = job.parameter_groups()
    assert len(groups) == 1 and "lr" not in groups[0]  # stage 1: the projector at train.optim.lr
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in trainable(job).values()}
    assert job.describe()["trainable_parameters"] == sum(p.numel() for p in trainable(job).values())


def test_projector_init_is_seeded(tiny):
    first = projector_job(tiny).init_checksum()
    torch.manual_seed(12345)  # the global RNG does not enter the projector's init
    again = projector_job(tiny).init_checksum()
    other = projector_job(tiny, seed=1).init_checksum()
    assert set(first) == {llava_common.PROJECTOR_INIT}
    assert first == again
    assert other[llava_common.PROJECTOR_INIT] != first[llava_common.PROJECTOR_INIT]
    job = projector_job(tiny)
    assert first[llava_common.PROJECTOR_INIT] == llava_common.tensor_checksum(job.parts.model.model.multi_modal_projector)


def test_loss_equals_transformers_llava_loss_and_chunks_sum_to_the_one_chunk_gradient(tiny):
    job = projector_job(tiny)
    job.module.double()
    rows = make_rows(CAPTIONS)
    loss1, grads1, engine1, batches1, logs1 = step(job, rows, 1)
    batch = batches1[0]
    supervised = (batch["labels"] != llava_labels.IGNORE_INDEX).sum(dim=1).tolist()
    assert len(set(supervised)) == 2 and batch["norm"].item() == sum(supervised)
    assert (batch["attention_mask"][1, -1] == 0).item()  # the short row is right-padded
    assert logs1["tokens_local"].item() == sum(supervised)
    # transformers' own path: LlavaForConditionalGeneration(input_ids, attention_mask, pixel_values, labels)
    net = job.parts.model
    net.zero_grad(set_to_none=True)
    out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixels"].double(), labels=batch["labels"], use_cache=False)
    out.loss.backward()
    hf_loss, hf_grads = out.loss.item(), grads(job)
    assert loss1 == pytest.approx(hf_loss, rel=1e-6)
    assert_close_grads(grads1, hf_grads, rel=1e-6)
    # two chunks of one row each, plain accumulation: each chunk divides by the GLOBAL token count
    loss2, grads2, engine2, batches2, _ = step(job, rows, 2)
    assert [b["norm"].item() for b in batches2] == [sum(supervised)] * 2
    assert engine2.steps == 2 and engine2.scales == [False, False]
    assert engine1.steps == 1 and engine1.scales == [False]
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    assert_close_grads(grads2, grads1, rel=1e-6)
    assert all(g.abs().max().item() > 1e-6 for g in grads1.values())
    # sanity: per-chunk token means (the 2023 trainer's normalisation) would give another loss here
    per_chunk_means = []
    for b in batches2:
        with torch.no_grad():
            reps = job.module(b)
        per_chunk_means.append(reps["loss_sum"].sum().item() / reps["tokens"].sum().item())
    assert abs(sum(per_chunk_means) / 2 - loss1) > 1e-3


def test_select_feature_cls_has_one_visual_token(tiny):
    job = projector_job(tiny, **{"train.llava.select_feature": "cls"})
    assert job.parts.select_feature == "cls" and job.parts.num_visual_tokens == 1
    assert job.parts.assembled
    rows = make_rows(CAPTIONS)
    examples = job.build_examples(rows)
    image_id = job.parts.image_token_id
    assert [e.input_ids.count(image_id) for e in examples] == [1, 1]
    assert all(e.image_positions[1] - e.image_positions[0] == 1 for e in examples)
    batch = job.collate_chunks([rows], CPU)[0]
    loss, _ = job.compute_loss(job.module(batch))
    assert torch.isfinite(loss) and loss.item() > 0


# ---------------------------------------------------------------------------------------------------------------
# Text-only rows (stage lora, mix-665K)


def test_text_only_row_keeps_the_tower_in_the_graph_and_weights_rows_by_tokens(tiny):
    job = lora_job(tiny, **{"train.llava.lora.dropout": 0.0})
    job.module.double()
    tower = job.parts.model.model.vision_tower
    names = set(trainable(job))  # LoRA + projector
    # The job freezes the tower; unfreeze it here only to observe that every row's image (the zero image of a
    # text-only row too) reaches autograd, which is what keeps ZeRO-3's gather / reduce order equal on all ranks.
    # (The tower's last layer and post_layernorm never get a gradient: LLaVA reads layer -2.)
    tower.requires_grad_(True)
    seen = []
    handle = tower.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]) if args else None)

    def tower_grads() -> dict[str, torch.Tensor | None]:
        return {n: None if p.grad is None else p.grad.detach().clone() for n, p in tower.named_parameters()}

    try:
        loss_image, grads_image, _, image_batches, _ = step(job, make_rows([IMAGE_V1]), 1, names)
        reached = {n for n, g in tower_grads().items() if g is not None}
        assert any("embeddings" in n for n in reached) and any("layers.0." in n for n in reached)
        n_image = image_batches[0]["norm"].item()
        seen.clear()
        mixed = make_rows([IMAGE_V1, TEXT_V1])
        loss_mixed, grads_mixed, _, batches, _ = step(job, mixed, 1, names)
        assert seen == [2]  # the text-only row's zero image ran through the tower with the image row
        assert {n for n, g in tower_grads().items() if g is not None} == reached
        n_mixed = batches[0]["norm"].item()
        # a batch of text-only rows alone: the same tower and projector parameters still get a (zero) gradient
        seen.clear()
        loss_text, grads_text, _, text_batches, _ = step(job, make_rows([TEXT_V1]), 1, names)
        assert seen == [1]
        text_tower = tower_grads()
        assert {n for n, g in text_tower.items() if g is not None} == reached
        assert all(not text_tower[n].any() for n in reached)
        projector = {n: g for n, g in grads_text.items() if "multi_modal_projector" in n}
        assert projector and all(not g.any() for g in projector.values())
        assert any(g.abs().max().item() > 0 for n, g in grads_text.items() if "lora_" in n)
        n_text = text_batches[0]["norm"].item()
    finally:
        handle.remove()
    assert n_mixed == n_text + n_image and n_text != n_image
    assert loss_mixed == pytest.approx((loss_image * n_image + loss_text * n_text) / n_mixed, rel=1e-6)
    combined = {n: (grads_image[n] * n_image + grads_text[n] * n_text) / n_mixed for n in grads_mixed}
    assert_close_grads(grads_mixed, combined, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Stage lora: trainables, parameter groups, export


def test_lora_stage_trains_lora_and_projector_with_its_own_lr(tiny):
    job = lora_job(tiny)
    assert not job.parts.assembled and job.conversation == "v1"
    names = set(trainable(job))
    assert names and all("lora_" in n or "multi_modal_projector" in n for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    projector = {n for n in names if "multi_modal_projector" in n}
    assert projector and all(".modules_to_save." in n for n in projector)
    assert not any("vision_tower" in n or "lm_head" in n for n in names)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    groups = job.parameter_groups()
    assert len(groups) == 2
    params = trainable(job)
    assert {id(p) for p in groups[1]["params"]} == {id(params[n]) for n in projector}
    assert groups[1]["lr"] == job.config.train.llava.projector_lr == pytest.approx(2e-5)
    assert "lr" not in groups[0]  # the LoRA group runs at train.optim.lr
    assert {id(p) for p in groups[0]["params"]} == {id(params[n]) for n in names - projector}


def test_full_stage_trains_the_llm_and_projector_on_an_open_clip_tower(tiny, tmp_path):
    """Stage full (finetune.sh): the whole LLM + projector train, the tower stays frozen; assembled from an LLM and
    an open_clip tower (the demo's tiny CLIP), in the v1 conversation with its text-only rows kept."""
    from perceive_ray.models.clip import save_tiny_clip
    from perceive_ray.train.jobs.llava import data_spec

    tower = save_tiny_clip(tmp_path / "clip", seed=0)
    job = projector_job(tiny, **{"train.llava.stage": "full", "train.llava.vision_tower": str(tower)})
    assert job.parts.assembled and job.conversation == "v1" and job.parts.num_visual_tokens == 16
    names = set(trainable(job))
    everything = {n for n, _ in job.module.named_parameters()}
    tower_names = {n for n in everything if "vision_tower" in n}
    assert tower_names and names == everything - tower_names
    assert any("lm_head" in n for n in names) and any("embed_tokens" in n for n in names)
    assert data_spec(job.config).keep_text_only
    groups = job.parameter_groups()
    assert len(groups) == 2 and sum(len(g["params"]) for g in groups) == len(names)


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixels"], use_cache=False).logits


def test_lora_export_merged_dir_and_adapter_reproduce_the_trained_logits(tiny, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    job = lora_job(tiny)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # as if trained: non-zero lora_B (init 0) and a moved projector
        for name, param in sorted(trainable(job).items()):
            if "lora_B" in name or "multi_modal_projector" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    job.module.eval()
    batch = job.collate_chunks([make_rows([IMAGE_V1, ("llava_665k:2", True, ["What is here?\n<image>"],
                                                      ["A small blue car."])])], CPU)[0]
    want = logits_of(job.module.net, batch)
    base = LlavaForConditionalGeneration.from_pretrained(tiny["llava"], use_safetensors=True).eval()
    assert (logits_of(base, batch) - want).abs().max().item() > 1e-2  # the adapter is not a no-op

    out_dir = tmp_path / "export"
    info = job.export(job.module, out_dir)
    assert info["stage"] == "lora" and info["adapter"] == str(out_dir / "adapter")
    assert {"config.json", "model.safetensors", "perceive_ray.json", "adapter"} <= set(info["files"])
    sidecar = json.loads((out_dir / "perceive_ray.json").read_text())
    assert sidecar["trained_stage"] == "lora" and sidecar["select_feature"] == "patch"

    bundle = load_llava(ModelConfig(family="llava", source=str(out_dir)))
    assert not any("lora_" in n for n, _ in bundle.model.named_parameters())  # merged, plain Llava
    torch.testing.assert_close(logits_of(bundle.model, batch), want, atol=1e-5, rtol=1e-5)

    adapter = load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any("lora_A" in k for k in adapter) and any("lora_B" in k for k in adapter)
    assert any("multi_modal_projector" in k for k in adapter)  # the projector travels with the adapter
    reloaded = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tiny["llava"], use_safetensors=True), str(out_dir / "adapter"))
    reloaded.eval()
    torch.testing.assert_close(logits_of(reloaded, batch), want, atol=1e-5, rtol=1e-5)
    # export worked on copies: the trained module still holds its (unmerged) adapter
    assert any("lora_B" in n for n in trainable(job))
    torch.testing.assert_close(logits_of(job.module.net, batch), want, atol=0, rtol=0)


def test_a_chunk_emptied_by_dropped_rows_becomes_a_zero_dummy_row(tiny):
    """Rows with unreadable images are dropped before the split: a chunk left empty becomes one dummy row (image
    span, nothing supervised) that keeps the step's passes and adds exactly nothing to the loss or gradients."""
    job = projector_job(tiny)
    rows = make_rows(CAPTIONS[:1])
    want_loss, want, _, _, _ = step(job, rows, 1)
    got_loss, got, engine, batches, _ = step(job, rows, 2)  # one row, two chunks: the second has no row
    assert engine.steps == 2 and len(batches) == 2
    dummies = [b for b in batches if bool((b["labels"] == -100).all())]
    assert len(dummies) == 1
    dummy = dummies[0]
    assert dummy["input_ids"].shape[0] == 1 and bool(dummy["has_image"][0])
    assert int((dummy["input_ids"] == job.parts.image_token_id).sum()) == job.parts.num_visual_tokens
    assert bool((dummy["labels"] == -100).all())
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_close_grads(got, want, rel=1e-6)
