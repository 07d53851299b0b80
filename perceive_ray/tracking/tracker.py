"""Trackers: the protocol the runners log through, a NullTracker, MlflowTracker (the only mlflow importer) and the
GuardedTracker the evaluation wraps around it.

The tracking URI comes from the experiment (``tracking.uri``), else ``MLFLOW_TRACKING_URI``, else the embedded
default ``sqlite:///<cwd>/mlflow.db``. An unreachable server fails fast, before any scoring, naming the URI (with any
``user:password@`` redacted: credentials never reach a message or a log). Every HTTP call is bounded
(``tracking.timeout_s``, ``tracking.max_retries``), and once the server fails mid-run the GuardedTracker stops
calling it: scoring goes on, everything the tracker would have received stays in the run directory, and the run
ends with an error that says so (``perceive-ray track RUN_DIR`` logs it afterwards).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from perceive_ray.config import redact_uri

# MLflow limits (3.x): param values up to 6000 characters, tag values up to 8000, 100 params per batch call.
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000
BATCH = 100


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; the message names the URI (credentials redacted)."""


class TrackingFailedError(RuntimeError):
    """Tracking failed mid-run; the scores and metrics are complete in the run directory."""


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
                    raise TrackingError(f"tracking server {redact_uri(uri)} answered {response.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise TrackingError(f"tracking server {redact_uri(uri)} is unreachable: {redact_uri(exc)}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingError(f"tracking URI {redact_uri(uri)}: folder {folder} does not exist")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {redact_uri(uri)}: MLflow 3 refuses the file store; use sqlite:///... or "
                            "http://...")


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

    def __init__(self, uri: str, experiment: str, *, timeout_s: float = 10.0, max_retries: int = 2):
        check_reachable(uri, timeout=timeout_s)
        # MLflow reads its HTTP limits from the environment at every request (3.x defaults: 120 s timeout, 7
        # retries with backoff: minutes per call on a dead server). Set them explicitly for this process.
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        from mlflow import MlflowClient  # only here: library code stays free of mlflow

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except Exception as exc:  # MLflow raises several types for a bad store; report one clear error
            raise TrackingError(f"tracking URI {redact_uri(uri)}: cannot open experiment {experiment!r}: "
                                f"{redact_uri(exc)}") from None
        self.run_id = ""

    def _resumable(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 (deleted, or another store: start a new run)
            return False
        return run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              resume_run_id: str | None = None) -> str:
        """Open the run; with ``resume_run_id`` of an existing run in this experiment, reopen that one instead
        (one MLflow run per run id, also after a killed run left it RUNNING). A reopened run keeps its params:
        MLflow refuses changed values, and the first invocation's config is the run's config."""
        from mlflow.entities import Param

        if self._resumable(resume_run_id):
            self.run_id = str(resume_run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            self.log_tags(tags)
            return self.run_id
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


class AttachedTracker:
    """Logs into a run someone else owns (a sweep trial's child run): the training and the evaluation of a trial
    both log there. ``start`` reopens that run instead of creating one; tags get ``prefix.`` and top-level
    artifacts go under ``prefix/`` (the train and eval stages both have a config.yaml); params are the owner's,
    and ``finish`` leaves the status to the owner."""

    def __init__(self, inner: MlflowTracker, run_id: str, prefix: str) -> None:
        self.inner, self.attached, self.prefix = inner, run_id, prefix

    @property
    def run_id(self) -> str:
        return self.inner.run_id

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              resume_run_id: str | None = None) -> str:
        run = self.inner.client.get_run(self.attached)  # fails (and is reported) if the owner's run is gone
        self.inner.run_id = run.info.run_id
        self.log_tags(tags)
        return self.inner.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.inner.log_metrics(metrics, step)

    def log_tags(self, tags: Mapping[str, str]) -> None:
        self.inner.log_tags({f"{self.prefix}.{k}": v for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path or self.prefix)

    def finish(self, status: str = "FINISHED") -> None:
        pass


def build_tracker(uri: str | None, experiment: str, *, enabled: bool = True, timeout_s: float = 10.0,
                  max_retries: int = 2, attach: tuple[str, str] | None = None) -> Tracker:
    """``attach``: (MLflow run id, prefix) of a run to log into instead of creating one (see AttachedTracker)."""
    if not enabled:
        return NullTracker()
    tracker = MlflowTracker(resolve_tracking_uri(uri), experiment, timeout_s=timeout_s, max_retries=max_retries)
    return AttachedTracker(tracker, *attach) if attach else tracker


class GuardedTracker:
    """Wraps a tracker so that a tracking failure never stops or stalls the scoring.

    The first failing call marks the tracker failed (reason kept, credentials redacted) and every later call is
    skipped, so a dead server costs one bounded call, not one per benchmark. What the tracker would have received is
    in the run directory anyway (config.yaml, run_record.json, metrics.json, the tables).
    """

    def __init__(self, inner: Tracker) -> None:
        self.inner = inner
        self.failure: str | None = None

    @property
    def run_id(self) -> str:
        return str(getattr(self.inner, "run_id", "") or "")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (whatever the backend raises, scoring goes on)
            self.failure = f"{what} failed: {type(exc).__name__}: {redact_uri(str(exc))[:300]}"
            print(f"warning: tracking stopped ({self.failure}); scoring goes on, results stay in the run "
                  "directory", file=sys.stderr)
            return None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              resume_run_id: str | None = None) -> str:
        if isinstance(self.inner, (MlflowTracker, AttachedTracker)):
            return self._call("start", self.inner.start, run_name, params, tags, resume_run_id) or ""
        return self._call("start", self.inner.start, run_name, params, tags) or ""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._call("log_metrics", self.inner.log_metrics, metrics, step)

    def log_tags(self, tags: Mapping[str, str]) -> None:
        self._call("log_tags", self.inner.log_tags, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.inner.log_artifact, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("finish", self.inner.finish, status)
