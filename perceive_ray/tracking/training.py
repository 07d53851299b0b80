"""MLflow for training runs: the driver opens (or reopens) one run per run id; rank 0 logs the curves into it.

The driver creates the run with the resolved config as params (the same dotted keys as overrides and sweeps), the
run record as tags, and keeps its id in ``tracking.json`` so a rerun of the same run id (after a killed driver)
reopens the same MLflow run instead of starting a second one. Workers get the URI (resolved to an absolute one:
a worker's working directory is not the driver's), the experiment and the run id; rank 0 logs per-step loss,
learning rate, samples/s and step time, and the checkpoint location as tags. At the end the driver logs the final
metrics, ``config.yaml``, ``deepspeed.json``, ``run_record.json`` and ``result.json`` as artifacts and the status.
"""

from __future__ import annotations

import sys
from typing import Any

from perceive_ray.config import config_record
from perceive_ray.run_directory import read_record, read_tracking_state, write_tracking_state
from perceive_ray.tracking.run_record import record_tags
from perceive_ray.tracking.tracker import GuardedTracker, NullTracker, build_tracker, resolve_tracking_uri


class TrainingTracking:
    def __init__(self, config: Any, prepared: Any, *, enabled: bool = True, attach_run: str | None = None) -> None:
        """``attach_run``: log into that MLflow run (a sweep trial's child) instead of opening one per run id."""
        self.config, self.prepared = config, prepared
        tracking = config.tracking
        self.uri = resolve_tracking_uri(tracking.uri) if enabled else ""
        inner = build_tracker(self.uri or None, tracking.experiment, enabled=enabled, timeout_s=tracking.timeout_s,
                              max_retries=tracking.max_retries,
                              attach=(attach_run, "train") if attach_run else None)
        self.tracker = GuardedTracker(inner) if enabled else NullTracker()
        if not enabled:
            self.run_id = ""
            return
        record = read_record(prepared.run_dir) or {}
        tags = {**record_tags({**record, "dataset_hashes": {}}), "kind": "train", "job": config.job,
                "run_id": prepared.run_id, "run_dir": str(prepared.run_dir.resolve()),
                "config_hash": str(record.get("config_hash", ""))}
        tags.update({f"data.{name}.sha256": str(info.get("sha256", "")) for name, info in
                     (record.get("data") or {}).items()})
        resume = read_tracking_state(prepared.run_dir, self.uri)
        self.run_id = self.tracker.start(prepared.run_id, config_record(config), tags, resume_run_id=resume)
        if self.run_id:
            write_tracking_state(prepared.run_dir, self.uri, tracking.experiment, self.run_id, "RUNNING")
            print(f"[train] MLflow run {self.run_id} in experiment {tracking.experiment!r}", file=sys.stderr)

    def worker_config(self) -> dict[str, Any]:
        tracking = self.config.tracking
        return {"tracking_uri": self.uri, "experiment": tracking.experiment, "mlflow_run_id": self.run_id,
                "tracking_timeout_s": tracking.timeout_s, "tracking_max_retries": tracking.max_retries}

    def finish(self, summary: dict[str, Any] | None, status: str) -> None:
        if not self.run_id:
            return
        run_dir = self.prepared.run_dir
        if summary is not None:
            self.tracker.log_tags({"export": summary["export"], "checkpoint.final": summary["checkpoint"]})
        for name in ("config.yaml", "deepspeed.json", "run_record.json", "result.json"):
            if (run_dir / name).is_file():
                self.tracker.log_artifact(run_dir / name)
        self.tracker.finish(status)
        write_tracking_state(run_dir, self.uri, self.config.tracking.experiment, self.run_id, status,
                             getattr(self.tracker, "failure", None))
