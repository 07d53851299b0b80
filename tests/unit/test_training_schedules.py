"""The per-step learning rate of a training run (``run/training.py::build_schedule`` / ``resolve_warmup``).

``hf_cosine`` / ``linear`` must give every parameter group its own base lr x transformers' factor, exactly what the
HF Trainer's ``LambdaLR`` gives at the same update (step 0 = the first update), so LLaVA's projector group keeps its
1/10 ratio to the LoRA group at every step; ``warmup_ratio`` -> ceil(ratio x total). The open_clip kinds
(``cosine`` / ``const``) are unchanged. A resumed run (a checkpoint restores the groups' last lrs) still scales the
configured bases. Pure functions: no Ray, no DeepSpeed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from open_clip_train.scheduler import const_lr, cosine_lr
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from perceive_ray.config import ConfigError, load_config
from perceive_ray.run.training import build_schedule, resolve_warmup

TRAIN = Path(__file__).resolve().parents[2] / "experiments" / "train"
LORA = TRAIN / "llava15_patch_lora.yaml"  # hf_cosine, warmup_ratio 0.03, lr 2e-4, projector_lr 2e-5
VLM2VEC = TRAIN / "vlm2vec_llava15.yaml"  # linear, warmup_steps 100, lr 2e-5
NEGCLIP = TRAIN / "clip_negclip_lock.yaml"  # open_clip cosine, warmup_steps 50, lr 5e-6
FACTORIES = {"hf_cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}


def load(path: Path, overrides=None):
    return load_config(path, overrides or {})


def optimizer(bases: list[float]) -> torch.optim.Optimizer:
    groups = [{"params": [torch.zeros(2, requires_grad=True)], "lr": base} for base in bases]
    return torch.optim.AdamW(groups, lr=bases[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in opt.param_groups]


def hf_reference(kind: str, bases: list[float], warmup: int, total: int) -> list[list[float]]:
    """The groups' lrs at each update 0..total-1 of a real LambdaLR, driven as the HF Trainer drives it."""
    opt = optimizer(bases)
    scheduler = FACTORIES[kind](opt, warmup, total)
    out = []
    for _ in range(total):
        out.append(lrs(opt))  # the lr this update runs with
        opt.step()
        scheduler.step()
    return out


# (config, kind, total steps, expected warmup steps)
HF_CASES = {
    "lora_hf_cosine": (LORA, {}, "hf_cosine", 200, 6),
    "lora_hf_cosine_short": (LORA, {}, "hf_cosine", 4, 1),  # the smoke run: ceil(0.12)
    "lora_linear_ratio": (LORA, {"train.schedule.kind": "linear"}, "linear", 150, 5),  # ceil(4.5)
    "vlm2vec_linear": (VLM2VEC, {}, "linear", 1000, 100),
    "vlm2vec_hf_cosine": (VLM2VEC, {"train.schedule.kind": "hf_cosine"}, "hf_cosine", 250, 100),
    "vlm2vec_no_warmup": (VLM2VEC, {"train.schedule.warmup_steps": 0}, "linear", 40, 0),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_schedules_equal_transformers_lambdalr_for_every_group(case):
    path, overrides, kind, total, warmup = HF_CASES[case]
    config = load(path, overrides)
    assert config.train.schedule.kind == kind
    assert resolve_warmup(config, total) == warmup
    base = config.train.optim.lr
    bases = [base, base / 10]  # the LoRA group and the projector group (2e-4 / 2e-5 for LLaVA stage 2)
    expected = hf_reference(kind, bases, warmup, total)
    opt = optimizer(bases)
    schedule = build_schedule(opt, config, total)
    for step in range(total):
        returned = schedule(step)
        got = lrs(opt)
        assert got == pytest.approx(expected[step], rel=1e-12, abs=0), step
        assert returned == pytest.approx(got[0], rel=1e-12, abs=0)  # train.optim.lr's group
        if got[0] > 0:
            assert got[0] / got[1] == pytest.approx(10.0, rel=1e-12)
        else:
            assert got[1] == 0.0
    # warmup starts at 0 on the first update (transformers' factor step / warmup), peaks at the base, decays to ~0
    if warmup:
        assert schedule(0) == 0.0 and lrs(opt) == [0.0, 0.0]
    assert schedule(warmup) == pytest.approx(base, rel=1e-12)
    assert lrs(opt) == pytest.approx(bases, rel=1e-12)
    assert schedule(total) == pytest.approx(0.0, abs=1e-20)


def test_llava_stage_2_groups_keep_their_recipe_lrs():
    config = load(LORA)
    total = 5198  # ceil(665298 / 128): one epoch of mix-665K
    warmup = resolve_warmup(config, total)
    assert warmup == 156  # ceil(155.94)
    opt = optimizer([config.train.optim.lr, config.train.llava.projector_lr])
    schedule = build_schedule(opt, config, total)
    schedule(warmup)
    assert lrs(opt) == pytest.approx([2e-4, 2e-5], rel=1e-12)
    schedule(total // 2 + warmup // 2)  # the middle of the cosine: half the bases
    assert lrs(opt) == pytest.approx([1e-4, 1e-5], rel=1e-9)


def test_the_schedule_is_a_pure_function_of_the_step():
    config = load(LORA)
    total, bases = 60, [2e-4, 2e-5]
    expected = hf_reference("hf_cosine", bases, resolve_warmup(config, total), total)
    opt = optimizer(bases)
    schedule = build_schedule(opt, config, total)
    for step in (37, 3, 59, 0, 37, 12, 1):
        schedule(step)
        assert lrs(opt) == pytest.approx(expected[step], rel=1e-12, abs=0)


@pytest.mark.parametrize(("path", "kind"), [(LORA, "hf_cosine"), (VLM2VEC, "linear")])
def test_resume_uses_the_configured_bases_not_the_restored_lrs(path, kind):
    config = load(path)
    total, resume_at = 300, 170
    base = config.train.optim.lr
    bases = [base, base / 10]
    warmup = resolve_warmup(config, total)
    expected = hf_reference(kind, bases, warmup, total)
    opt = optimizer(bases)
    schedule = build_schedule(opt, config, total)  # built before the checkpoint is loaded (train_fn_per_worker)
    # the checkpoint load restores the optimizer state: the groups' lrs of the last update before the checkpoint
    for group, lr in zip(opt.param_groups, expected[resume_at - 1], strict=True):
        group["lr"] = lr
    for step in range(resume_at, total):
        schedule(step)
        assert lrs(opt) == pytest.approx(expected[step], rel=1e-12, abs=0), step
    # whatever state was restored (even a different lr altogether), the configured bases are scaled
    for group in opt.param_groups:
        group["lr"] = 1.0
    schedule(warmup)
    assert lrs(opt) == pytest.approx(bases, rel=1e-12)


# -- warmup ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "warmup"), [(1, 1), (4, 1), (33, 1), (34, 2), (100, 3), (101, 4), (2180, 66),
                                               (5198, 156)])
