"""The LLaVA-1.5 and VLM2Vec training experiments (``job: llava`` / ``job: vlm2vec``): the recipe numbers of every
experiment file (full and smoke), the validators of the new keys (each error names its dotted key), the stage
helpers, the ``train:<run id>`` link of stage 2, and the batch arithmetic of uneven VLM2Vec query / target chunks
(``compute_accumulation`` and DeepSpeed's micro x accumulation x workers == train_batch_size)."""

from __future__ import annotations

from pathlib import Path

import pytest

from perceive_ray.config import ConfigError, load_config
from perceive_ray.train.deepspeed import build_deepspeed_config
from perceive_ray.training import resolve_model_ref
from perceive_ray.training_config import (
    DEFAULT_LOSS,
    JOB_FAMILIES,
    JOB_LOSSES,
    LlavaTrainConfig,
    TrainExperimentConfig,
    Vlm2VecTrainConfig,
    compute_accumulation,
    resolve_loss_kind,
)

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "experiments" / "train"
PROJECTOR = {feat: TRAIN / f"llava15_{feat}_projector.yaml" for feat in ("patch", "cls")}
LORA = {feat: TRAIN / f"llava15_{feat}_lora.yaml" for feat in ("patch", "cls")}
VLM2VEC = TRAIN / "vlm2vec_llava15.yaml"
FEATURES = ["patch", "cls"]


def load(path: Path, overrides=None, *, smoke: bool = False) -> TrainExperimentConfig:
    return load_config(path, overrides or {}, smoke=smoke)


def config_error(path: Path, overrides, *, smoke: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, overrides, smoke=smoke)
    message = str(info.value)
    assert str(path) in message  # the file is named too
    return message


def ds_product(out: dict) -> int:
    return out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"]


# -- the registry tables -----------------------------------------------------------------------------------------


def test_job_tables_know_the_new_jobs():
    assert JOB_LOSSES["llava"] == ("lm",) and JOB_LOSSES["vlm2vec"] == ("infonce",)
    assert JOB_FAMILIES["llava"] == ("llava",) and JOB_FAMILIES["vlm2vec"] == ("llava",)
    assert DEFAULT_LOSS["llava"] == "lm" and DEFAULT_LOSS["vlm2vec"] == "infonce"


# -- stage 1: projector pretraining ------------------------------------------------------------------------------


@pytest.mark.parametrize("feat", FEATURES)
def test_projector_stage_loads_with_the_llava15_pretrain_recipe(feat):
    config = load(PROJECTOR[feat])
    assert config.name == f"llava15_{feat}_projector" and config.job == "llava" and resolve_loss_kind(config) == "lm"
    assert (config.model.family, config.model.source) == ("llava", "lmsys/vicuna-7b-v1.5")
    assert [(s.name, s.format) for s in config.data.sources] == [("llava_558k", "pretrain")]
    train = config.train
    assert train.epochs == 1 and train.max_steps is None
    assert (train.batch.global_, train.batch.micro, train.batch.micro_target) == (256, 32, None)
    assert train.optim.name == "adamw" and train.optim.lr == pytest.approx(1e-3)
    assert train.optim.betas == (0.9, 0.999) and train.optim.eps == pytest.approx(1e-8)
    assert train.optim.weight_decay == 0.0
    assert train.schedule.kind == "hf_cosine" and train.schedule.warmup_ratio == pytest.approx(0.03)
    assert train.deepspeed.zero_stage == 2 and train.deepspeed.grad_clip is None
    llava = train.llava
    assert llava.stage == "projector" and llava.select_feature == feat
    assert llava.vision_tower == "openai/clip-vit-large-patch14-336" and llava.projector_lr is None
    assert llava.max_length == 2048 and llava.grad_checkpointing
    assert llava.conversation() == "plain" and llava.resolved_preprocess() == "processor"
    assert llava.resolved_grouping() is False
    assert (config.resources.num_workers, config.resources.use_gpu) == (8, True)
    assert compute_accumulation(config) == (32, 1)  # 32 per GPU x 8 GPUs, no accumulation (pretrain.sh)
    out = build_deepspeed_config(config)
    assert out["train_batch_size"] == 256 == ds_product(out) * 8
    assert out["zero_optimization"]["stage"] == 2 and out["bf16"] == {"enabled": True}
    assert out["optimizer"]["params"]["betas"] == [0.9, 0.999] and out["optimizer"]["params"]["eps"] == 1e-8
    assert out["gradient_clipping"] == 0.0


