"""`perceive-ray report` end to end on a fixture sweep: an MLflow store (SQLite; a real `mlflow server` once)
with a parent sweep run, 3 FINISHED trials and 1 FAILED one, and the same sweep as folders. Numbers, intervals
and tests are checked against an independent computation from the outcomes the fixture drew."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from perceive_ray.report.command import run_report
from perceive_ray.report.data import (
    ReportError,
    load_run_dirs,
    load_runs_mlflow,
    load_sweep_dir,
    load_sweep_mlflow,
)
from perceive_ray.report.render import build_report

SWEEP = "clip_lock_sweep"
A, B, SEETRUE = "whatsup_controlled_a", "whatsup_controlled_b", "seetrue"
PAIRS = 30  # object pairs per What'sUp subset: 120 images, 60 relation-group pairs
GROUPS = {A: ("lr", "ou"), B: ("fb", "lr")}
# trial id -> (overrides, status, published row, per-image accuracy by relation group, pairs left out)
TRIALS = {
    "t0": ({"train.loss.kind": "clip", "train.clip.lock_image": True}, "FINISHED", "CLIP original",
           {"lr": 0.35, "ou": 0.7, "fb": 0.55}, ()),
    "t1": ({"train.loss.kind": "negclip", "train.clip.lock_image": True}, "FINISHED", None,
           {"lr": 0.75, "ou": 0.8, "fb": 0.7}, ()),
    "t2": ({"train.loss.kind": "negclip", "train.clip.lock_image": False}, "FINISHED", None,
           {"lr": 0.85, "ou": 0.85, "fb": 0.8}, (0, 1)),  # two incomplete pairs: units partly shared
    "t3": ({"train.loss.kind": "clip", "train.clip.lock_image": False}, "FAILED", None,
           {"lr": 0.5, "ou": 0.5, "fb": 0.5}, ()),
}
CHANCE = {"2way/individual_acc": 0.5, "2way/pair_acc": 0.25, "2way/lr/pair_acc": 0.25,
          "2way/ou/pair_acc": 0.25, "2way/fb/pair_acc": 0.25, "2way/lr/individual_acc": 0.5,
          "2way/ou/individual_acc": 0.5, "2way/fb/individual_acc": 0.5}


def label_of(overrides: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())


def draw_outcomes(trial: str) -> dict[str, dict[str, dict[str, int]]]:
    """benchmark -> metric -> unit -> 0/1, the way metrics/whatsup.py groups images into pairs."""
    _, _, _, accuracy, dropped = TRIALS[trial]
    rng = np.random.default_rng(int(trial[1:]) + 7)
    result: dict[str, dict[str, dict[str, int]]] = {}
    for bench, groups in GROUPS.items():
        metrics: dict[str, dict[str, int]] = {}
        for pair in range(PAIRS):
            for group in groups:
                images = [int(rng.random() < accuracy[group]) for _ in range(2)]
                if pair in dropped and group == groups[0]:
                    images = images[:1]  # an unreadable image: the pair is incomplete, not in pair metrics
                for j, ok in enumerate(images):
                    for key in ("2way/individual_acc", f"2way/{group}/individual_acc"):
                        metrics.setdefault(key, {})[f"p{pair}_{group}_{j}"] = ok
                if len(images) == 2:
                    for key in (f"2way/{group}/pair_acc", "2way/pair_acc"):
                        metrics.setdefault(key, {})[f"p{pair}/{group}"] = int(all(images))
        result[bench] = metrics
    return result


def write_run_dir(path: Path, trial: str) -> Path:
    path.mkdir(parents=True)
    config = {"kind": "eval", "benchmarks": [{"name": b} for b in (A, B, SEETRUE)]}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    for bench, metrics in draw_outcomes(trial).items():
        folder = path / bench
        folder.mkdir()
        values = {k: sum(units.values()) / len(units) for k, units in metrics.items()}
        counts = {}
        for key, units in metrics.items():
            counts[f"{key}/correct"], counts[f"{key}/total"] = sum(units.values()), len(units)
        payload = {"benchmark": bench, "metrics": values, "chance": {k: CHANCE[k] for k in values},
                   "counts": counts}
        (folder / "metrics.json").write_text(json.dumps(payload))
        rows = [(k, u, ok) for k, units in metrics.items() for u, ok in units.items()]
        write_outcomes(folder, rows)
    # SeeTRUE: ROC-AUC only (no per-unit outcomes: an empty table, as evaluation.py writes it).
    folder = path / SEETRUE
    folder.mkdir()
    auc = 0.6 + 0.1 * int(trial[1:])
    (folder / "metrics.json").write_text(json.dumps({
        "benchmark": SEETRUE, "metrics": {"drawbench/roc_auc": auc}, "chance": {"drawbench/roc_auc": 0.5},
        "counts": {}}))
    write_outcomes(folder, [])
    return path


def write_outcomes(folder: Path, rows: list[tuple[str, str, int]]) -> None:
    table = pa.table({"metric": pa.array([r[0] for r in rows], pa.string()),
                      "unit": pa.array([r[1] for r in rows], pa.string()),
                      "correct": pa.array([r[2] for r in rows], pa.int8())})
    pq.write_table(table, folder / "outcomes.parquet")


def write_sweep(root: Path) -> Path:
    """The sweep as folders: sweep.json, trials/<id>.json and each trial's evaluation run folder."""
    sweep_dir = root / "sweep"
    (sweep_dir / "trials").mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": SWEEP, "parent_run_id": None,
                                                      "tracking_uri": None}))
    for trial, (overrides, status, published, _, _) in TRIALS.items():
        run_dir = write_run_dir(root / "runs" / trial, trial)
        entry = {"trial_id": trial, "label": label_of(overrides), "overrides": overrides, "status": status,
                 "eval_run_dir": str(run_dir.resolve())}
        if published:
            entry["published_row"] = published
        (sweep_dir / "trials" / f"{trial}.json").write_text(json.dumps(entry))
    return sweep_dir


