"""The demo study (experiments/sweeps/demo_study.yaml as `perceive-ray demo` runs it): every trial validates in the
demo's working folder, the variants share one encoder, one world, one seed and one step budget (nothing tuned per
variant), and the verdicts are decided by the tests they name (planted outcomes)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from perceive_ray.report.data import BenchmarkData, RunData
from perceive_ray.run import demo
from perceive_ray.sweep_config import check_sweep, load_sweep, plan_trial, probe_points, shared_configs

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "experiments" / "sweeps" / "demo_study.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.prepare_workdir(root, seed=0, quick=True, resume=False)
    here = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(here)


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_every_variant_validates_and_shares_encoder_data_seed_and_budget(workdir, quick):
    sweep = load_sweep(SWEEP, smoke=quick)
    assert sweep.config.name == "demo_study"
    [(pretrain, pretrain_config)] = shared_configs(sweep)
    assert pretrain.id == "pretrain" and pretrain_config.job == "clip_finetune"
    assert pretrain_config.data.sources[0].name == "web"  # the relation-free web captions
    checked = check_sweep(sweep, fixed={"seed": 3})
    points = [dict(p) for p in probe_points(sweep.config)]
    labels = [p["+variant"]["label"] for p in points]
    assert sorted(labels) == sorted(demo.VARIANTS)
    export = "/exports/pretrain"
    checked_after = check_sweep(sweep, fixed={"seed": 3}, shared={"pretrain": export})
    trained = [c for c in checked_after if c.stages]
    assert len(trained) == 5
    for configs in checked_after:
        stage = configs.stages[0] if configs.stages else None
        if stage is None:  # the [CLS] cosine row scores the pretrained CLIP itself
            assert configs.evaluation.model.source == export
            continue
        encoder = stage.train.llava.vision_tower if stage.job == "llava" else stage.model.source
        assert encoder == export  # one frozen encoder for every variant
        assert stage.seed == 3 and configs.evaluation.seed == 3
    budgets = {(c.stages[0].train.max_steps, c.stages[0].train.batch.global_) for c in trained}
    assert len(budgets) == 1  # the same steps x rows for every trained variant
    captions = {str(c.stages[0].data.sources[0].path) for c in trained}
    assert len(captions) == 1 and captions.pop().endswith("world/llava/captions_558k.json")
    llava = [c.stages[0] for c in trained if c.stages[0].job == "llava"]
    assert [s.train.llava.select_feature for s in llava] == ["patch", "cls"]
    assert llava[0].model_dump(exclude={"train": {"llava": {"select_feature"}}}) == \
        llava[1].model_dump(exclude={"train": {"llava": {"select_feature"}}})
    assert all(plan_trial(sweep, p).evaluation.parent.name == "demo" for p in points)
    assert checked  # the stand-ins (random-init models) validate too


def run_with(label: str, a_units: list[int], b_units: list[int]) -> RunData:
    def bench(units: list[int]) -> BenchmarkData:
        outcomes = pd.DataFrame({"metric": demo.POOLED, "unit": [f"u{i}" for i in range(len(units))],
                                 "correct": units})
        return BenchmarkData({demo.POOLED: sum(units) / len(units)}, {demo.POOLED: 0.25}, {}, outcomes)
    return RunData(label, label, {}, None, {demo.BENCH_A: bench(a_units), demo.BENCH_B: bench(b_units)})


def test_verdicts_follow_the_paired_tests():
    n = 40
    low = [1 if i % 8 == 0 else 0 for i in range(n)]  # 12.5%: at chance or below
    high = [1 if i % 8 else 0 for i in range(n)]  # 87.5%, right wherever low is wrong
    runs = {label: run_with(label, low, low) for label in demo.VARIANTS}
    runs[demo.LLAVA] = run_with(demo.LLAVA, high, high)
    verdicts = demo.decide(runs)
    outcomes = [v.outcome for v in verdicts]
    # CLS at chance; CLS vs PACL and PACL vs RoPE identical (no difference); the LLaVA comparisons all significant
    assert outcomes == ["agrees", "not resolved", "not resolved", "agrees", "agrees", "agrees"]
    assert "McNemar exact p = " in verdicts[3].sentence and "70 pairs only the second got right" in verdicts[3].sentence
    runs[demo.LLAVA_CLS] = run_with(demo.LLAVA_CLS, [1] * n, [1] * n)  # LLaVA-cls beats LLaVA: the opposite
    assert demo.decide(runs)[5].outcome == "disagrees"
    runs[demo.CLS] = run_with(demo.CLS, high, high)  # far above chance
    assert demo.decide(runs)[0].outcome == "disagrees"


def test_demo_cli_refuses_bad_input_before_anything_runs(tmp_path, capsys):
    from perceive_ray.cli import main

    assert main(["demo", "--experiments-dir", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    assert "sweeps/demo_study.yaml" in capsys.readouterr().err
    assert main(["demo", "--seed", "-1", "--workdir", str(tmp_path / "w"),
                 "--experiments-dir", str(REPO / "experiments")]) == 2
    assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing written


def test_demo_cli_refuses_a_foreign_world_folder_and_keeps_the_last_results(tmp_path, capsys):
    """A workdir whose world/ holds someone else's files: exit 2 naming the folder, before the previous demo's
    sweep, models and report are cleared (nothing already computed is lost) and before Ray starts."""
    from perceive_ray.cli import main

    work = tmp_path / "w"
    (work / "world" / "web").mkdir(parents=True)
    (work / "world" / "web" / "mine.txt").write_text("not ours")
    for name in ("sweeps", "models", "report"):
        (work / name).mkdir()
        (work / name / "kept.txt").write_text("previous run")
    assert main(["demo", "--quick", "--workdir", str(work), "--experiments-dir", str(REPO / "experiments")]) == 2
    err = capsys.readouterr().err
    assert "--workdir" in err and str(work / "world") in err and "Traceback" not in err
    assert (work / "world" / "web" / "mine.txt").read_text() == "not ours"
    assert all((work / name / "kept.txt").is_file() for name in ("sweeps", "models", "report"))