@pytest.mark.parametrize("feat", FEATURES)
def test_projector_stage_smoke(feat):
    config = load(PROJECTOR[feat], smoke=True)
    assert config.model.source == "runs/tiny/llava_parts/llm"
    assert config.train.llava.vision_tower == "runs/tiny/llava_parts/vision"
    assert config.train.llava.select_feature == feat  # the file's own key survives the base's smoke block
    assert [str(s.path) for s in config.data.sources] == ["synth/llava/synthetic_558k.json"]
    assert (config.train.batch.global_, config.train.batch.micro) == (4, 1)
    assert config.train.max_steps == 4 and config.train.checkpoint.every_steps == 2
    assert (config.resources.num_workers, config.resources.use_gpu) == (2, False)
    # the recipe's optimiser / schedule are kept in the smoke run
    assert config.train.optim.lr == pytest.approx(1e-3) and config.train.optim.betas == (0.9, 0.999)
    assert config.train.schedule.kind == "hf_cosine" and config.train.schedule.warmup_ratio == pytest.approx(0.03)
    assert compute_accumulation(config) == (2, 2)
    out = build_deepspeed_config(config)
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
        == (4, 1, 2)
    assert "bf16" not in out  # fp32 on CPU


# -- stage 2: LoRA instruction tuning ----------------------------------------------------------------------------