def populate_mlflow(uri: str, root: Path, artifact_location: str | None) -> str:
    """Parent sweep run + one child per trial (metrics, artifacts, tags as tracking/sweep.py sets them), after
    an older parent of the same sweep name that the report must not pick. Returns the newest parent's id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    experiment = client.create_experiment("report_test", artifact_location=artifact_location)
    sweep_tags = {"perceive.kind": "sweep", "perceive.sweep": SWEEP}
    old = client.create_run(experiment, run_name=SWEEP, start_time=1_000, tags=sweep_tags)
    client.set_terminated(old.info.run_id, "FINISHED")
    parent_id = client.create_run(experiment, run_name=SWEEP, tags=sweep_tags).info.run_id
    for trial, (overrides, status, published, _, _) in TRIALS.items():
        tags = {"mlflow.parentRunId": parent_id, "perceive.trial_id": trial, "perceive.kind": "trial",
                "perceive.trial_label": label_of(overrides), "perceive.overrides": json.dumps(overrides)}
        if published:
            tags["perceive.published_row"] = published
        child = client.create_run(experiment, run_name=label_of(overrides), tags=tags).info.run_id
        run_dir = root / "runs" / trial
        if status == "FINISHED":
            client.log_artifact(child, str(run_dir / "config.yaml"), "eval")
            for bench in (A, B, SEETRUE):
                values = json.loads((run_dir / bench / "metrics.json").read_text())["metrics"]
                client.log_batch(child, metrics=[Metric(f"{bench}/{k}", v, 0, 0)
                                                 for k, v in values.items()])
                for name in ("metrics.json", "outcomes.parquet"):
                    client.log_artifact(child, str(run_dir / bench / name), bench)
        client.set_terminated(child, status)
    client.set_terminated(parent_id, "FINISHED")
    return parent_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store and the same sweep as folders."""
    root = tmp_path_factory.mktemp("report")
    sweep_dir = write_sweep(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    parent_id = populate_mlflow(uri, root, (root / "artifacts").as_uri())
    return {"root": root, "uri": uri, "parent": parent_id, "sweep_dir": sweep_dir}


def numpy_interval(values, resamples=20_000, seed=12345):
    """Independent percentile bootstrap: plain numpy resampling of the units."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return np.percentile(means, 2.5), np.percentile(means, 97.5)


def exact_mcnemar(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


FINISHED = sorted((label_of(o), t) for t, (o, s, _, _, _) in TRIALS.items() if s == "FINISHED")
HEADLINE = [(A, "2way/individual_acc"), (A, "2way/pair_acc"), (A, "2way/lr/pair_acc"),
            (A, "2way/ou/pair_acc"), (B, "2way/individual_acc"), (B, "2way/pair_acc"),
            (B, "2way/lr/pair_acc"), (B, "2way/fb/pair_acc"), (SEETRUE, "drawbench/roc_auc")]


@pytest.fixture(scope="module")
def mlflow_report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    index = run_report(sweep=SWEEP, tracking_uri=store["uri"], out=out)
    return out, index, json.loads((out / "report.json").read_text())


def test_sweep_report_numbers_intervals_and_tests(mlflow_report):
    out, index, report = mlflow_report
    assert index == out / "index.html" and (out / "index.md").is_file()
    assert [r["label"] for r in report["runs"]] == [label for label, _ in FINISHED]  # by label, FAILED t3 out
    assert any("did not finish" in n and "FAILED" in n for n in report["notes"])
    assert [(c["benchmark"], c["metric"]) for c in report["columns"]] == HEADLINE
    assert {c["key"]: c["chance"] for c in report["columns"]}[f"{A}/2way/lr/pair_acc"] == 0.25
    drawn = {label: draw_outcomes(trial) for label, trial in FINISHED}
    for run in report["runs"]:
        for bench, metric in HEADLINE[:-1]:
            units = drawn[run["label"]][bench][metric]
            cell = run["cells"][f"{bench}/{metric}"]
            assert cell["value"] == pytest.approx(sum(units.values()) / len(units), abs=1e-12)
            assert cell["n"] == len(units) and cell["interval_from"] == "outcomes"
            low, high = numpy_interval(list(units.values()))
            step = 1 / len(units) + 0.005  # the bootstrap mean lives on a 1/n grid: one step of MC error
            assert abs(cell["low"] - low) <= step and abs(cell["high"] - high) <= step
            assert cell["low"] <= cell["value"] <= cell["high"]
        auc = run["cells"][f"{SEETRUE}/drawbench/roc_auc"]
        assert auc["low"] is None and auc["interval_from"] == "none"  # ROC-AUC: no units to resample
    tests = {(t["column"], t["config_a"], t["config_b"]): t for t in report["paired_tests"]}
    assert len(tests) == 3 * 8  # 3 pairs of configurations x 8 metrics with outcomes (none for the AUC)
    for la, lb in [(FINISHED[0][0], FINISHED[1][0]), (FINISHED[0][0], FINISHED[2][0]),
                   (FINISHED[1][0], FINISHED[2][0])]:
        for bench, metric in HEADLINE[:-1]:
            ua, ub = drawn[la][bench][metric], drawn[lb][bench][metric]
            shared = sorted(set(ua) & set(ub))
            b = sum(ua[u] and not ub[u] for u in shared)
            c = sum(ub[u] and not ua[u] for u in shared)
            test = tests[(f"{bench}/{metric}", la, lb)]
            assert (test["n"], test["b"], test["c"]) == (len(shared), b, c)
            assert test["p"] == pytest.approx(exact_mcnemar(b, c), rel=1e-9)
            assert test["difference"] == pytest.approx((b - c) / len(shared))
    # t2 left two pairs out: its pair metrics share fewer units with the others than there are pairs.
    label = {trial: label for label, trial in FINISHED}
    assert tests[(f"{A}/2way/lr/pair_acc", label["t0"], label["t1"])]["n"] == PAIRS
    assert tests[(f"{A}/2way/lr/pair_acc", label["t0"], label["t2"])]["n"] == PAIRS - 2


def test_published_numbers_factors_and_plots(mlflow_report):
    out, index, report = mlflow_report
    clip = next(r for r in report["runs"] if r["published_row"] == "CLIP original")
    assert clip["cells"][f"{A}/2way/lr/pair_acc"]["published"] == 1.9
    assert clip["cells"][f"{B}/2way/lr/pair_acc"]["published"] == 10.8
    assert clip["cells"][f"{A}/2way/ou/pair_acc"]["published"] is None
    assert all(cell is None or cell["published"] is None for r in report["runs"] if r is not clip
               for cell in r["cells"].values())
    html, md = index.read_text(), (out / "index.md").read_text()
    assert html.count("paper: 1.9%") == 1 and html.count("paper: 10.8%") == 1 and "paper: 1.9%" in md
    # Factor effects: both swept keys; a value's mean over its configurations = the mean of their numbers.
    factors = {f["key"]: f for f in report["factors"]}
    assert set(factors) == {"train.loss.kind", "train.clip.lock_image"}
    levels = {lv["value"]: lv for lv in factors["train.loss.kind"]["levels"]}
    assert set(levels) == {"clip", "negclip"} and len(levels["negclip"]["runs"]) == 2
    drawn = {label: draw_outcomes(trial)[A]["2way/individual_acc"] for label, trial in FINISHED}
    negclip = [drawn[label] for label in levels["negclip"]["runs"]]
    assert levels["negclip"]["mean"] == pytest.approx(np.mean([np.mean(list(u.values())) for u in negclip]))
    # Independent interval: draw unit ids from the union; each configuration's mean over the drawn ids it has.
    ids = sorted(set().union(*negclip))
    grid = np.array([[u.get(k, np.nan) for u in negclip] for k in ids])
    draws = grid[np.random.default_rng(3).integers(0, len(ids), size=(20_000, len(ids)))]
    means = np.nanmean(draws, axis=1).mean(axis=1)
    low, high = np.percentile(means, 2.5), np.percentile(means, 97.5)
    assert abs(levels["negclip"]["low"] - low) <= 0.015 and abs(levels["negclip"]["high"] - high) <= 0.015
    assert sorted(report["plots"]) == ["plots/factor_train.clip.lock_image.png",
                                       "plots/factor_train.loss.kind.png", "plots/whatsup_relations.png"]
    for plot in report["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in md
    assert html.count('src="data:image/png;base64,') == 3 and "<img src=\"plots/" not in html


def test_report_logged_to_parent(store, mlflow_report):
    from mlflow import MlflowClient

    client = MlflowClient(store["uri"])
    logged = {a.path for a in client.list_artifacts(store["parent"], "report")}
    assert {"report/index.html", "report/index.md", "report/report.json", "report/plots"} <= logged
    plots = {a.path for a in client.list_artifacts(store["parent"], "report/plots")}
    assert "report/plots/whatsup_relations.png" in plots


def _numbers(report: dict) -> dict:
    """Everything but where the runs came from (ids and sources differ between MLflow and folders)."""
    return {"columns": report["columns"], "tests": report["paired_tests"], "factors": report["factors"],
            "cells": {r["label"]: r["cells"] for r in report["runs"]}}


def test_offline_loaders_give_the_same_numbers(store, mlflow_report, tmp_path):
    _, _, from_mlflow = mlflow_report
    swept = load_sweep_dir(store["sweep_dir"])
    assert [r.run_id for r in swept.runs] == [t for _, t in FINISHED]
    assert swept.skipped == [label_of(TRIALS["t3"][0]) + " (FAILED)"]
    build_report(swept.runs, tmp_path / "dir", title="t")
    from_dir = json.loads((tmp_path / "dir" / "report.json").read_text())
    assert _numbers(from_dir) == _numbers(from_mlflow)
    # Run folders: labels are the folder names, no overrides (so no factors), but the same cells and tests.
    folders = load_run_dirs([store["root"] / "runs" / t for _, t in FINISHED])
    build_report(folders, tmp_path / "runs", title="t")
    from_runs = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert from_runs["factors"] == [] and from_runs["columns"] == from_mlflow["columns"]
    rename = {t: label for label, t in FINISHED}
    assert {rename[r["label"]]: r["cells"] for r in from_runs["runs"]} == {  # no published row from a folder
        label: {k: v | {"published": None} if v else v for k, v in cells.items()}
        for label, cells in _numbers(from_mlflow)["cells"].items()}
    # MLflow runs by id: the same numbers again.
    ids = [r.run_id for r in load_sweep_mlflow(store["uri"], SWEEP).runs]
    by_id = load_runs_mlflow(store["uri"], ids)
    assert [r.label for r in by_id] == [label for label, _ in FINISHED]
    assert [r.benchmarks[A].metrics for r in by_id] == [r.benchmarks[A].metrics for r in swept.runs]


def test_errors_name_what_is_missing(store, tmp_path):
    with pytest.raises(ReportError, match="no sweep named 'nope'"):
        load_sweep_mlflow(store["uri"], "nope")
    with pytest.raises(ReportError, match="no MLflow run 'deadbeef'"):
        load_runs_mlflow(store["uri"], ["deadbeef"])
    with pytest.raises(ReportError, match="no such database file"):
        load_sweep_mlflow(f"sqlite:///{tmp_path / 'missing.db'}", SWEEP)
    broken = tmp_path / "broken"
    write_run_dir(broken, "t1")
    (broken / B / "metrics.json").unlink()
    with pytest.raises(ReportError, match=re.escape(f"{broken / B}/metrics.json does not exist")):
        load_run_dirs([broken])
    with pytest.raises(ReportError, match="sweep.json does not exist"):
        load_sweep_dir(tmp_path)
    (broken / B / "metrics.json").write_text(json.dumps({"metrics": {"2way/pair_acc": 0.9}}))
    with pytest.raises(ReportError, match=r"outcomes.parquet: .*metrics.json does not have"):
        load_run_dirs([broken])
    with pytest.raises(ReportError, match="metric 'mmvp/pair_acc': no run has it"):
        run_report(run_dirs=[store["root"] / "runs" / "t0"], out=tmp_path / "o",
                   metrics=["mmvp/pair_acc"])
    with pytest.raises(ReportError, match="exactly one source"):
        run_report(sweep=SWEEP, run_dirs=[broken], out=tmp_path / "o")


def test_metrics_option_and_counts_fallback(store, tmp_path, capsys):
    """--metric picks columns; a run without outcomes.parquet gets intervals from counts, no paired tests."""
    run_dir = store["root"] / "runs" / "t1"
    old = tmp_path / "old_run"
    write_run_dir(old, "t1")
    for bench in (A, B, SEETRUE):
        (old / bench / "outcomes.parquet").unlink()
    index = run_report(run_dirs=[run_dir, old], out=tmp_path / "o", metrics=[f"{A}/2way/lr/pair_acc"])
    assert f"report: {index}" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [c["key"] for c in report["columns"]] == [f"{A}/2way/lr/pair_acc"]
    new_cell, old_cell = (r["cells"][f"{A}/2way/lr/pair_acc"] for r in report["runs"])
    # Same outcomes: the counts give the very interval the units give (the bootstrap sees one multiset).
    assert old_cell["interval_from"] == "counts" and new_cell["interval_from"] == "outcomes"
    assert (old_cell["low"], old_cell["high"]) == (new_cell["low"], new_cell["high"])
    assert report["paired_tests"] == []
    assert any("no per-unit outcomes for old_run" in n for n in report["notes"])
