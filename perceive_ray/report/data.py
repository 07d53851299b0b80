"""Report inputs: runs and sweeps read from MLflow or from evaluation run folders into one in-memory form.

A run is a configuration's label, its swept overrides, an optional row of the paper's tables, and per
benchmark the ``metrics.json`` content with the per-unit 0/1 outcomes (``outcomes.parquet``) that intervals
and paired tests resample. The MLflow loaders read through ``tracking/reading.py`` (only tracking/ imports
mlflow), and only when called (a report of run folders needs no tracking server). Bad input raises ReportError
naming the sweep, run or file.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from perceive_ray.config import redact_uri

# Tags of the sweep bookkeeping (tracking/sweep.py writes them).
KIND_TAG, SWEEP_TAG, PARENT_TAG = "perceive.kind", "perceive.sweep", "mlflow.parentRunId"
LABEL_TAG, OVERRIDES_TAG = "perceive.trial_label", "perceive.overrides"
PUBLISHED_TAG = "perceive.published_row"
METRICS_FILE, OUTCOMES_FILE, CONFIG_FILE = "metrics.json", "outcomes.parquet", "config.yaml"
REPORT_ARTIFACT_PATH = "report"


class ReportError(ValueError):
    """A report cannot be built from this input; the message names the sweep, run or file."""


@dataclass
class BenchmarkData:
    """One benchmark of one run: metrics.json's values, chance levels and counts, and the per-unit outcomes.

    ``outcomes``: a pandas DataFrame (metric, unit, correct), or None when the run has no outcomes.parquet
    (runs made before it existed); a metric that is not a plain mean of 0/1 outcomes (ROC-AUC) has no rows
    either way."""

    metrics: dict[str, float]
    chance: dict[str, float]
    counts: dict[str, int]
    outcomes: Any = None

    @cached_property
    def _units(self) -> dict[str, Any]:
        import pandas as pd

        if self.outcomes is None or self.outcomes.empty:
            return {}
        return {str(key): pd.Series(rows["correct"].to_numpy(), index=rows["unit"].to_numpy(), name=str(key))
                for key, rows in self.outcomes.groupby("metric", sort=False)}

    def units(self, metric: str) -> Any:
        """``metric``'s outcomes as a 0/1 Series indexed by unit id, or None when it has none."""
        return self._units.get(metric)


@dataclass
class RunData:
    run_id: str
    label: str
    overrides: dict[str, Any]
    published_row: str | None
    benchmarks: dict[str, BenchmarkData]
    source: str = ""  # where it was read from (a folder, or the tracking URI), for the list of runs


@dataclass
class SweepData:
    name: str
    parent_run_id: str | None
    tracking_uri: str | None
    runs: list[RunData]
    skipped: list[str] = field(default_factory=list)  # "label (STATUS)" of trials that did not finish


# ------------------------------------------------------------------------------------------------ run folders


def read_benchmark(folder: Path, where: str) -> BenchmarkData:
    """``folder``/metrics.json (+ outcomes.parquet); ``where`` names the folder in messages."""
    metrics_file = folder / METRICS_FILE
    if not metrics_file.is_file():
        raise ReportError(f"{where}/{METRICS_FILE} does not exist")
    try:
        payload = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{where}/{METRICS_FILE}: not readable JSON ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("metrics"), dict):
        raise ReportError(f"{where}/{METRICS_FILE}: no 'metrics' object")
    metrics = {str(k): float(v) for k, v in payload["metrics"].items()}
    chance = {str(k): float(v) for k, v in (payload.get("chance") or {}).items()}
    counts = {str(k): int(v) for k, v in (payload.get("counts") or {}).items()}
    outcomes_file = folder / OUTCOMES_FILE
    outcomes = None
    if outcomes_file.is_file():
        outcomes = _read_outcomes(outcomes_file, metrics, f"{where}/{OUTCOMES_FILE}")
    return BenchmarkData(metrics, chance, counts, outcomes)


def _read_outcomes(path: Path, metrics: dict[str, float], where: str) -> Any:
    """The outcomes table, checked: the intervals are only as right as these rows, so a table that disagrees
    with metrics.json is an error rather than a report with intervals around other numbers."""
    import pandas as pd

    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise ReportError(f"{where}: not a readable Parquet table ({type(exc).__name__}: {exc})") from None
    missing = {"metric", "unit", "correct"} - set(table.columns)
    if missing:
        raise ReportError(f"{where}: missing column(s) {sorted(missing)}; expected metric, unit, correct")
    table = pd.DataFrame({"metric": table["metric"].astype(str), "unit": table["unit"].astype(str),
                          "correct": table["correct"].astype("int8")})
    if not table["correct"].isin((0, 1)).all():
        raise ReportError(f"{where}: 'correct' must be 0 or 1")
    duplicated = table.duplicated(["metric", "unit"])
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise ReportError(f"{where}: unit {row['unit']!r} appears twice for metric {row['metric']!r}")
    for key, rows in table.groupby("metric", sort=True):
        if key not in metrics:
            raise ReportError(f"{where}: outcomes of metric {key!r}, which metrics.json does not have")
        if abs(float(rows["correct"].mean()) - metrics[key]) > 1e-9:
            raise ReportError(f"{where}: metric {key!r} is {metrics[key]:.6g} in metrics.json but the mean "
                              f"of its {len(rows)} outcomes is {rows['correct'].mean():.6g}")
    return table