@pytest.mark.parametrize("feat", FEATURES)
def test_lora_stage_loads_with_the_llava15_finetune_lora_recipe(feat):
    config = load(LORA[feat])
    assert config.name == f"llava15_{feat}_lora" and config.job == "llava" and resolve_loss_kind(config) == "lm"
    # the stage-1 run is named, and resolved only when the run is prepared (see the train: tests below)
    assert config.model.source == f"train:llava15_{feat}_projector"
    assert [(s.name, s.format) for s in config.data.sources] == [("llava_665k", "mix")]  # mix-665K only
    assert str(config.data.sources[0].path) == "data/llava_v1_5_mix665k.json"
    train = config.train
    assert (train.batch.global_, train.batch.micro, train.batch.micro_target) == (128, 16, None)
    assert train.optim.lr == pytest.approx(2e-4)
    assert train.optim.betas == (0.9, 0.999) and train.optim.eps == pytest.approx(1e-8)  # from the base
    assert train.schedule.kind == "hf_cosine" and train.schedule.warmup_ratio == pytest.approx(0.03)
    assert train.epochs == 1 and train.deepspeed.zero_stage == 3
    llava = train.llava
    assert llava.stage == "lora" and llava.vision_tower is None
    assert llava.projector_lr == pytest.approx(2e-5)
    assert (llava.lora.r, llava.lora.alpha, llava.lora.dropout) == (128, 256, pytest.approx(0.05))
    assert llava.lora.use_dora is False and llava.lora.init == "default"
    assert llava.image_preprocess == "pad" and llava.resolved_preprocess() == "pad"
    assert llava.group_by_modality_length is True and llava.resolved_grouping() is True
    assert llava.conversation() == "v1" and llava.max_length == 2048
    assert compute_accumulation(config) == (16, 1)  # 16 per GPU x 8 GPUs (finetune_lora.sh)
    out = build_deepspeed_config(config)
    assert out["train_batch_size"] == 128 == ds_product(out) * 8
    assert out["zero_optimization"]["stage"] == 3
    assert out["optimizer"]["params"]["lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize("feat", FEATURES)
def test_lora_stage_smoke(feat):
    config = load(LORA[feat], smoke=True)
    assert config.model.source == f"train:llava15_{feat}_projector"
    assert config.train.llava.vision_tower is None  # the base smoke's tiny tower is taken back
    assert [(str(s.path), s.format) for s in config.data.sources] == [("synth/llava/synthetic_mix665k.json", "mix")]
    assert config.train.optim.lr == pytest.approx(2e-4) and config.train.llava.projector_lr == pytest.approx(2e-5)
    assert config.train.deepspeed.zero_stage == 3
    assert config.train.deepspeed.stage3_param_persistence_threshold == 0
    assert config.train.llava.resolved_preprocess() == "pad" and config.train.llava.resolved_grouping()
    assert (config.train.batch.global_, config.train.batch.micro) == (4, 1) and config.train.max_steps == 4
    out = build_deepspeed_config(config)
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert out["train_batch_size"] == 4 == ds_product(out) * 2


# -- train:<stage-1 run id> ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("feat", FEATURES)
def test_stage_1_run_resolves_to_its_export(tmp_path, feat):
    export = tmp_path / "train" / f"llava15_{feat}_projector" / "export"
    export.mkdir(parents=True)
    for smoke in (False, True):
        config = load(LORA[feat], {"output_dir": str(tmp_path)}, smoke=smoke)
        resolved = resolve_model_ref(config)
        assert Path(resolved.model.source) == export and resolved.model.family == "llava"
        assert resolved.model.pretrained is None
        assert resolved.train == config.train  # nothing else changes


@pytest.mark.parametrize("feat", FEATURES)
def test_missing_stage_1_run_names_the_run_id(tmp_path, feat):
    config = load(LORA[feat], {"output_dir": str(tmp_path)})  # the file validates before stage 1 has run
    with pytest.raises(ConfigError) as info:
        resolve_model_ref(config)
    message = str(info.value)
    assert f"'llava15_{feat}_projector'" in message and str(tmp_path / "train") in message
    # a run directory without an export (stage 1 not finished) is no finished run either
    (tmp_path / "train" / f"llava15_{feat}_projector").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"llava15_{feat}_projector"):
        resolve_model_ref(config)


def test_a_plain_source_is_not_resolved():
    config = load(PROJECTOR["patch"])
    assert resolve_model_ref(config) is config


# -- VLM2Vec ---------------------------------------------------------------------------------------------------------


def test_vlm2vec_loads_with_the_vlm2vec_recipe():
    config = load(VLM2VEC)
    assert config.job == "vlm2vec" and resolve_loss_kind(config) == "infonce"
    assert (config.model.family, config.model.source) == ("llava", "llava-hf/llava-1.5-7b-hf")
    assert [(s.name, s.format) for s in config.data.sources] == [("llava_558k", "pretrain"), ("llava_665k", "mix")]
    train = config.train
    assert (train.batch.global_, train.batch.micro, train.batch.micro_target) == (256, 1, 1)
    assert train.optim.name == "adamw" and train.optim.lr == pytest.approx(2e-5)
    assert train.optim.betas == (0.9, 0.999) and train.optim.eps == pytest.approx(1e-8)
    assert train.schedule.kind == "linear" and train.schedule.warmup_steps == 100
    assert train.schedule.warmup_ratio is None
    assert train.max_steps == 1000 and train.epochs == 1
    assert train.checkpoint.every_steps == 100
    adapter = train.vlm2vec.adapter
    assert (adapter.r, adapter.alpha, adapter.dropout) == (8, 64, pytest.approx(0.1))
    assert adapter.use_dora is True and adapter.init == "gaussian"
    assert train.vlm2vec.temperature == pytest.approx(0.02) and train.vlm2vec.max_length == 1024
    assert train.vlm2vec.image_preprocess == "resize" and train.vlm2vec.grad_checkpointing
    assert train.deepspeed.zero_stage == 2
    assert config.resources.num_workers == 4
    # GradCache 1/1: 64 rows per worker, 64 chunks of one query and one target each
    assert compute_accumulation(config) == (64, 64)
    out = build_deepspeed_config(config)
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
        == (256, 1, 64)
    assert out["train_batch_size"] == ds_product(out) * 4


