"""The Grafana dashboards parse and query only metrics the code exports, each with the suffix its type gets in
Prometheus; every exported metric has a panel. The live training/sweep metrics (run/ray_metrics.py) keep their
bookkeeping without a running Ray (recording is then a no-op) and never raise into the training loop or Tune."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
SOURCES = {"eval": REPO / "perceive_ray" / "run" / "inference.py",
           "train": REPO / "perceive_ray" / "run" / "ray_metrics.py"}
EVAL = {"perceive_rows_scored", "perceive_rows_failed", "perceive_batch_latency_s"}
TRAIN = {"perceive_train_loss", "perceive_train_samples_per_s", "perceive_train_step_time_s", "perceive_train_step",
         "perceive_train_lr", "perceive_train_steps", "perceive_sweep_trials", "perceive_sweep_trials_finished",
         "perceive_sweep_best"}
# Prometheus series names per ray.util.metrics type (Ray adds the ray_ prefix)
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}


def exported_metrics(source: Path) -> dict[str, str]:
    """Name -> type of every ray.util.metrics Counter/Histogram/Gauge created in ``source``."""
    found = re.findall(r'metrics\.(Counter|Histogram|Gauge)\("([a-z_]+)"', source.read_text())
    return {name: kind for kind, name in found}


ALL = {name: kind for source in SOURCES.values() for name, kind in exported_metrics(source).items()}


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets (rows have none) and query variables."""
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def series_metric(series: str) -> str:
    """``ray_<exported name><suffix of its type>`` -> the exported name; AssertionError for anything else."""
    assert series.startswith("ray_"), series
    for name, kind in ALL.items():
        if any(series == f"ray_{name}{suffix}" for suffix in SUFFIXES[kind]):
            return name
    raise AssertionError(f"{series}: not an exported metric with its type's suffix "
                         f"(counters end in _total, gauges have no suffix)")


def used_metrics(dashboard: dict) -> set[str]:
    return {series_metric(s) for expr in queries(dashboard) for s in re.findall(r"\bray_perceive_[a-z_]+\b", expr)}


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text())


def test_exported_names():
    assert exported_metrics(SOURCES["eval"]) == dict.fromkeys(EVAL, "Counter") | {"perceive_batch_latency_s":
                                                                                   "Histogram"}
    train = exported_metrics(SOURCES["train"])
    assert set(train) == TRAIN
    assert {n for n, k in train.items() if k == "Counter"} == {"perceive_train_steps", "perceive_sweep_trials_finished"}
    assert {k for n, k in train.items() if n not in ("perceive_train_steps", "perceive_sweep_trials_finished")} == {
        "Gauge"}