def test_warmup_ratio_is_the_ceiling_of_ratio_times_total(total, warmup):
    config = load(LORA)
    assert config.train.schedule.warmup_ratio == pytest.approx(0.03)
    assert resolve_warmup(config, total) == warmup == math.ceil(0.03 * total)


def test_warmup_ratio_overrides_warmup_steps():
    config = load(VLM2VEC, {"train.schedule.warmup_ratio": 0.1})
    assert config.train.schedule.warmup_steps == 100
    assert resolve_warmup(config, 1000) == 100 and resolve_warmup(config, 55) == 6
    assert resolve_warmup(load(VLM2VEC), 55) == 100  # no ratio: the steps as written
    assert resolve_warmup(load(LORA, {"train.schedule.warmup_ratio": 0.0}), 1000) == 0
    assert resolve_warmup(load(LORA, {"train.schedule.warmup_ratio": None, "train.schedule.warmup_steps": 7}),
                          1000) == 7


# -- the open_clip kinds are unchanged ------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "reference", "warmup"), [
    ({}, cosine_lr, 50),
    ({"train.schedule.kind": "const"}, const_lr, 50),
    ({"train.schedule.warmup_ratio": 0.1}, cosine_lr, 12),  # ceil(0.1 x 120): the ratio applies here too
])
def test_open_clip_kinds_equal_open_clip_train(overrides, reference, warmup):
    config = load(NEGCLIP, overrides)
    total, base = 120, config.train.optim.lr
    assert resolve_warmup(config, total) == warmup
    ours, theirs = optimizer([base, base / 10]), optimizer([base, base / 10])
    schedule = build_schedule(ours, config, total)
    adjust = reference(theirs, base, warmup, total)
    for step in range(total):
        assert schedule(step) == adjust(step)
        assert lrs(ours) == lrs(theirs)
        assert lrs(ours)[0] == lrs(ours)[1]  # open_clip's schedules set one lr for every group
    assert schedule(0) == pytest.approx(base / warmup)  # open_clip's warmup starts at 1 / warmup, not 0


def test_projector_lr_needs_a_per_group_schedule():
    with pytest.raises(ConfigError, match="train.llava.projector_lr"):
        load(LORA, {"train.schedule.kind": "cosine", "train.schedule.warmup_ratio": None})


# -- the worker's start: every rank begins from the same weights ----------------------------------------------------


class FakeJob:
    def __init__(self, checksum: dict[str, str]) -> None:
        self.checksum = checksum

    def init_checksum(self) -> dict[str, str]:
        return self.checksum


def test_init_checksums_are_recorded_by_rank_0_without_a_process_group(tmp_path):
    import json

    import torch.distributed as dist

    from perceive_ray.run.training import check_init_checksums

    assert not dist.is_initialized()
    check_init_checksums(FakeJob({"projector_init": "abc"}), tmp_path, rank=0)
    assert json.loads((tmp_path / "init_checksums.json").read_text()) == {"ranks": [{"projector_init": "abc"}]}
    other = tmp_path / "rank1"
    other.mkdir()
    check_init_checksums(FakeJob({"projector_init": "abc"}), other, rank=1)
    assert not (other / "init_checksums.json").exists()  # only rank 0 writes
    quiet = tmp_path / "no_checksum"
    quiet.mkdir()
    check_init_checksums(object(), quiet, rank=0)  # a job without init_checksum is not checked
    assert not any(quiet.iterdir())