def test_vlm2vec_smoke():
    config = load(VLM2VEC, smoke=True)
    assert config.model.source == "runs/tiny/llava"
    assert [str(s.path) for s in config.data.sources] == ["synth/llava/synthetic_558k.json",
                                                            "synth/llava/synthetic_mix665k.json"]
    batch = config.train.batch
    assert (batch.global_, batch.micro, batch.micro_target) == (8, 2, 4)
    assert config.train.max_steps == 4 and config.train.schedule.warmup_steps == 1
    assert config.train.schedule.kind == "linear"
    assert config.train.vlm2vec.adapter.use_dora and config.train.vlm2vec.temperature == pytest.approx(0.02)
    assert config.train.deepspeed.zero_stage == 2 and not config.resources.use_gpu
    # 4 rows per worker: 2 query chunks of 2, 1 target chunk of 4 -> 2 chunks (the second has no target rows)
    assert compute_accumulation(config) == (4, 2)
    out = build_deepspeed_config(config)
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
        == (8, 2, 2)


def test_vlm2vec_schema_defaults_are_the_recipe():
    fresh = Vlm2VecTrainConfig()
    adapter = fresh.adapter
    assert (adapter.r, adapter.alpha, adapter.dropout, adapter.use_dora, adapter.init) == (8, 64, 0.1, True,
                                                                                            "gaussian")
    assert (fresh.temperature, fresh.max_length, fresh.image_preprocess) == (0.02, 1024, "resize")
    assert load(VLM2VEC).train.vlm2vec == fresh  # the file writes the same numbers out


# -- uneven query / target chunks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("workers", "micro", "target", "expected"), [
    (4, 1, 1, (64, 64)),
    (4, 1, 2, (64, 64)),     # 64 query chunks, 32 target chunks
    (4, 4, 1, (64, 64)),     # 16 query chunks, 64 target chunks
    (4, 2, 8, (64, 32)),
    (4, 64, 16, (64, 4)),    # one query chunk, four target chunks
    (8, 32, 2, (32, 16)),
    (2, 8, None, (128, 16)),  # no micro_target: the targets follow micro
    (1, None, 32, (256, 8)),  # no micro: the queries in one chunk
    (16, 16, 16, (16, 1)),
])
def test_uneven_chunks_keep_the_global_batch(workers, micro, target, expected):
    config = load(VLM2VEC, {"resources.num_workers": workers, "train.batch.micro": micro,
                            "train.batch.micro_target": target})
    local, chunks = compute_accumulation(config)
    assert (local, chunks) == expected
    query_chunks = local // (micro or local)
    target_chunks = local // (target or micro or local)
    assert chunks == max(query_chunks, target_chunks)
    out = build_deepspeed_config(config)
    assert out["gradient_accumulation_steps"] == chunks  # one engine.backward per chunk
    assert out["train_micro_batch_size_per_gpu"] == min(micro or local, target or micro or local)
    assert out["train_batch_size"] == 256 == ds_product(out) * workers


