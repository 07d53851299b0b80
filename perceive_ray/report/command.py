"""``perceive-ray report``: pick the loader for the source named, build the report, log it to the sweep.

Sources: a sweep in MLflow (by name), MLflow runs (by id), a sweep folder, or evaluation run folders. A report
of a sweep in MLflow is also logged under ``report/`` of the sweep's parent run, beside the trials it sums up.
"""

from __future__ import annotations

from pathlib import Path

from perceive_ray.config import redact_uri
from perceive_ray.report.data import (
    REPORT_ARTIFACT_PATH,
    ReportError,
    load_run_dirs,
    load_runs_mlflow,
    load_sweep_dir,
    load_sweep_mlflow,
    log_report_artifacts,
)
from perceive_ray.report.render import build_report
from perceive_ray.tracking.tracker import resolve_tracking_uri


def run_report(*, sweep: str | None = None, runs: list[str] | None = None,
               sweep_dir: str | Path | None = None, run_dirs: list[str | Path] | None = None,
               out: str | Path, tracking_uri: str | None = None,
               metrics: list[str] | None = None, n_resamples: int = 10_000, seed: int = 0,
               title: str | None = None, log_to_parent: bool = True) -> Path:
    """Build the report of exactly one source into ``out``; returns the path of index.html.

    ``tracking_uri`` (MLflow sources): default MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    given = [name for name, value in (("sweep", sweep), ("runs", runs), ("sweep_dir", sweep_dir),
                                      ("run_dirs", run_dirs)) if value]
    if len(given) != 1:
        raise ReportError("name exactly one source: a sweep, run ids, a sweep folder or run folders"
                          + (f" (got {', '.join(given)})" if given else ""))
    if n_resamples < 1:
        raise ReportError(f"the number of bootstrap resamples must be positive, got {n_resamples}")
    notes: list[str] = []
    parent_run_id, uri = None, None
    if sweep or sweep_dir:
        if sweep:
            uri = resolve_tracking_uri(tracking_uri)
            loaded = load_sweep_mlflow(uri, sweep)
            parent_run_id = loaded.parent_run_id
        else:
            loaded = load_sweep_dir(sweep_dir)
        if loaded.skipped:
            notes.append(f"left out {len(loaded.skipped)} trial(s) that did not finish: "
                         f"{', '.join(loaded.skipped)}")
        title = title or f"Sweep {loaded.name}"
        selected = loaded.runs
    elif runs:
        uri = resolve_tracking_uri(tracking_uri)
        selected = load_runs_mlflow(uri, list(runs))
        title = title or f"{len(selected)} run(s) from {redact_uri(uri)}"
    else:
        selected = load_run_dirs(list(run_dirs or []))
        title = title or f"{len(selected)} run folder(s)"
    index = build_report(selected, out, title=title, metrics=metrics, n_resamples=n_resamples, seed=seed,
                         notes=notes)
    print(f"report: {index}")
    if parent_run_id and uri and log_to_parent:
        log_report_artifacts(uri, parent_run_id, Path(out))
        print(f"logged to the sweep's parent run {parent_run_id} under {REPORT_ARTIFACT_PATH}/ "
              f"({redact_uri(uri)})")
    return index
