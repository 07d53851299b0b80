"""Sweep files: schema, search dimensions, key routing (train / eval / stages / bundles), up-front validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from perceive_ray.cli import main
from perceive_ray.config import ConfigError
from perceive_ray.sweep_config import (
    build_trial_configs,
    changed_files,
    check_sweep,
    experiment_files,
    file_digests,
    load_sweep,
    plan_trial,
    probe_points,
    published_row,
    shared_configs,
    shared_stand_ins,
    stage_run_id,
    trial_label,
)

REPO = Path(__file__).resolve().parents[2]
# demo_study reads the world `perceive-ray demo` writes into its working folder: checked in test_demo_study.py.
SWEEPS = sorted(p for p in (REPO / "experiments" / "sweeps").glob("*.yaml") if p.stem != "demo_study")


def write_sweep(tmp_path: Path, **fields) -> Path:
    data = {"kind": "sweep", "name": "t", "experiment": str(REPO / "experiments/train/clip_ft.yaml"),
            "evaluate": {"experiment": str(REPO / "experiments/eval/clip_whatsup.yaml"), "trained": ["model.source"]},
            "search": {"train.clip.lock_image": {"grid": [True, False]}},
            "objective": {"metric": "whatsup_controlled_a/2way/lr/pair_acc"}}
    data.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_paper_tables_each_have_a_sweep_file():
    assert [p.stem for p in SWEEPS] == ["llava_cls_patch", "token_usage", "training_data", "vlm2vec_vs_vqascore",
                                        "vqascore_modes"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_every_trial_of_every_sweep_file_validates(path, smoke):
    sweep = load_sweep(path, smoke=smoke)
    assert sweep.config.name == path.stem  # `perceive-ray report --sweep <name>` finds it by the file's name
    checked = check_sweep(sweep)
    assert checked and all(c.evaluation.benchmarks for c in checked)
    if smoke:  # the smoke trials only use what --smoke prepares (tiny models, synthetic data), on the CPU
        for configs in checked:
            assert all(not getattr(c.resources, "use_gpu", False) for c in configs.stages)
            assert configs.evaluation.resources.num_gpus_per_actor == 0


def test_search_dimensions_and_their_probe_values(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, search={
        "train.clip.lock_image": {"grid": [True, False]},
        "train.optim.lr": {"loguniform": [1e-6, 1e-4]},
        "seed": {"randint": [0, 5]},
        "train.optim.weight_decay": {"choice": [0.0, 0.1, 0.2]}}))
    points = list(probe_points(sweep.config))
    assert [p["train.clip.lock_image"] for p in points[:2]] == [True, False]
    seen = {k: {p[k] for p in points} for k in points[0]}
    assert seen["train.optim.lr"] == {1e-6, 1e-4} and seen["seed"] == {0, 4}  # randint's high is exclusive
    assert seen["train.optim.weight_decay"] == {0.0, 0.1, 0.2}
    assert len(check_sweep(sweep)) == len(points) == 2 + 1 + 1 + 2


@pytest.mark.parametrize(("search", "message"), [
    ({"train.los.kind": {"grid": ["clip"]}}, "train.los"),
    ({"train.loss.kind": {"grid": ["clip", "sparc"]}}, "trial kind=sparc"),
    ({"scorer.options.mod": {"grid": ["t2v"]}}, "mod"),
    ({"train.clip.lock_image": {"grid": []}}, "at least one value"),
    ({"train.optim.lr": {"uniform": [1.0, 0.1]}}, "below high"),
    ({"train.optim.lr": {"grid": [1.0], "choice": [2.0]}}, "exactly one of"),
])
def test_a_bad_key_or_value_fails_the_sweep_at_once_naming_it(tmp_path, search, message):
    path = write_sweep(tmp_path, search=search)
    with pytest.raises(ConfigError, match=message) as info:
        check_sweep(load_sweep(path))
    assert str(path) in str(info.value)


def test_objective_must_name_an_evaluated_benchmark(tmp_path):
    path = write_sweep(tmp_path, objective={"metric": "mmvp/pair_acc"})
    with pytest.raises(ConfigError, match="objective.metric.*mmvp"):
        check_sweep(load_sweep(path))


def test_keys_are_routed_to_the_training_or_the_evaluation_config(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path), smoke=True)
    point = {"train.optim.lr": 0.5, "scorer.batch_size": 3, "eval.resources.num_actors": 2, "seed": 7}
    plan = plan_trial(sweep, point)
    assert plan.base == {"train.optim.lr": 0.5, "seed": 7}
    assert plan.evaluation_overrides == {"scorer.batch_size": 3, "resources.num_actors": 2}
    configs = build_trial_configs(sweep, point)
    assert configs.stages[0].train.optim.lr == 0.5 and configs.stages[0].seed == 7
    assert configs.evaluation.scorer.batch_size == 3 and configs.evaluation.resources.num_actors == 2


def test_bundles_switch_files_and_label_the_trial(tmp_path):
    path = write_sweep(tmp_path, experiment=str(REPO / "experiments/eval/llava15_whatsup.yaml"), evaluate=None,
                       search={"+row": {"grid": [
                           {"label": "VQAScore", "scorer.options.mode": "t2v"},
                           {"label": "contrastive", "experiment": str(REPO / "experiments/train/vlm2vec_llava15.yaml"),
                            "evaluate": {"experiment": str(REPO / "experiments/eval/vlm2vec_whatsup.yaml"),
                                         "trained": ["model.source"]}}]}},
                       published={"LLaVA-1.5-7B": {"+row": "VQAScore"}})
    sweep = load_sweep(path, smoke=True)
    first, second = [dict(p) for p in probe_points(sweep.config)]
    assert trial_label(first) == "VQAScore" and trial_label(second) == "contrastive"
    assert not plan_trial(sweep, first).trains and plan_trial(sweep, second).trains
    assert published_row(sweep.config, first) == "LLaVA-1.5-7B" and published_row(sweep.config, second) is None
    configs = check_sweep(sweep)
    assert [len(c.stages) for c in configs] == [0, 1]
    assert configs[0].evaluation.scorer.name == "vqascore" and configs[1].evaluation.scorer.name == "vlm2vec"


def test_stages_chain_and_the_eval_reads_the_last_stage(tmp_path):
    sweep = load_sweep(REPO / "experiments/sweeps/llava_cls_patch.yaml", smoke=True)
    out = tmp_path / "runs"
    configs = build_trial_configs(sweep, {"train.llava.select_feature": "cls"}, fixed={"output_dir": str(out)},
                                  trial_id="abc")
    first, second = configs.stages
    assert first.train.llava.stage == "projector" and second.train.llava.stage == "lora"
    assert first.train.llava.select_feature == second.train.llava.select_feature == "cls"
    assert second.model.source == "train:abc-stage1" == f"train:{stage_run_id('abc', 0, 2)}"
    with pytest.raises(ConfigError, match="abc-stage2"):  # not trained yet: the eval's train: ref cannot resolve
        build_trial_configs(sweep, {"train.llava.select_feature": "cls"}, fixed={"output_dir": str(out)},
                            trial_id="abc", trained=True)
    export = out / "train" / "abc-stage2" / "export"
    export.mkdir(parents=True)
    trained = build_trial_configs(sweep, {"train.llava.select_feature": "cls"}, fixed={"output_dir": str(out)},
                                  trial_id="abc", trained=True)
    assert trained.evaluation.model.source == str(export)


def test_shared_runs_are_validated_and_their_refs_substituted(tmp_path):
    clip_ft = str(REPO / "experiments/train/clip_ft.yaml")
    path = write_sweep(tmp_path, shared=[{"id": "base", "experiment": clip_ft}],
                       experiment=str(REPO / "experiments/train/pacl.yaml"),
                       evaluate={"experiment": str(REPO / "experiments/eval/pacl_whatsup.yaml"),
                                 "trained": ["scorer.options.head_weights"]},
                       search={"+row": {"grid": [
                           {"label": "cls", "experiment": str(REPO / "experiments/eval/clip_whatsup.yaml"),
                            "model.source": "shared:base"},
                           {"label": "pacl", "model.source": "shared:base"}]}})
    sweep = load_sweep(path, smoke=True)
    shared = shared_configs(sweep)
    assert [stage.id for stage, _ in shared] == ["base"] and shared[0][1].job == "clip_finetune"
    stand_ins = shared_stand_ins(shared)  # before the shared run exists: its starting model (same architecture)
    assert stand_ins == {"base": str(Path(str(shared[0][1].model.source)).resolve())} or \
        stand_ins == {"base": str(shared[0][1].model.source)}
    cls, pacl = check_sweep(sweep, shared={"base": "/exports/base"})
    assert cls.evaluation.model.source == "/exports/base" and not cls.stages
    assert pacl.stages[0].model.source == "/exports/base"
    check_sweep(sweep)  # the stand-ins validate too
    bad = write_sweep(tmp_path, search={"train.clip.lock_image": {"grid": [True]}},
                      overrides={"model.source": "shared:nothere"})
    with pytest.raises(ConfigError, match="model.source: 'shared:nothere' names no shared run"):
        check_sweep(load_sweep(bad))
    dup = write_sweep(tmp_path, shared=[{"id": "a", "experiment": clip_ft}, {"id": "a", "experiment": clip_ft}])
    with pytest.raises(ConfigError, match="ids must be unique"):
        load_sweep(dup)
    evalonly = write_sweep(tmp_path, shared=[{"id": "a", "experiment": str(REPO / "experiments/eval/clip_whatsup.yaml")}])
    with pytest.raises(ConfigError, match="shared: a: experiment: .* is not a training experiment"):
        check_sweep(load_sweep(evalonly))


def test_published_selectors_must_be_swept_keys(tmp_path):
    path = write_sweep(tmp_path, published={"CLIP original": {"train.loss.kind": "clip"}})
    with pytest.raises(ConfigError, match="does not vary"):
        check_sweep(load_sweep(path))


def test_labels_read_like_overrides():
    assert trial_label({"train.loss.kind": "negclip", "train.clip.lock_image": True}) == \
        "kind=negclip, lock_image=true"
    assert trial_label({"a.kind": 1, "b.kind": 2.5}) == "a.kind=1, b.kind=2.5"
    assert trial_label({"x.y": {"k": [1]}}) == f"y={json.dumps({'k': [1]})}"


def test_sweep_cli_rejects_a_bad_file_before_ray(tmp_path, capsys):
    path = write_sweep(tmp_path, search={"train.clip.lock_imag": {"grid": [True]}})
    assert main(["sweep", str(path), "--storage", str(tmp_path / "s"), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert "lock_imag" in err and str(path) in err
    assert not (tmp_path / "s").exists()  # nothing written


def test_storage_must_be_a_mounted_path(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    with pytest.raises(ConfigError, match="s3://"):
        sweep.folder("s3://bucket/sweeps")
    assert sweep.folder(tmp_path) == (tmp_path / "t").resolve()


def test_validate_cli_checks_sweep_files(tmp_path, capsys):
    assert main(["validate", str(REPO / "experiments/sweeps/training_data.yaml")]) == 0
    assert "12 validated point(s)" in capsys.readouterr().out
    bad = write_sweep(tmp_path, search={"train.clip.lock_imag": {"grid": [True]}})
    assert main(["validate", str(bad)]) == 2


def test_experiment_files_are_every_file_the_trials_and_shared_runs_read():
    exp = REPO / "experiments"
    files = experiment_files(load_sweep(exp / "sweeps/training_data.yaml", smoke=True))
    assert files == sorted(p.resolve() for p in [exp / "train/clip_ft.yaml", exp / "_base/train_clip.yaml",
                                                 exp / "eval/clip_whatsup.yaml", exp / "_base/eval.yaml"])
    # the demo: its shared pretraining, every variant's bundle files (training and evaluation), their two bases
    demo = experiment_files(load_sweep(exp / "sweeps/demo_study.yaml", smoke=True))
    assert demo == sorted([*(p.resolve() for p in (exp / "demo").glob("*.yaml")),
                           (exp / "_base/demo_train.yaml").resolve(), (exp / "_base/eval.yaml").resolve()])


def test_resume_refuses_experiment_files_changed_since_the_sweep_started(tmp_path, capsys):
    """sweep.json records the files' sha256 at the start; --resume names an edited one (a base file here) and exits
    2 before Ray; a trial that starts after the edit fails on the same check (``changed_files``)."""
    exp = tmp_path / "experiments"
    shutil.copytree(REPO / "experiments", exp)
    path = write_sweep(tmp_path, experiment=str(exp / "train/clip_ft.yaml"),
                       evaluate={"experiment": str(exp / "eval/clip_whatsup.yaml"), "trained": ["model.source"]})
    sweep = load_sweep(path)
    recorded = file_digests(experiment_files(sweep))
    assert str((exp / "_base/train_clip.yaml").resolve()) in recorded
    folder = sweep.folder(tmp_path / "s")
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"sweep": sweep.to_dict(), "extra": {}, "files": recorded}))
    resume = ["sweep", str(path), "--resume", "--storage", str(tmp_path / "s"), "--no-track"]
    assert changed_files(recorded) == []
    assert main(resume) == 2 and "no sweep state to resume" in capsys.readouterr().err  # unchanged: next check

    base = exp / "_base/train_clip.yaml"
    base.write_text(base.read_text().replace("lr: 5.0e-6", "lr: 1.0e-5"))
    assert changed_files(recorded) == [str(base.resolve())]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert str(base.resolve()) in err and "changed since the sweep started" in err and "Traceback" not in err
    (exp / "eval/clip_whatsup.yaml").unlink()
    assert changed_files(recorded) == sorted([str(base.resolve()), str((exp / "eval/clip_whatsup.yaml").resolve())])