@pytest.mark.parametrize(("workers", "global_", "micro", "target"), [(2, 12, 2, 3), (3, 18, 3, 2), (1, 6, 6, 1)])
def test_chunks_that_divide_differently_still_multiply_out(workers, global_, micro, target):
    config = load(VLM2VEC, {"resources.num_workers": workers, "train.batch.global": global_,
                            "train.batch.micro": micro, "train.batch.micro_target": target})
    local, chunks = compute_accumulation(config)
    assert chunks == max(local // micro, local // target)
    out = build_deepspeed_config(config)
    assert out["train_batch_size"] == global_ == ds_product(out) * workers


# -- validators: every error names its dotted key ----------------------------------------------------------------


def test_vlm2vec_refuses_zero_3():
    message = config_error(VLM2VEC, {"train.deepspeed.zero_stage": 3})
    assert "train.deepspeed.zero_stage: the VLM2Vec job runs ZeRO 0-2" in message
    assert "train.deepspeed.zero_stage" in config_error(VLM2VEC, {"train.deepspeed.zero_stage": 3}, smoke=True)
    for stage in (0, 1, 2):
        assert load(VLM2VEC, {"train.deepspeed.zero_stage": stage}).train.deepspeed.zero_stage == stage


def test_llava_runs_zero_3():
    assert load(PROJECTOR["patch"], {"train.deepspeed.zero_stage": 3}).train.deepspeed.zero_stage == 3


@pytest.mark.parametrize("path", [PROJECTOR["patch"], LORA["cls"], TRAIN / "clip_negclip_lock.yaml"],
                         ids=lambda p: p.stem)
def test_micro_target_only_for_vlm2vec(path):
    message = config_error(path, {"train.batch.micro_target": 1})
    assert "train.batch.micro_target: only the VLM2Vec job has separate target chunks" in message


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"train.batch.micro_target": 3}, "train.batch.micro_target: 3 does not divide the 64 rows per worker"),
    ({"train.batch.micro_target": 128}, "train.batch.micro_target: 128 does not divide the 64 rows per worker"),
    ({"resources.num_workers": 8, "train.batch.micro_target": 64},
     "train.batch.micro_target: 64 does not divide the 32 rows per worker"),
])
def test_micro_target_must_divide_the_rows_per_worker(overrides, expected):
    assert expected in config_error(VLM2VEC, overrides)


def test_micro_target_in_the_smoke_run_must_divide_too():
    message = config_error(VLM2VEC, {"train.batch.micro_target": 3}, smoke=True)
    assert "train.batch.micro_target: 3 does not divide the 4 rows per worker" in message


@pytest.mark.parametrize("key", ["train.batch.micro_target", "train.vlm2vec.temperature",
                                 "train.vlm2vec.max_length", "train.vlm2vec.adapter.r",
                                 "train.llava.max_length", "train.llava.lora.alpha"])
def test_non_positive_values_of_the_new_keys(key):
    path = LORA["patch"] if key.startswith("train.llava") else VLM2VEC
    assert f"{key}:" in config_error(path, {key: 0})


@pytest.mark.parametrize("feat", FEATURES)
def test_projector_lr_is_refused_on_stage_projector(feat):
    message = config_error(PROJECTOR[feat], {"train.llava.projector_lr": 2e-5})
    assert "train.llava.projector_lr: stage projector trains only the projector" in message
    assert "train.llava.projector_lr" in config_error(PROJECTOR[feat], {"train.llava.projector_lr": 2e-5},
                                                      smoke=True)
    # ... and accepted on stage lora, where it is the recipe's
    assert load(LORA[feat], {"train.llava.projector_lr": 1e-5}).train.llava.projector_lr == pytest.approx(1e-5)


@pytest.mark.parametrize("feat", FEATURES)
def test_vision_tower_is_refused_on_stage_lora(feat):
    message = config_error(LORA[feat], {"train.llava.vision_tower": "openai/clip-vit-large-patch14-336"})
    assert "train.llava.vision_tower: stage lora starts from a Llava checkpoint" in message
    # the smoke block takes the base smoke's tower back; set again after it, it is refused
    assert "train.llava.vision_tower" in config_error(LORA[feat], {"train.llava.vision_tower": "x"}, smoke=True)


def test_stage_lora_from_the_projector_file_needs_the_tower_removed():
    # switching stage 1's file to stage 2 keeps the base's vision tower: refused, with the key named
    message = config_error(PROJECTOR["patch"], {"train.llava.stage": "lora"})
    assert "train.llava.vision_tower" in message
    config = load(PROJECTOR["patch"], {"train.llava.stage": "lora", "train.llava.vision_tower": None})
    assert config.train.llava.conversation() == "v1"


