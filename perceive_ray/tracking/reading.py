"""Reading MLflow for reports: searches over every experiment, runs by id, artifact listing and download.

Only ``tracking/`` imports mlflow (DESIGN); ``report/data.py`` reads through this. Calls are bounded (the 3.x
defaults retry a dead server for minutes) and a SQLite URI must name an existing file: MLflow would otherwise create
an empty store for a mistyped path, and the report would then say "no such sweep".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from perceive_ray.config import redact_uri
from perceive_ray.tracking.tracker import TrackingError, check_reachable

PAGE = 1000  # runs / experiments per search page


class MlflowReader:
    def __init__(self, uri: str) -> None:
        check_reachable(uri)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise TrackingError(f"tracking URI {redact_uri(uri)}: no such database file")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # the user's own settings win
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file: noise
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)

    def experiment_ids(self) -> list[str]:
        ids, token = [], None
        while True:
            page = self.client.search_experiments(max_results=PAGE, page_token=token)
            ids += [e.experiment_id for e in page]
            token = page.token
            if not token:
                return ids

    def search(self, filter_string: str, *, newest_only: bool = False) -> list[Any]:
        """Runs matching ``filter_string`` in every experiment (only the newest one with ``newest_only``)."""
        ids = self.experiment_ids()
        if not ids:
            return []
        if newest_only:
            return list(self.client.search_runs(ids, filter_string=filter_string,
                                                order_by=["attributes.start_time DESC"], max_results=1))
        runs, token = [], None
        while True:
            page = self.client.search_runs(ids, filter_string=filter_string, max_results=PAGE, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def get_run(self, run_id: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def artifacts(self, run: Any) -> Any:
        """The run's artifact repository, resolved once (``list_artifacts(path)``, ``download_artifacts(path,
        dst)``): the client's own calls look the run up again for every listing and download."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(run.info.artifact_uri, tracking_uri=self.uri)

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)
