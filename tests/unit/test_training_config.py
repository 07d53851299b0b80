"""The ``kind: train`` schema: loading (+ smoke), dotted overrides, every validator, the batch split, the record."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from perceive_ray.config import (
    ConfigError,
    apply_overrides,
    config_record,
    dump_config,
    load_config,
    load_raw,
    validate,
)
from perceive_ray.training_config import (
    TrainExperimentConfig,
    compute_accumulation,
    resolve_hard_negatives,
    resolve_loss_kind,
)

REPO = Path(__file__).resolve().parents[2]
NEGCLIP = REPO / "experiments/train/clip_negclip_lock.yaml"
HEADS = REPO / "experiments/train/pacl_rope.yaml"  # the heads job, for the heads-only validators


def load(path: Path = NEGCLIP, overrides=(), *, smoke: bool = False) -> TrainExperimentConfig:
    return load_config(path, overrides, smoke=smoke)


def config_error(overrides, path: Path = NEGCLIP, *, smoke: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, overrides, smoke=smoke)
    message = str(info.value)
    assert str(path) in message  # the file is named too
    return message


# -- loading ---------------------------------------------------------------------------------------------------


def test_negclip_lock_loads_as_written():
    config = load()
    assert isinstance(config, TrainExperimentConfig)
    assert config.kind == "train" and config.name == "clip_negclip_lock" and config.job == "clip_finetune"
    assert (config.model.family, config.model.source, config.model.pretrained) == ("clip", "ViT-L-14-336", "openai")
    assert [s.name for s in config.data.sources] == ["llava_558k", "llava_665k"]
    assert [s.format for s in config.data.sources] == ["pretrain", "mix"]
    assert config.train.epochs == 5
    assert (config.train.batch.global_, config.train.batch.micro) == (512, 32)
    assert config.train.optim.name == "adamw" and config.train.optim.lr == pytest.approx(5e-6)
    assert config.train.optim.betas == (0.9, 0.98) and config.train.optim.weight_decay == 0.0
    assert config.train.schedule.kind == "cosine" and config.train.schedule.warmup_steps == 50
    assert config.train.loss.kind == "negclip" and config.train.loss.hard_negatives is None
    assert resolve_loss_kind(config) == "negclip" and resolve_hard_negatives(config) == "leftright"
    assert config.train.clip.lock_image and config.train.clip.grad_checkpointing
    assert config.train.deepspeed.zero_stage == 2 and config.train.deepspeed.precision == "auto"
    assert config.train.deepspeed.grad_clip is None
    assert config.resources.num_workers == 4 and config.resources.use_gpu
    assert config.train.max_steps is None
    assert compute_accumulation(config) == (128, 4)
    assert config.smoke  # the smoke block is kept (validate_file checks both modes)


def test_negclip_lock_smoke():
    config = load(smoke=True)
    assert config.model.source == "runs/tiny/clip" and config.model.pretrained is None
    assert [str(s.path) for s in config.data.sources] == ["synth/llava/synthetic_558k.json",
                                                            "synth/llava/synthetic_mix665k.json"]
    assert (config.train.batch.global_, config.train.batch.micro) == (8, 2)
    assert config.train.max_steps == 4 and config.train.epochs == 1
    assert config.train.optim.lr == pytest.approx(1e-4)
    assert config.train.optim.betas == (0.9, 0.98)  # untouched keys of a merged mapping survive
    assert (config.resources.num_workers, config.resources.use_gpu) == (2, False)
    assert config.tracking.experiment == "perceive_ray_smoke"
    assert config.train.loss.kind == "negclip"  # the experiment's own keys survive the smoke block
    assert compute_accumulation(config) == (4, 2)


def test_heads_experiment_defaults():
    config = load(HEADS)
    assert config.job == "heads" and config.train.heads.kind == "pacl_rope"
    assert config.train.loss.kind is None
    assert resolve_loss_kind(config) == "pacl" and resolve_hard_negatives(config) == "none"
    sparc = load(HEADS, ["train.heads.kind=sparc_rope"])
    assert resolve_loss_kind(sparc) == "sparc"


# -- dotted overrides --------------------------------------------------------------------------------------------


def test_string_overrides():
    config = load(overrides=["train.optim.lr=1e-5", "train.batch.global=1024", "train.deepspeed.zero_stage=3",
                             "train.clip.lock_image=false", "resources.num_workers=8"])
    assert config.train.optim.lr == pytest.approx(1e-5)
    assert config.train.batch.global_ == 1024 and config.train.batch.micro == 32
    assert config.train.deepspeed.zero_stage == 3 and config.train.clip.lock_image is False
    assert compute_accumulation(config) == (128, 4)


def test_dict_overrides_use_the_global_alias():
    config = load(overrides={"train.batch.global": 16}, smoke=True)  # after the smoke block
    assert config.train.batch.global_ == 16 and config.train.batch.micro == 2
    assert compute_accumulation(config) == (8, 4)
    config = load(overrides={"train.batch.global": 64, "train.batch.micro": 8, "train.optim.betas": (0.9, 0.999)})
    assert compute_accumulation(config) == (16, 2)
    assert config.train.optim.betas == (0.9, 0.999)


def test_override_of_a_whole_mapping_and_null_micro():
    config = load(overrides=["train.batch={global: 64}"])
    assert config.train.batch.micro is None
    assert compute_accumulation(config) == (16, 1)  # micro null: all of a worker's rows in one chunk


def test_python_attribute_name_is_not_a_key():
    message = config_error({"train.batch.global_": 16})
    assert "train.batch.global_: unknown key" in message


# -- validators: every error names its dotted key ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["train.foo", "train.batch.foo", "train.optim.momentum", "train.deepspeed.stage",
                                 "train.loss.margin", "train.heads.layers", "train.clip.lock_vision"])
def test_unknown_key_under_train(key):
    assert f"{key}: unknown key" in config_error({key: 1})


def test_unknown_job():
    message = config_error(["job=nope"])
    assert "job: unknown training job 'nope'" in message and "clip_finetune" in message and "heads" in message


def test_family_not_accepted_by_job():
    assert "model.family: job 'clip_finetune' accepts clip" in config_error(["model.family=llm2clip"])


@pytest.mark.parametrize("kind", ["pacl", "sparc"])
def test_loss_kind_not_allowed_for_clip_finetune(kind):
    assert f"train.loss.kind: job 'clip_finetune' trains with clip, negclip, siglip, not '{kind}'" in config_error(
        [f"train.loss.kind={kind}"])


@pytest.mark.parametrize("kind", ["clip", "negclip", "siglip"])
def test_loss_kind_not_allowed_for_heads(kind):
    assert "train.loss.kind: job 'heads' trains with pacl, sparc" in config_error([f"train.loss.kind={kind}"], HEADS)


def test_unknown_loss_kind_is_a_schema_error():
    assert "train.loss.kind:" in config_error(["train.loss.kind=triplet"])


def test_negclip_needs_leftright():
    assert "train.loss.hard_negatives: negclip needs leftright" in config_error(["train.loss.hard_negatives=none"])
    config = load(overrides=["train.loss.hard_negatives=leftright"])  # explicit leftright is fine
    assert resolve_hard_negatives(config) == "leftright"


def test_clip_with_leftright():
    message = config_error(["train.loss.kind=clip", "train.loss.hard_negatives=leftright"])
    assert "train.loss.hard_negatives: kind clip has no negatives" in message
    config = load(overrides=["train.loss.kind=clip"])  # clip: negatives default to none
    assert resolve_hard_negatives(config) == "none"


def test_siglip_takes_either_negatives():
    assert resolve_hard_negatives(load(overrides=["train.loss.kind=siglip"])) == "none"
    config = load(overrides=["train.loss.kind=siglip", "train.loss.hard_negatives=leftright"])
    assert resolve_hard_negatives(config) == "leftright"


def test_hard_negatives_only_for_clip_finetune():
    message = config_error(["train.loss.hard_negatives=leftright"], HEADS)
    assert "train.loss.hard_negatives: only the clip_finetune job uses hard negatives" in message


@pytest.mark.parametrize(("heads", "loss"), [("pacl", "sparc"), ("pacl_rope", "sparc"), ("sparc", "pacl"),
                                             ("sparc_rope", "pacl")])
def test_heads_kind_vs_loss(heads, loss):
    message = config_error([f"train.heads.kind={heads}", f"train.loss.kind={loss}"], HEADS)
    assert f"train.loss.kind: heads of kind {heads!r} train with" in message and f"not {loss!r}" in message


@pytest.mark.parametrize(("heads", "loss"), [("pacl", "pacl"), ("sparc", "sparc"), ("sparc_rope", "sparc")])
def test_heads_kind_with_its_own_loss(heads, loss):
    config = load(HEADS, [f"train.heads.kind={heads}", f"train.loss.kind={loss}"])
    assert resolve_loss_kind(config) == loss


def test_pacl_llm_text_on_the_wrong_family():
    message = config_error(["train.heads.kind=pacl_llm_text", "data.text_embeddings=emb.pt"], HEADS)
    assert "train.heads.kind: pacl_llm_text runs on the llm2clip family" in message
    message = config_error(["model.family=llm2clip"], HEADS)  # a clip head on llm2clip
    assert "train.heads.kind: pacl_llm_text runs on the llm2clip family, the other heads on clip" in message


def test_pacl_llm_text_needs_text_embeddings():
    overrides = ["train.heads.kind=pacl_llm_text", "model.family=llm2clip"]
    message = config_error(overrides, HEADS)
    assert "data.text_embeddings: pacl_llm_text heads need precomputed LLM text embeddings" in message
    with_store = [*overrides, "data.text_embeddings=runs/emb/text.pt"]
    # the heads base augments captions; precomputed vectors cannot cover captions drawn at training time
    assert "data.pacl_augment: the LLM-text head reads precomputed text vectors" in config_error(with_store, HEADS)
    config = load(HEADS, [*with_store, "data.pacl_augment=false"])
    assert config.data.text_embeddings == Path("runs/emb/text.pt")
    assert resolve_loss_kind(config) == "pacl"


def test_pacl_augment_belongs_to_heads():
    assert "data.pacl_augment: the PACL caption augmentation belongs to the heads job" in config_error(
        ["data.pacl_augment=true"])
    assert load(HEADS).data.pacl_augment is True


def test_duplicate_source_names():
    message = config_error(["data.sources.1.name=llava_558k"])
    assert "data.sources: source names must be unique" in message


def test_empty_sources():
    assert "data.sources:" in config_error({"data.sources": []})


def test_decode_tasks_caps_the_decoding_pool():
    assert load().data.decode_tasks is None  # default: as many tasks as the CPUs allow
    assert load(overrides=["data.decode_tasks=1"]).data.decode_tasks == 1
    assert load(overrides=["data.decode_tasks=0"]).data.decode_tasks == 0  # the workers decode their own rows
    assert "data.decode_tasks" in config_error({"data.decode_tasks": -1})


def test_global_batch_not_divisible_by_workers():
    message = config_error(["train.batch.global=510"])
    assert "train.batch.global: 510 rows do not split over 4 workers" in message
    assert "resources.num_workers" in message
    message = config_error(["resources.num_workers=3"])
    assert "train.batch.global: 512 rows do not split over 3 workers" in message


def test_micro_not_dividing_local_rows():
    message = config_error(["train.batch.micro=48"])
    assert "train.batch.micro: 48 does not divide the 128 rows per worker" in message
    message = config_error(["train.batch.micro=256"])  # larger than the rows per worker
    assert "train.batch.micro: 256 does not divide the 128 rows per worker" in message
    assert compute_accumulation(load(overrides={"resources.num_workers": 4}, smoke=True)) == (2, 1)
    message = config_error({"resources.num_workers": 8}, smoke=True)  # 1 row per worker, micro 2
    assert "train.batch.micro: 2 does not divide the 1 rows per worker" in message


def test_offload_needs_its_zero_stage():
    message = config_error({"train.deepspeed.zero_stage": 0, "train.deepspeed.offload_optimizer": True})
    assert "train.deepspeed.offload_optimizer: needs zero_stage >= 1" in message
    for stage in (0, 1, 2):
        message = config_error({"train.deepspeed.zero_stage": stage, "train.deepspeed.offload_param": True})
        assert "train.deepspeed.offload_param: needs zero_stage 3" in message
    config = load(overrides={"train.deepspeed.zero_stage": 3, "train.deepspeed.offload_param": True,
                             "train.deepspeed.offload_optimizer": True})
    assert config.train.deepspeed.offload_param and config.train.deepspeed.offload_optimizer
    assert load(overrides={"train.deepspeed.zero_stage": 1, "train.deepspeed.offload_optimizer": True})


@pytest.mark.parametrize("key", ["train.batch.global", "train.batch.micro", "train.optim.lr", "train.epochs",
                                 "resources.num_workers"])
def test_non_positive_values(key):
    assert f"{key}:" in config_error({key: 0})


@pytest.mark.parametrize(("key", "value"), [("train.deepspeed.zero_stage", 4), ("train.deepspeed.precision", "fp16"),
                                            ("train.deepspeed.grad_clip", 0),
                                            ("train.deepspeed.stage3_param_persistence_threshold", -1),
                                            ("train.optim.name", "sgd"), ("train.schedule.kind", "step")])
def test_bad_values(key, value):
    assert f"{key}:" in config_error({key: value})


def test_several_errors_are_reported_together():
    message = config_error({"train.foo": 1, "train.optim.lr": -1})
    assert "2 configuration error(s)" in message
    assert "train.foo: unknown key" in message and "train.optim.lr:" in message


# -- the global batch is kept whatever the worker count ----------------------------------------------------------


@pytest.mark.parametrize(("workers", "expected"), [(1, (512, 16)), (2, (256, 8)), (4, (128, 4)), (16, (32, 1))])
def test_compute_accumulation(workers, expected):
    config = load(overrides={"resources.num_workers": workers})
    local, chunks = compute_accumulation(config)
    assert (local, chunks) == expected
    assert (local // chunks) * workers * chunks == config.train.batch.global_ == 512
    assert local // chunks == 32  # the micro batch is what the worker count does not change


def test_compute_accumulation_raises_value_error_when_called_directly():
    config = load()
    bad = config.model_copy(update={"resources": config.resources.model_copy(update={"num_workers": 5})})
    with pytest.raises(ValueError, match="train.batch.global: 512 rows do not split over 5 workers"):
        compute_accumulation(bad)


# -- the record ----------------------------------------------------------------------------------------------------


def test_config_record_dumps_global_by_alias():
    config = load()
    record = config_record(config)
    assert record["train"]["batch"] == {"global": 512, "micro": 32, "micro_target": None}
    assert "global_:" not in yaml.safe_dump(record)
    assert yaml.safe_load(dump_config(config))["train"]["batch"] == {"global": 512, "micro": 32, "micro_target": None}
    assert record["kind"] == "train" and record["job"] == "clip_finetune"


def test_config_record_round_trips():
    for config in (load(), load(smoke=True), load(HEADS)):
        again = validate(config_record(config), source="record")
        assert isinstance(again, TrainExperimentConfig)
        assert again == config


def test_record_overrides_round_trip_through_apply_overrides():
    raw = apply_overrides(load_raw(NEGCLIP), {"train.batch.global": 256})
    config = validate(raw, source="raw")
    assert config.train.batch.global_ == 256 and compute_accumulation(config) == (64, 2)


@pytest.mark.parametrize("experiment", sorted((REPO / "experiments" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_training_smoke_blocks_train_tiny_models_on_synthetic_data_on_cpu(experiment):
    config = load_config(experiment, smoke=True)
    # tiny models, or (a later stage) the smoke run of the earlier stage, resolved when the run is prepared
    assert config.model.source.startswith(("runs/tiny/", "train:")), experiment
    assert all(str(s.path).startswith("synth/") and str(s.image_root).startswith("synth/")
               for s in config.data.sources), experiment
    assert not config.resources.use_gpu and config.train.max_steps is not None