@pytest.mark.parametrize(("path", "key", "value"), [
    (LORA["patch"], "train.llava.stage", "pretrain"),  # projector | lora | full
    (LORA["patch"], "train.llava.image_preprocess", "resize"),  # resize is VLM2Vec's, not LLaVA's
    (LORA["patch"], "train.llava.select_feature", "both"),
    (LORA["patch"], "train.llava.lora.init", "pissa"),
    (LORA["patch"], "train.llava.lora.dropout", 1.0),
    (LORA["patch"], "train.llava.projector_lr", 0),
    (LORA["patch"], "train.schedule.warmup_ratio", 1.0),
    (LORA["patch"], "train.schedule.warmup_ratio", -0.1),
    (LORA["patch"], "train.schedule.kind", "hf_linear"),
    (VLM2VEC, "train.vlm2vec.image_preprocess", "crop"),
    (VLM2VEC, "train.vlm2vec.adapter.init", "pissa"),
    (VLM2VEC, "train.vlm2vec.adapter.dropout", -0.1),
    (VLM2VEC, "train.llava.lora.foo", 1),
    (VLM2VEC, "train.vlm2vec.foo", 1),
])
def test_bad_values_of_the_new_keys(path, key, value):
    assert f"{key}:" in config_error(path, {key: value})


@pytest.mark.parametrize(("path", "loss"), [(LORA["patch"], "infonce"), (LORA["patch"], "clip"), (VLM2VEC, "lm"),
                                            (VLM2VEC, "siglip")])
def test_each_job_trains_with_its_own_loss(path, loss):
    message = config_error(path, {"train.loss.kind": loss})
    assert "train.loss.kind:" in message and repr(loss) in message


@pytest.mark.parametrize("path", [PROJECTOR["cls"], VLM2VEC], ids=lambda p: p.stem)
def test_llava_jobs_need_the_llava_family(path):
    message = config_error(path, {"model.family": "clip"})
    assert "model.family: job" in message and "accepts llava" in message


def test_hard_negatives_are_refused_on_the_llava_jobs():
    for path in (LORA["patch"], VLM2VEC):
        assert "train.loss.hard_negatives" in config_error(path, {"train.loss.hard_negatives": "leftright"})


# -- the stage helpers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "conversation", "preprocess", "grouping"), [
    ("projector", "plain", "processor", False), ("lora", "v1", "pad", True)])
def test_stage_defaults(stage, conversation, preprocess, grouping):
    llava = LlavaTrainConfig(stage=stage)
    assert llava.conversation() == conversation
    assert llava.resolved_preprocess() == preprocess
    assert llava.resolved_grouping() is grouping
    assert (llava.lora.r, llava.lora.alpha, llava.lora.dropout) == (128, 256, 0.05)


@pytest.mark.parametrize("stage", ["projector", "lora"])
def test_explicit_preprocess_and_grouping_win(stage):
    for preprocess in ("processor", "pad"):
        assert LlavaTrainConfig(stage=stage, image_preprocess=preprocess).resolved_preprocess() == preprocess
    for grouping in (False, True):
        assert LlavaTrainConfig(stage=stage, group_by_modality_length=grouping).resolved_grouping() is grouping


def test_overrides_reach_the_helpers_through_the_file():
    config = load(LORA["patch"], {"train.llava.image_preprocess": None, "train.llava.group_by_modality_length": False})
    assert config.train.llava.resolved_preprocess() == "pad"  # null: the stage's default
    assert config.train.llava.resolved_grouping() is False
    config = load(PROJECTOR["patch"], {"train.llava.group_by_modality_length": True,
                                       "train.llava.image_preprocess": "pad"})
    assert config.train.llava.resolved_grouping() is True and config.train.llava.resolved_preprocess() == "pad"
