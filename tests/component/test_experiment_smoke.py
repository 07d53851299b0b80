"""Every evaluation experiment's smoke block runs ON ITS OWN BENCHMARKS (synthetic data in their real formats): the
same file that targets a GPU cluster runs here on tiny models. (Training experiments' smoke blocks train in
tests/ray/test_training.py and tests/e2e/test_train_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perceive_ray import registry
from perceive_ray.cli import main
from perceive_ray.config import load_config
from perceive_ray.data.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((REPO / "experiments" / "eval").rglob("*.yaml"))
TINY_PREFIX = "runs/tiny/"


def tiny_name(path: Path) -> str:
    source = load_config(path, smoke=True).model.source
    assert source.startswith(TINY_PREFIX), f"{path}: smoke model.source must be {TINY_PREFIX}<tiny family>"
    return source[len(TINY_PREFIX):].split("/")[0]  # runs/tiny/<name>[/part]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("smoke")
    generate(path / "synth", seed=0, pairs=2)
    for name in sorted({tiny_name(p) for p in EXPERIMENTS}):
        registry.resolve("tiny", name)(path / "runs" / "tiny" / name, seed=0)
    return path


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_smoke_block_uses_the_experiments_own_benchmarks(experiment):
    real, smoke = load_config(experiment), load_config(experiment, smoke=True)
    assert [b.name for b in smoke.benchmarks] == [b.name for b in real.benchmarks]
    assert all(str(b.root).startswith("synth/") for b in smoke.benchmarks)


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_smoke_block_runs(experiment, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = workdir / "out" / experiment.stem
    assert main(["score", str(experiment), "--smoke", "--no-track", "--out", str(out)]) == 0, capsys.readouterr().err
    config = load_config(experiment, smoke=True)
    for bench in config.benchmarks:
        metrics = json.loads((out / bench.name / "metrics.json").read_text())
        assert metrics["items_scored"] == min(bench.limit or 10**9, metrics["items_in_benchmark"])
        assert metrics["metrics"], f"{experiment.name}: no metrics for {bench.name}"