@pytest.mark.parametrize("path", sorted(DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_every_dashboard_parses_and_queries_exported_metrics(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    assert used_metrics(dashboard), path.name


def test_each_exported_metric_has_a_panel():
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == ["perceive_eval.json", "perceive_train.json"]
    assert used_metrics(load("perceive_eval.json")) == EVAL
    assert used_metrics(load("perceive_train.json")) == TRAIN
    panels = {series_metric(s) for d in ("perceive_eval.json", "perceive_train.json")
              for panel in load(d)["panels"] for t in panel.get("targets", [])
              for s in re.findall(r"\bray_perceive_[a-z_]+\b", t["expr"])}
    assert panels == set(ALL)  # in a panel, not only in a variable query


@pytest.mark.parametrize("series", ["ray_perceive_train_steps", "ray_perceive_train_loss_total",
                                    "ray_perceive_sweep_trials_finished", "ray_perceive_rows_scored",
                                    "ray_perceive_train_epoch", "perceive_train_loss"])
def test_wrong_suffix_or_unknown_name_is_refused(series):
    with pytest.raises(AssertionError):
        series_metric(series)


# -- run/ray_metrics.py without Ray ----------------------------------------------------------------------------


def trial(trial_id, status="PENDING", **last_result):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=last_result)


def test_train_gauges_update_without_ray():
    """Outside a Ray worker recording is a no-op; in the full suite another test may have left Ray initialised in
    this process, where recording is real: both must work the same."""
    from perceive_ray.run.ray_metrics import TrainGauges

    gauges = TrainGauges()
    assert gauges._gauges is None  # created at the first update (rank 0 only)
    gauges.update({"train/loss": 1.5, "train/lr": 1e-4, "train/step": 3}, job="clip_finetune", run_id="r1")
    gauges.update({"train/loss": 1.2, "train/lr": 1e-4, "train/step": 5, "train/samples_per_s": 40.0,
                   "train/step_time_s": 0.8, "train/missing_images": 0}, job="clip_finetune", run_id="r1")
    assert gauges._last_step == 5 and not gauges._guard.disabled
    assert set(gauges._gauges) == {"loss", "samples_per_s", "step_time_s", "step", "lr"}


def test_train_gauges_never_raise(capsys):
    from perceive_ray.run.ray_metrics import TrainGauges

    gauges = TrainGauges()
    gauges.update({"train/loss": 1.0}, job="j", run_id="r")

    class Broken:
        def set(self, *args, **kwargs):
            raise RuntimeError("exporter down")

    gauges._gauges["loss"] = Broken()
    gauges.update({"train/loss": 2.0, "train/step": 1}, job="j", run_id="r")
    gauges.update({"train/loss": 3.0, "train/step": 2}, job="j", run_id="r")
    err = capsys.readouterr().err
    assert err.count("live metrics off") == 1 and "exporter down" in err
    assert gauges._guard.disabled
    gauges.update({"train/loss": object(), "train/lr": "x"}, job="j", run_id="r")  # disabled: nothing happens


def test_train_gauges_skip_values_that_are_not_numbers():
    from perceive_ray.run.ray_metrics import TrainGauges

    gauges = TrainGauges()
    gauges.update({"train/loss": "nan?", "train/lr": None, "train/step": True}, job="j", run_id="r")
    assert not gauges._guard.disabled and gauges._last_step is None


def test_sweep_callback_bookkeeping(capsys):
    from ray.tune import Callback

    from perceive_ray.run.ray_metrics import SweepProgressCallback

    metric = "whatsup_controlled_a/pair_acc"
    cb = SweepProgressCallback("token_usage", metric, "max")
    assert isinstance(cb, Callback)
    trials = [trial("t0"), trial("t1"), trial("t2"), trial("t3")]
    cb.setup(total_num_samples=4)
    cb.on_step_end(iteration=0, trials=trials)
    assert cb.counts()["PENDING"] == 4
    # Tune calls on_trial_start while the trial is still PENDING: the hook counts it RUNNING
    cb.on_trial_start(iteration=1, trials=trials, trial=trials[0])
    assert cb.counts()["RUNNING"] == 1 and cb.counts()["PENDING"] == 3
    trials[0].status = "RUNNING"
    cb.on_trial_start(iteration=1, trials=trials, trial=trials[1])
    trials[1].status = "RUNNING"
    cb.on_trial_result(iteration=2, trials=trials, trial=trials[0], result={metric: 0.41})
    cb.on_trial_result(iteration=2, trials=trials, trial=trials[1], result={"whatsup_controlled_a": {"pair_acc": 0.53}})
    assert (cb.best, cb.best_trial) == (0.53, "t1")
    cb.on_trial_result(iteration=3, trials=trials, trial=trials[0], result={metric: float("nan")})  # ignored
    cb.on_trial_result(iteration=3, trials=trials, trial=trials[0], result={"other": 0.9})  # ignored
    assert cb.best == 0.53
    # on_trial_complete comes while the trial is still RUNNING; on_trial_error after it is ERROR
    trials[1].last_result = {metric: 0.53}
    cb.on_trial_complete(iteration=4, trials=trials, trial=trials[1])
    trials[1].status = "TERMINATED"
    trials[0].status = "ERROR"
    cb.on_trial_error(iteration=4, trials=trials, trial=trials[0])
    cb.on_trial_error(iteration=4, trials=trials, trial=trials[0])  # the same trial is finished once
    assert cb.finished == {"t0", "t1"}
    counts = cb.counts()
    assert (counts["TERMINATED"], counts["ERROR"], counts["RUNNING"], counts["PENDING"]) == (1, 1, 0, 2)
    cb.on_trial_start(iteration=5, trials=trials, trial=trials[2])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6  # one per state change: 3 starts, 1 completion, 2 error hooks
    assert lines[-1] == ("[sweep token_usage] 2/4 finished, 1 running, 1 pending, 1 failed, "
                         "best whatsup_controlled_a/pair_acc=0.5300 (trial t1)")
    assert lines[0].startswith("[sweep token_usage] 0/4 finished, 1 running, 3 pending, best")
    assert lines[0].endswith("=none yet")


def test_sweep_callback_min_mode_and_restored_trials(capsys):
    from perceive_ray.run.ray_metrics import SweepProgressCallback

    cb = SweepProgressCallback("s", "loss", "min", echo=False)
    # a resumed sweep: finished trials come back TERMINATED with their last results
    trials = [trial("a", "TERMINATED", loss=0.7), trial("b", "TERMINATED", loss=0.4), trial("c")]
    cb.on_step_end(iteration=0, trials=trials)
    assert (cb.best, cb.best_trial) == (0.4, "b") and cb.counts()["TERMINATED"] == 2
    cb.on_trial_result(iteration=1, trials=trials, trial=trials[2], result={"loss": 0.5})
    assert cb.best == 0.4
    cb.on_trial_result(iteration=1, trials=trials, trial=trials[2], result={"loss": 0.1})
    assert (cb.best, cb.best_trial) == (0.1, "c")
    cb.on_experiment_end(trials=trials)
    assert capsys.readouterr().out == ""  # echo off
    assert "3/3" not in cb.summary() and cb.summary().startswith("[sweep s] 2/3 finished, 0 running, 1 pending")
    with pytest.raises(ValueError):
        SweepProgressCallback("s", "loss", "minimize")


def test_sweep_callback_never_raises(capsys):
    from perceive_ray.run.ray_metrics import SweepProgressCallback

    cb = SweepProgressCallback("s", "acc")

    class Broken:
        def set(self, *args, **kwargs):
            raise TypeError("bad tags")

        inc = set

    cb._metrics = (Broken(), Broken(), Broken())
    trials = [trial("a")]
    cb.on_trial_start(iteration=0, trials=trials, trial=trials[0])
    cb.on_trial_complete(iteration=1, trials=trials, trial=trials[0])
    assert capsys.readouterr().err.count("live metrics off") == 1
    assert cb.finished == {"a"} and cb.counts()["TERMINATED"] == 1  # bookkeeping goes on


def test_result_value():
    from perceive_ray.run.ray_metrics import result_value

    assert result_value({"a/b": 1}, "a/b") == 1.0
    assert result_value({"a": {"b": 2}}, "a/b") == 2.0
    assert result_value({"a": {"b": "x"}}, "a/b") is None
    assert result_value({"a": math.inf}, "a") is None
    assert result_value(None, "a") is None and result_value({}, "a") is None