def _expected_benchmarks(run_dir: Path) -> list[str]:
    """The benchmarks config.yaml lists ([] when it is absent or has none)."""
    import yaml

    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        return []
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ReportError(f"{config_file}: not readable YAML ({exc})") from None
    entries = config.get("benchmarks") if isinstance(config, dict) else None
    return [str(e["name"]) for e in entries or [] if isinstance(e, dict) and e.get("name")]


def read_run_dir(path: str | Path, *, run_id: str | None = None, label: str | None = None,
                 overrides: dict[str, Any] | None = None, published_row: str | None = None) -> RunData:
    """An evaluation run folder: every benchmark its config.yaml lists must have finished (metrics.json);
    without a config.yaml, every sub-folder holding a metrics.json is a benchmark."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist")
    names = _expected_benchmarks(run_dir) or sorted(
        p.name for p in run_dir.iterdir() if p.is_dir() and (p / METRICS_FILE).is_file())
    if not names:
        raise ReportError(f"run folder {run_dir}: no <benchmark>/{METRICS_FILE} and no {CONFIG_FILE} "
                          "naming benchmarks (not an evaluation run folder?)")
    benchmarks = {name: read_benchmark(run_dir / name, str(run_dir / name)) for name in names}
    return RunData(run_id or run_dir.name, label or run_dir.name, dict(overrides or {}), published_row,
                   benchmarks, source=str(run_dir.resolve()))


def load_run_dirs(paths: list[str | Path]) -> list[RunData]:
    """Run folders, in the order given; the label of each is its folder name."""
    if not paths:
        raise ReportError("no run folder given")
    return [read_run_dir(p) for p in paths]


def load_sweep_dir(path: str | Path) -> SweepData:
    """A sweep folder (sweep.json + trials/<trial id>.json): its FINISHED trials' eval runs, by label."""
    sweep_dir = Path(path)
    meta_file = sweep_dir / "sweep.json"
    if not meta_file.is_file():
        raise ReportError(f"{meta_file} does not exist (not a sweep folder)")
    meta = _read_json(meta_file)
    trial_files = sorted((sweep_dir / "trials").glob("*.json"))
    if not trial_files:
        raise ReportError(f"sweep folder {sweep_dir}: no trials/*.json")
    runs, skipped = [], []
    for trial_file in trial_files:
        trial = _read_json(trial_file)
        trial_id = str(trial.get("trial_id") or trial_file.stem)
        label = str(trial.get("label") or trial_id)
        if trial.get("status") != "FINISHED":
            skipped.append(f"{label} ({trial.get('status') or 'no status'})")
            continue
        if not trial.get("eval_run_dir"):
            raise ReportError(f"{trial_file}: FINISHED but no eval_run_dir")
        eval_dir = Path(trial["eval_run_dir"])
        overrides = trial.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ReportError(f"{trial_file}: 'overrides' must be an object of dotted key -> value")
        runs.append(read_run_dir(eval_dir if eval_dir.is_absolute() else sweep_dir / eval_dir,
                                 run_id=trial_id, label=label, overrides=overrides,
                                 published_row=trial.get("published_row")))
    if not runs:
        raise ReportError(f"sweep folder {sweep_dir}: no FINISHED trial ({', '.join(skipped)})")
    runs.sort(key=lambda r: r.label)
    return SweepData(str(meta.get("name") or sweep_dir.name), meta.get("parent_run_id"),
                     meta.get("tracking_uri"), runs, skipped)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return payload


# ----------------------------------------------------------------------------------------------------- MLflow


def _reader(uri: str) -> Any:
    """An MLflow reader on ``uri`` (tracking/reading.py) after a fail-fast reachability check."""
    from perceive_ray.tracking.reading import MlflowReader
    from perceive_ray.tracking.tracker import TrackingError

    try:
        return MlflowReader(uri)
    except TrackingError as exc:
        raise ReportError(str(exc)) from None


def _quoted(value: str, what: str) -> str:
    if "'" in value or "\\" in value:
        raise ReportError(f"{what} {value!r}: quotes and backslashes are not allowed")
    return value


