"""``perceive-ray track RUN_DIR``: log a finished run directory to a tracker after the fact.

For runs whose tracking failed mid-run and runs made with ``--no-track``. Everything a live evaluation sends is in
the run directory: params from ``config.yaml``, tags from ``run_record.json`` (provenance, identity, the scorer's
``describe()``), metrics from each ``<benchmark>/metrics.json``, the tables as artifacts. If ``tracking.json`` names
an MLflow run of the same URI (a run left RUNNING by a dead server or a killed driver), that run is reopened and
finished: one MLflow run per run id.
"""

from __future__ import annotations

import json
from pathlib import Path

from perceive_ray.config import ConfigError, config_record, load_config
from perceive_ray.run_directory import (
    CONFIG_FILE,
    RECORD_FILE,
    read_record,
    read_tracking_state,
    write_tracking_state,
)
from perceive_ray.tracking.run_record import experiment_tags, flatten_tags
from perceive_ray.tracking.tracker import MlflowTracker, resolve_tracking_uri

ARTIFACTS = ("scores.parquet", "metrics.json", "outcomes.parquet", "errors.parquet")


def track_run_dir(run_dir: str | Path, *, uri: str | None = None, experiment: str | None = None,
                  timeout_s: float = 10.0, max_retries: int = 2) -> str:
    """Log ``run_dir`` to the tracker at ``uri`` (default: the run's config, else MLFLOW_TRACKING_URI, else
    ./mlflow.db); returns the MLflow run id."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record is None or not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {RECORD_FILE} / {CONFIG_FILE}: not a run directory, or nothing was scored")
    config = load_config(run_dir / CONFIG_FILE)
    configured = config.tracking.uri if config.tracking.uri and "***" not in config.tracking.uri else None
    uri = resolve_tracking_uri(uri or configured)
    tracker = MlflowTracker(uri, experiment or config.tracking.experiment, timeout_s=timeout_s,
                            max_retries=max_retries)
    identity = record.get("identity", {})
    evaluations = record.get("evaluations") or [{}]
    tags = experiment_tags(config, identity, runner=evaluations[-1].get("runner", "unknown"), run_id=run_dir.name)
    tags |= flatten_tags({"describe": identity.get("describe", {})}) | {"logged_by": "perceive-ray track"}
    resume = read_tracking_state(run_dir, uri)
    tracker.start(run_dir.name, config_record(config), tags, resume_run_id=resume)
    status = "FAILED"
    try:
        for bench in config.benchmarks:
            bench_dir = run_dir / bench.name
            metrics_file = bench_dir / "metrics.json"
            if not metrics_file.is_file():
                continue  # never finished: nothing to log for it
            report = json.loads(metrics_file.read_text())
            metrics = {f"{bench.name}/{key}": value for key, value in report["metrics"].items()}
            metrics[f"{bench.name}/image_errors"] = float(report.get("image_errors", 0))
            metrics[f"{bench.name}/items_excluded"] = float(report.get("items_excluded", 0))
            metrics |= {f"{bench.name}/{key}": float(n) for key, n in report["counts"].items()
                        if key.endswith("/excluded")}
            tracker.log_metrics(metrics)
            for name in ARTIFACTS:
                if (bench_dir / name).is_file():
                    tracker.log_artifact(bench_dir / name, bench.name)
        for name in (CONFIG_FILE, RECORD_FILE):
            tracker.log_artifact(run_dir / name)
        status = "FINISHED"
    finally:
        tracker.finish(status)
        write_tracking_state(run_dir, uri, experiment or config.tracking.experiment, tracker.run_id, status)
    return tracker.run_id
