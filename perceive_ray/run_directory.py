"""A run directory's bookkeeping: one writer at a time (lock file), the run record, and the resume identity check.

``<output_dir>/<run id>/`` holds ``.lock`` while an evaluation writes to it, ``config.yaml`` and ``run_record.json``
(both written once, when the first score lands: a config that fails before any score leaves nothing that a fixed
config would then be "different" from), and the benchmarks' shards and tables. A resume compares what decides the
scores (model, scorer options with defaults filled, seed, dataset file hashes, weights fingerprint, the scorer's
``describe()``) with the record and refuses to mix, naming what changed. The record's ``evaluations`` list gains
one entry per invocation (model loads, rows scored, devices, timings); nothing else in it is ever rewritten.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from perceive_ray.config import redact_uri

LOCK_FILE = ".lock"
RECORD_FILE = "run_record.json"
CONFIG_FILE = "config.yaml"
TRACKING_FILE = "tracking.json"  # which tracked run (URI, MLflow run id, status) belongs to this run id


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunMismatchError(ValueError):
    """The run directory holds scores made under a different model, scorer, data, weights or seed."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a recycled pid is not mistaken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: a ``.lock`` file created with O_EXCL holding pid, host and start time.

    A lock whose holder is on this host and no longer running (or whose pid now belongs to another process) is
    stale and taken over. A lock from another host is never broken automatically: the message names the host, pid
    and file so a person can remove it once that process is known to be gone.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: Mapping[str, Any] | None) -> bool:
        if holder is None:  # unreadable: a writer died between create and write, or garbage
            return True
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", -1))
        return not _alive(pid) or (holder.get("start") is not None and _process_start(pid) != holder.get("start"))

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    raise RunLockedError(f"run directory {self.path.parent} is already being written by this "
                                         "process") from None
                if not self._stale(holder):
                    raise RunLockedError(
                        f"run directory {self.path.parent} is being written by pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('since')}; one writer per run id: wait for it, "
                        f"pick another --run-id, or remove {self.path} if that process is gone") from None
                try:
                    self.path.unlink()  # stale: its holder is dead
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}: another process keeps recreating it")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise RunMismatchError(f"{path}: unreadable run record ({exc}); pick another run id") from None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temp, path)


def write_record_once(run_dir: Path, record: Mapping[str, Any], config_yaml: str) -> bool:
    """Write ``config.yaml`` and ``run_record.json`` if the run has none yet; returns whether it wrote them."""
    if (run_dir / RECORD_FILE).exists():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_yaml)
    _write_json(run_dir / RECORD_FILE, {**record, "evaluations": []})
    return True


def append_evaluation(run_dir: Path, entry: Mapping[str, Any]) -> None:
    """Add one invocation's entry to the record's ``evaluations``; every other field stays as first written."""
    record = read_record(run_dir)
    if record is None:
        return  # nothing was scored, so there is no record to extend
    record["evaluations"] = [*record.get("evaluations", []), dict(entry)]
    _write_json(run_dir / RECORD_FILE, record)


def diff_identity(stored: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two identities differ, with both values (shortened), for the refusal message."""
    if isinstance(stored, Mapping) and isinstance(now, Mapping):
        changes = []
        for key in sorted(set(stored) | set(now)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in now:
                continue  # e.g. a benchmark not in this invocation: its rows are simply not touched
            if key not in stored:
                if prefix.startswith("datasets"):
                    continue  # a benchmark added on resume: new rows, nothing to mix
                changes.append(f"{path}: (absent) -> {_short(now[key])}")
                continue
            changes.extend(diff_identity(stored[key], now[key], path))
        return changes
    return [] if stored == now else [f"{prefix}: {_short(stored)} -> {_short(now)}"]


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_identity(run_dir: Path, stored: Mapping[str, Any] | None, now: Mapping[str, Any], *, what: str) -> None:
    """Refuse to mix scores: raise RunMismatchError naming every key of ``what`` that changed."""
    if stored is None:
        return
    changes = diff_identity(stored, now)
    if changes:
        shown = "\n  ".join(changes[:12]) + (f"\n  ... and {len(changes) - 12} more" if len(changes) > 12 else "")
        raise RunMismatchError(f"run directory {run_dir} holds scores made with a different {what}:\n  {shown}\n"
                               "resuming would mix them; pick another --run-id to start afresh")


def read_tracking_state(run_dir: Path, uri: str) -> str | None:
    """The MLflow run id an earlier invocation of this run id opened on the same tracking URI, if any."""
    try:
        state = json.loads((run_dir / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state.get("mlflow_run_id") if state.get("uri") == redact_uri(uri) else None


def write_tracking_state(run_dir: Path, uri: str, experiment: str, run_id: str, status: str,
                         error: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"uri": redact_uri(uri), "experiment": experiment, "mlflow_run_id": run_id, "status": status}
    if error:
        state["error"] = error
    (run_dir / TRACKING_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