def _run_label(run: Any) -> str:
    return run.data.tags.get(LABEL_TAG) or run.info.run_name or run.info.run_id


def _run_from_mlflow(run: Any, tmp: Path, reader: Any) -> RunData:
    """A run's tags and metrics.json/outcomes.parquet artifacts (downloaded into ``tmp``, read)."""
    from perceive_ray import registry

    run_id, tags = run.info.run_id, run.data.tags
    label = _run_label(run)
    try:
        overrides = json.loads(tags.get(OVERRIDES_TAG) or "{}")
    except json.JSONDecodeError as exc:
        raise ReportError(f"run {run_id} ({label}): tag {OVERRIDES_TAG} is not JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise ReportError(f"run {run_id} ({label}): tag {OVERRIDES_TAG} must be a JSON object")
    repo = reader.artifacts(run)
    benchmarks: dict[str, BenchmarkData] = {}
    for folder in sorted(a.path for a in repo.list_artifacts() if a.is_dir):
        names = {a.path.rsplit("/", 1)[-1] for a in repo.list_artifacts(folder)}
        if METRICS_FILE not in names:
            continue  # eval/, train/, ...: not a benchmark
        (tmp / run_id).mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, OUTCOMES_FILE):
            if name in names:  # lands as dst/<folder>/<name>
                repo.download_artifacts(f"{folder}/{name}", str(tmp / run_id))
        where = f"run {run_id} ({label}) artifact {folder}"
        benchmarks[folder] = read_benchmark(tmp / run_id / folder, where)
    # A benchmark whose metrics were logged must have its metrics.json too (its chance levels, its outcomes).
    known = set(registry.names("benchmarks"))
    logged = {key.split("/", 1)[0] for key in run.data.metrics if "/" in key} & known
    missing = sorted(logged - set(benchmarks))
    if missing:
        raise ReportError(f"run {run_id} ({label}): metrics of {missing[0]} but no artifact "
                          f"{missing[0]}/{METRICS_FILE}")
    if not benchmarks:
        raise ReportError(f"run {run_id} ({label}): no <benchmark>/{METRICS_FILE} artifact")
    return RunData(run_id, label, overrides, tags.get(PUBLISHED_TAG) or None, benchmarks,
                   source=redact_uri(reader.uri))


def load_sweep_mlflow(uri: str, sweep_name: str) -> SweepData:
    """The newest sweep parent run named ``sweep_name`` (any experiment), its FINISHED children by label."""
    name = _quoted(sweep_name, "sweep name")
    reader = _reader(uri)
    wanted = f"tags.`{KIND_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{name}'"
    parents = reader.search(wanted, newest_only=True)
    if not parents:
        raise ReportError(f"no sweep named {sweep_name!r} in {redact_uri(uri)} (no run tagged "
                          f"{KIND_TAG}=sweep, {SWEEP_TAG}={sweep_name})")
    parent_id = parents[0].info.run_id
    children = reader.search(f"tags.`{PARENT_TAG}` = '{parent_id}'")
    # Shared runs (a pretrained encoder every trial starts from) have no evaluation of their own.
    children = [c for c in children if c.data.tags.get(KIND_TAG, "trial") == "trial"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    skipped = sorted(f"{_run_label(c)} ({c.info.status})" for c in children
                     if c.info.status != "FINISHED")
    if not finished:
        raise ReportError(f"sweep {sweep_name!r} (parent run {parent_id}): no FINISHED trial run"
                          + (f" ({', '.join(skipped)})" if skipped else ""))
    with tempfile.TemporaryDirectory(prefix="perceive-report-") as tmp:
        runs = [_run_from_mlflow(c, Path(tmp), reader) for c in finished]
    runs.sort(key=lambda r: r.label)
    return SweepData(sweep_name, parent_id, uri, runs, skipped)


def load_runs_mlflow(uri: str, run_ids: list[str]) -> list[RunData]:
    """MLflow runs by id, in the order given (any status: the caller chose them)."""
    if not run_ids:
        raise ReportError("no run id given")
    reader = _reader(uri)
    runs = []
    with tempfile.TemporaryDirectory(prefix="perceive-report-") as tmp:
        for run_id in run_ids:
            run = reader.get_run(run_id)
            if run is None:
                raise ReportError(f"no MLflow run {run_id!r} in {redact_uri(uri)}")
            runs.append(_run_from_mlflow(run, Path(tmp), reader))
    return runs


def log_report_artifacts(uri: str, run_id: str, folder: str | Path) -> None:
    """Log the report folder's files under ``report/`` of ``run_id`` (a sweep's parent run)."""
    _reader(uri).log_artifacts(run_id, folder, REPORT_ARTIFACT_PATH)
