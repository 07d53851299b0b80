"""MLflow for sweeps: one parent run per sweep, one child per trial, found again after a restart.

Ray's MLflowLoggerCallback keeps its trial -> run map in memory only, so a restored sweep would open a second run
for every resumed trial. Here the mapping lives in MLflow and on disk instead: the parent's id is stored in the
sweep folder (``sweep.json``), and a trial finds its child by tags (``mlflow.parentRunId`` + ``perceive.trial_id``)
before creating one. The child's params are the trial's resolved configs (the base experiment's dotted keys as
they are, the evaluation's under ``eval.`` when the trial trains); the swept keys are also in the tag
``perceive.overrides`` (JSON), which reports read. The training curves and the evaluation metrics are logged into
the child by the training and evaluation runs themselves (``attach_run``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from perceive_ray.tracking.tracker import MlflowTracker, TrackingError, flatten_params

SWEEP_TAG, KIND_TAG, TRIAL_TAG, PARENT_TAG = "perceive.sweep", "perceive.kind", "perceive.trial_id", "mlflow.parentRunId"


class SweepTracker:
    """The sweep's MLflow bookkeeping (the driver and each trial build their own: no shared client state)."""

    def __init__(self, uri: str, experiment: str, *, timeout_s: float = 10.0, max_retries: int = 2) -> None:
        self.base = MlflowTracker(uri, experiment, timeout_s=timeout_s, max_retries=max_retries)
        self.client, self.experiment_id, self.uri = self.base.client, self.base.experiment_id, uri

    def open_parent(self, sweep: str, params: Mapping[str, Any], tags: Mapping[str, str],
                    resume_run_id: str | None = None) -> str:
        """Reopen the sweep's parent run (its id from sweep.json) or create it."""
        self.base.run_id = ""
        return self.base.start(sweep, params, {**tags, SWEEP_TAG: sweep, KIND_TAG: "sweep"},
                               resume_run_id=resume_run_id)

    def find_child(self, parent_id: str, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=10)
        if len(runs) > 1:  # never created by this code; say so rather than pick one silently
            raise TrackingError(f"{len(runs)} MLflow runs of sweep parent {parent_id} carry {TRIAL_TAG}={trial_id}")
        return runs[0].info.run_id if runs else None

    def child(self, parent_id: str, trial_id: str, *, sweep: str, label: str, overrides: Mapping[str, Any],
              params: Mapping[str, Any], published_row: str | None, kind: str = "trial") -> str:
        """The trial's child run: found by its tags (a restored trial), else created with its params.
        ``kind``: ``trial``, or ``shared`` for a run every trial builds on (a pretrained encoder)."""
        found = self.find_child(parent_id, trial_id)
        if found:
            self.client.update_run(found, status="RUNNING")
            return found
        tags = {PARENT_TAG: parent_id, TRIAL_TAG: trial_id, SWEEP_TAG: sweep, KIND_TAG: kind,
                "perceive.trial_label": label, "perceive.overrides": json.dumps(dict(overrides), sort_keys=True)}
        if published_row:
            tags["perceive.published_row"] = published_row
        return self._on("").start(label, params, tags)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Add params to a run (values equal to ones already logged are accepted again: a restored trial)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for begin in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[begin : begin + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._on(run_id).log_metrics(metrics, step)

    def log_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._on(run_id).log_tags(tags)

    def log_artifact(self, run_id: str, path: Any, artifact_path: str | None = None) -> None:
        self._on(run_id).log_artifact(path, artifact_path)

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def children(self, parent_id: str) -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                       max_results=10000)

    def _on(self, run_id: str) -> MlflowTracker:
        """A tracker on ``run_id`` sharing this client and experiment."""
        tracker = copy.copy(self.base)
        tracker.run_id = run_id
        return tracker


def trial_params(stages: list[Any], evaluation: Any | None) -> dict[str, str]:
    """The child's params: the (last) training stage's dotted keys as they are, earlier stages under
    ``stage<N>.``, and the eval config's under ``eval.`` (an eval-only trial's eval config as it is). A training
    trial logs its eval params once trained (``evaluation=None`` before): they name the trained export."""
    from perceive_ray.config import config_record

    if not stages:
        return flatten_params(config_record(evaluation))
    params = flatten_params(config_record(stages[-1]))
    for index, stage in enumerate(stages[:-1]):
        params.update(flatten_params(config_record(stage), prefix=f"stage{index + 1}."))
    if evaluation is not None:
        params.update(flatten_params(config_record(evaluation), prefix="eval."))
    return params
