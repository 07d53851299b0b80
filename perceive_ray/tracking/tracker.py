"""Trackers: the protocol the runners log through, a NullTracker, and MlflowTracker (the only mlflow importer).

The tracking URI comes from the experiment (``tracking.uri``), else ``MLFLOW_TRACKING_URI``, else the embedded
default ``sqlite:///<cwd>/mlflow.db``. An unreachable server fails fast, before any scoring, naming the URI.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

# MLflow limits (3.x): param values up to 6000 characters, tag values up to 8000, 100 params per batch call.
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000
BATCH = 100


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; the message names the URI."""


class Tracker(Protocol):
    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Logs nothing (tracking disabled, or a non-zero rank)."""

    run_id = ""

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        return ""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def resolve_tracking_uri(configured: str | None, *, cwd: str | Path | None = None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cwd) if cwd else Path.cwd()).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast on an HTTP(S) tracking server that does not answer; check a SQLite file's folder exists."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http(s) only)
                if response.status != 200:
                    raise TrackingError(f"tracking server {uri} answered {response.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise TrackingError(f"tracking server {uri} is unreachable: {exc}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {folder} does not exist")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {uri}: MLflow 3 refuses the file store; use sqlite:///... or http://...")


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys with string values (the same dotted keys as CLI overrides)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for index, entry in enumerate(value):
                flat.update(flatten_params(entry, prefix=f"{name}.{index}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


class MlflowTracker:
    """One MLflow run per ``start``; metrics, params, tags and artifacts through MlflowClient (no global state)."""

    def __init__(self, uri: str, experiment: str):
        check_reachable(uri)
        from mlflow import MlflowClient  # only here: library code stays free of mlflow

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except Exception as exc:  # MLflow raises several types for a bad store; report one clear error
            raise TrackingError(f"tracking URI {uri}: cannot open experiment {experiment!r}: {exc}") from exc
        self.run_id = ""

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name)
        self.run_id = run.info.run_id
        flat = flatten_params(params)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for begin in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[begin : begin + BATCH])
        self.log_tags(tags)
        return self.run_id

    def log_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        tag_items = [RunTag(k, str(v)[:MAX_TAG_CHARS]) for k, v in sorted(tags.items())]
        for begin in range(0, len(tag_items), BATCH):
            self.client.log_batch(self.run_id, tags=tag_items[begin : begin + BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in sorted(metrics.items())]
        for begin in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[begin : begin + BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def build_tracker(uri: str | None, experiment: str, *, enabled: bool = True) -> Tracker:
    if not enabled:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(uri), experiment)
