"""LLaVA-1.5 (both stages) and VLM2Vec training on 2 CPU workers (gloo) through Ray Train + DeepSpeed, tiny models.

Stage 1 assembles the tiny LLM + CLIP halves with a fresh projector (the only thing that trains); stage 2 starts from
stage 1's export by run id and trains LoRA + projector under ZeRO-3 with every parameter partitioned (persistence
threshold 0) on a data set of one image row and one text-only row, so at every step one worker holds a text-only row
and the other an image row: the zero-image path must keep both ranks in step (no hang). Its adapter must be
non-empty, reload with peft onto the stage-1 model and reproduce the merged export's logits; a worker killed
mid-run resumes from the right checkpoint and ends bit-identical to the uninterrupted run. VLM2Vec trains its DoRA
adapter with GradCache (separate query / target chunks) and exports it in the layout the VLM2Vec scorer loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perceive_ray.config import ModelConfig, load_config

REPO = Path(__file__).resolve().parents[2]
STAGE1 = REPO / "experiments/train/llava15_patch_projector.yaml"
STAGE2 = REPO / "experiments/train/llava15_patch_lora.yaml"
VLM2VEC = REPO / "experiments/train/vlm2vec_llava15.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_local):
    from perceive_ray.smoke import prepare_smoke

    root = tmp_path_factory.mktemp("train_llava")
    previous = Path.cwd()
    os.chdir(root)
    try:
        prepare_smoke(load_config(STAGE1, smoke=True))  # synthetic data + tiny LLaVA halves
        prepare_smoke(load_config(VLM2VEC, smoke=True))  # the whole tiny LLaVA
        mix = json.loads((root / "synth/llava/synthetic_mix665k.json").read_text())
        image = next(r for r in mix if "image" in r and len(r["conversations"]) >= 4)
        text = next(r for r in mix if "image" not in r)
        (root / "two_rows.json").write_text(json.dumps([image, text]))  # one of each modality per step
        yield root
    finally:
        os.chdir(previous)


def train(workdir: Path, experiment: Path, run_id: str, **overrides):
    from perceive_ray.run.training import run_train

    os.chdir(workdir)
    config = load_config(experiment, {"output_dir": str(workdir / "runs"), **overrides}, smoke=True)
    result = run_train(config, run_id=run_id, track=False)
    run_dir = workdir / "runs/train" / run_id
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return result, run_dir, log


@pytest.fixture(scope="module")
def stage1(workdir):
    return train(workdir, STAGE1, "llava15_patch_projector")


# Stage 2 on the two-row set: global batch 2 = one row per worker, 4 steps (one per epoch), checkpoints every 2.
TWO_ROWS = {"train.batch": {"global": 2, "micro": 1}, "train.epochs": 4, "train.max_steps": 4,
            "train.checkpoint.every_steps": 2, "train.llava.group_by_modality_length": False,
            "train.optim.lr": 5e-3, "train.llava.projector_lr": 1e-3}


def two_rows(workdir: Path) -> dict:
    return {**TWO_ROWS, "data.sources": [{"name": "llava_665k", "path": str(workdir / "two_rows.json"),
                                          "image_root": str(workdir / "synth/llava/images"), "format": "mix"}]}


@pytest.fixture(scope="module")
def stage2(workdir, stage1):
    return train(workdir, STAGE2, "lora_clean", **two_rows(workdir))


def test_stage1_trains_only_a_projector_initialised_identically_on_every_rank(workdir, stage1):
    result, run_dir, log = stage1
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    checks = json.loads((run_dir / "init_checksums.json").read_text())["ranks"]
    assert len(checks) == 2 and checks[0] == checks[1] and "projector_init" in checks[0]
    export = Path(result["export"])
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from perceive_ray.models.llava import load_llava

    bundle = load_llava(ModelConfig(family="llava", source=str(export)))
    assert bundle.num_visual_tokens == 64 and bundle.select_feature == "patch"
    llm = LlamaForCausalLM.from_pretrained(workdir / "runs/tiny/llava_parts/llm")
    vision = CLIPVisionModel.from_pretrained(workdir / "runs/tiny/llava_parts/vision")
    pairs = [(bundle.model.model.language_model, llm.model), (bundle.model.lm_head, llm.lm_head),
             (bundle.model.model.vision_tower, vision)]
    for trained, original in pairs:  # the LLM and the vision tower are frozen in stage 1
        a, b = trained.state_dict(), original.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    sidecar = json.loads((export / "perceive_ray.json").read_text())
    assert sidecar["template"] == "chat" and sidecar["trained_stage"] == "projector"


def test_lora_stage_zero3_with_a_text_only_row_beside_an_image_row(workdir, stage1, stage2):
    from peft import PeftModel

    from perceive_ray.models.llava import load_llava

    result, run_dir, log = stage2
    assert [row["step"] for row in log] == [1, 2, 3, 4]  # finished: no rank waited on the other's vision tower
    ds = json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]
    assert ds["stage"] == 3 and ds["stage3_param_persistence_threshold"] == 0
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["data"]["llava_665k"]["rows"] == 2 and record["data"]["llava_665k"]["image_rows"] == 1
    checks = json.loads((run_dir / "init_checksums.json").read_text())["ranks"]
    assert checks[0] == checks[1] and {"projector_init", "lora_init"} <= set(checks[0])

    export = Path(result["export"])
    adapter = load_file(str(export / "adapter/adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered before saving: no (0,) tensors
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)  # B left its zero init
    base_weights = load_file(str(Path(stage1[0]["export"]) / "model.safetensors"))
    merged_weights = load_file(str(export / "model.safetensors"))
    projector = [k for k in base_weights if "multi_modal_projector" in k]
    assert any(not torch.equal(base_weights[k], merged_weights[k]) for k in projector)  # its own lr group trained

    merged = load_llava(ModelConfig(family="llava", source=str(export)))
    base = load_llava(ModelConfig(family="llava", source=stage1[0]["export"]))
    base_only = load_llava(ModelConfig(family="llava", source=stage1[0]["export"])).model
    reloaded = PeftModel.from_pretrained(base.model, str(export / "adapter")).eval()
    tokens = merged.tokenizer("USER: <image>\nWhat is on the left? ASSISTANT:")["input_ids"]
    v = merged.num_visual_tokens
    ids = [t for tok in tokens for t in ([tok] * v if tok == merged.image_token_id else [tok])]
    input_ids = torch.tensor([ids])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = merged.model(input_ids=input_ids, pixel_values=pixels).logits
        got = reloaded(input_ids=input_ids, pixel_values=pixels).logits
        untrained = base_only(input_ids=input_ids, pixel_values=pixels).logits
    assert torch.allclose(want, got, atol=1e-4), float((want - got).abs().max())
    assert not torch.allclose(want, untrained, atol=1e-3)  # the adapter does change the model


def test_lora_stage_killed_worker_resumes_at_the_right_step(workdir, stage2, monkeypatch):
    """The killed run decodes in its workers (data.decode_tasks: 0; the clean one in Ray Data tasks): equality
    also shows that both paths give the processor's pixels bit for bit, text-only rows included."""
    clean = stage2[0]
    monkeypatch.setenv("PERCEIVE_RAY_FAULT", "train_worker:4")
    faulty, run_dir, log = train(workdir, STAGE2, "lora_killed", **two_rows(workdir), **{"data.decode_tasks": 0})
    assert (run_dir / ".fault-train_worker-4").exists()
    steps = [row["step"] for row in log]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == [1, 2, 3]  # rank 1 died before step 4
    # from the step-2 checkpoint (or from the start if Ray had not yet registered it when the worker died)
    assert steps[restart] in (1, 3) and steps[restart:] == list(range(steps[restart], 5))
    a = load_file(str(Path(clean["export"]) / "adapter/adapter_model.safetensors"))
    b = load_file(str(Path(faulty["export"]) / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_vlm2vec_trains_its_dora_adapter_with_gradcache_and_exports_it(workdir):
    from perceive_ray.models.vlm2vec import load_vlm2vec
    from perceive_ray.training import resolve_train_refs

    result, run_dir, log = train(workdir, VLM2VEC, "vlm2vec", **{"train.epochs": 2, "train.max_steps": 6,
                                                                  "train.optim.lr": 2e-3})
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["plan"]["chunks"] == 2 and record["plan"]["local_rows"] == 4  # queries 2 x 2, targets 1 x 4
    assert record["data"]["llava_665k"]["rows"] > record["data"]["llava_665k"]["image_rows"]  # text-only kept
    losses = [row["train/loss"] for row in log]
    assert len(losses) == 6 and min(losses[3:]) < losses[0], losses
    data = resolve_train_refs({"model": {"family": "vlm2vec", "source": "train:vlm2vec"}}, workdir / "runs")
    assert data["model"]["source"] == result["export"]
    trained = load_vlm2vec(ModelConfig(family="vlm2vec", source=result["export"]), merge=False)
    cfg = trained.adapter_config
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_dora"]) == (8, 64, 0.1, True)
    assert cfg["init_lora_weights"] == "gaussian"
    names = [n for n, _ in trained.peft_model.named_parameters() if "lora_" in n]
    assert names and all(".language_model." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "down_proj"}
