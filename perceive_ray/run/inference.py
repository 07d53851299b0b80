"""The Ray Data executor: scoring rows of every benchmark -> CPU decode tasks -> ONE scorer actor pool -> blocks.

``perceive_ray.evaluation`` owns the rest (manifests, resume, lock, record, shards, metrics, tracking). Here: one
dataset over the rows of all benchmarks of the experiment (rows carry ``benchmark``), so each actor builds its
scorer once per evaluation, not once per benchmark; the driver splits the results. Actors register each scorer
construction (host, pid, threads, device, describe()) with a ledger actor, which gives the run record its
``model_loads`` and the driver the scorer's ``describe()`` before the first shard is written.

CPU actors: Ray sets ``OMP_NUM_THREADS=1`` in an actor with a fractional CPU share; the actor sets torch's thread
count from its share instead (``resources.threads_per_actor``, default the share rounded up), and by default a
CPU-only run gives the actors the cluster's CPUs less half a CPU for decoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from perceive_ray.config import ExperimentConfig, ResourcesConfig
from perceive_ray.data.images import ImageError
from perceive_ray.scoring.local import build_scorer, decode_rows, load_record, score_decoded_batch

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's own switch (default on)
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often Ray Train's controller polls its workers (2 s)
# What a local instance started by init_ray gives its workers unless the user set them (Ray's own variables):
# no PreemptionWatcher (an actor per training run polling a drain state nobody sets on one machine), and a 0.5 s
# controller poll, so a run's checkpoint report and its end are seen within 0.5 s instead of 2 (cheap polls).
LOCAL_RAY_ENV = {PREEMPTION_WATCHER_ENV: "0", HEALTH_CHECK_ENV: "0.5"}
# Set (to "1") by init_ray when it starts a local instance, which has no dashboard, hence no state API: read by
# run.training.trainer_class (and inherited by the instance's workers, e.g. a sweep's trial actors).
LOCAL_NO_DASHBOARD_ENV = "PERCEIVE_RAY_LOCAL_NO_DASHBOARD"
DECODE_CPUS = 0.25  # per decode task; image decoding is light next to scoring


# Watches the driver that started a local Ray; if the driver dies without shutting Ray down (SIGKILL, OOM kill),
# it stops exactly the Ray processes that driver started (and their children), so nothing is left running.
REAPER = """
import os, signal, sys, time
driver, started = int(sys.argv[1]), {int(p) for p in sys.argv[2:]}
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
def descendants(roots):
    found, parents = set(roots), {int(p): ppid(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    grew = True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in found} - found
        found |= new
        grew = bool(new)
    return found
# Ray's daemons die with the driver on their own, but their children (workers, agents) are orphaned first:
# keep a fresh list of everything below the daemons while the driver lives, and stop that list when it dies.
targets = set(started)
while alive(driver):
    targets |= descendants(started | targets) - {os.getpid()}
    time.sleep(0.5)
for pid in targets:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"ray" in handle.read():
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""
_reaper: subprocess.Popen | None = None


def _start_reaper() -> None:
    """Best effort: the local node's process list is Ray-internal; without it there is no reaper."""
    global _reaper
    try:
        node = ray._private.worker._global_node
        pids = [str(info.process.pid) for infos in node.all_processes.values() for info in infos if info.process]
    except Exception:  # noqa: BLE001 (internal API moved: run without the reaper)
        return
    if pids and sys.platform.startswith("linux"):
        _reaper = subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpid()), *pids],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def init_ray(address: str | None, *, log_to_driver: bool = False, extra_cpus: int = 0) -> bool:
    """Connect to ``address`` / RAY_ADDRESS, else start a local instance. Returns whether we started it.

    ``log_to_driver``: show the workers' output on this console (training progress is printed by rank 0).
    ``extra_cpus``: logical CPUs added to a local instance beyond the machine's (a sweep's waiting trial drivers)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        os.environ.pop(LOCAL_NO_DASHBOARD_ENV, None)  # a cluster's own settings apply
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # Set before ray.init: the local instance's workers inherit this environment (LOCAL_RAY_ENV; a user's own
        # settings are kept).
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
        os.environ[LOCAL_NO_DASHBOARD_ENV] = "1"
        ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver,
                 num_cpus=(os.cpu_count() or 1) + extra_cpus if extra_cpus else None)
        _start_reaper()
    return True


def shutdown_ray() -> None:
    """Shut down the Ray this driver started, and its reaper."""
    global _reaper
    ray.shutdown()
    if _reaper is not None:
        _reaper.kill()
        _reaper.wait()
        _reaper = None


def actor_resources(resources: ResourcesConfig, cluster_cpus: float) -> tuple[float, int]:
    """(num_cpus per actor, torch threads per actor) from the config, filling the automatic defaults."""
    if resources.num_cpus_per_actor is not None:
        cpus = resources.num_cpus_per_actor
    elif resources.num_gpus_per_actor > 0:
        cpus = 1.0
    else:
        cpus = max(0.5, (cluster_cpus - 0.5) / resources.num_actors)
    threads = resources.threads_per_actor or max(1, math.ceil(cpus))
    return cpus, threads


def decode_batch(batch: dict[str, Any], *, roots: Mapping[str, str], on_error: str) -> dict[str, Any]:
    """Ray Data task: add ``image`` (RGB uint8) and ``error`` ('' or the reason) to each row."""
    rows = [{"benchmark": b, "image_path": p} for b, p in zip(batch["benchmark"], batch["image_path"], strict=True)]
    images, errors = decode_rows(rows, roots, on_error)
    # Ray hands ``texts`` over as an object array of arrays, which Arrow cannot take back (Ray then logs a
    # conversion warning and pickles the column); lists of str become Arrow's list<string>, as in the manifest.
    texts = [[str(text) for text in row_texts] for row_texts in batch["texts"]]
    return {**batch, "texts": texts, "image": images, "error": errors}


@ray.remote(num_cpus=0)
class ScorerLedger:
    """Collects one entry per scorer construction across the actor pool."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def register(self, entry: dict[str, Any]) -> int:
        self.entries.append(entry)
        return len(self.entries)

    def all(self) -> list[dict[str, Any]]:
        return list(self.entries)


def actor_fault() -> None:
    """Fault injection (reliability suite): PERCEIVE_RAY_FAULT=actor:<marker file> kills the first actor that finds
    no marker file, once (it creates the marker, then exits hard, as a crashed worker would)."""
    fault = os.environ.get("PERCEIVE_RAY_FAULT", "")
    if fault.startswith("actor:"):
        marker = fault[len("actor:"):]
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)


class ScoringActor:
    """Actor-pool worker: sets its torch threads, builds the scorer once, scores readable rows, passes errors on."""

    def __init__(self, model, scorer, ledger, threads: int):
        import torch
        from ray.util import metrics

        torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
        start = time.perf_counter()
        self.scorer = build_scorer(model, scorer)
        describe = self.scorer.describe()
        entry = load_record(time.perf_counter() - start, torch.get_num_threads(), describe)
        ray.get(ledger.register.remote(entry | {"describe": describe}))
        self.scored = metrics.Counter("perceive_rows_scored", description="(item, image) rows scored")
        self.failed = metrics.Counter("perceive_rows_failed", description="rows with unreadable images")
        self.latency = metrics.Histogram("perceive_batch_latency_s", description="scorer time per batch",
                                         boundaries=[0.01, 0.05, 0.1, 0.5, 1, 5, 30])

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        actor_fault()
        start = time.perf_counter()
        table = score_decoded_batch(self.scorer, batch)
        self.latency.observe(time.perf_counter() - start)
        bad = sum(1 for e in batch["error"] if str(e))
        self.scored.inc(len(batch["error"]) - bad)
        if bad:
            self.failed.inc(bad)
        return table


def raise_first_image_error(block: pa.Table) -> None:
    errors = [e for e in block.column("error").to_pylist() if e]
    if errors:
        raise ImageError(errors[0])


def known_cause(exc: BaseException) -> BaseException | None:
    """The first error of ours (ImageError, ConfigError, ...) inside a Ray-wrapped exception chain, if any."""
    seen: set[int] = set()
    queue: list[BaseException | None] = [exc]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current).__module__.startswith("perceive_ray.") and current is not exc:
            return current
        queue += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None


def describe_digest(describe: Mapping[str, Any]) -> str:
    clean = {k: v for k, v in describe.items() if k != "device"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


class RayDataExecutor:
    """Scores through Ray Data on a local Ray or a cluster (``address`` / RAY_ADDRESS)."""

    runner = "ray_data"

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self.ledger: Any = None
        self._entries: list[dict[str, Any]] = []

    def _ledger_entries(self) -> list[dict[str, Any]]:
        if self.ledger is not None:
            self._entries = ray.get(self.ledger.all.remote())
        return self._entries

    def stream(self, config: ExperimentConfig, rows: list[dict[str, Any]], roots: Mapping[str, str],
               on_error: str) -> Iterator[pa.Table]:
        started = init_ray(self.address)
        context = ray.data.DataContext.get_current()
        limits_before = context.execution_options.resource_limits
        if config.resources.object_store_mb:
            context.execution_options.resource_limits = limits_before.copy(
                object_store_memory=config.resources.object_store_mb * 2**20)
        try:
            res = config.resources
            cpus, threads = actor_resources(res, float(ray.cluster_resources().get("CPU", 1.0)))
            self.ledger = ScorerLedger.remote()
            batch_size = config.scorer.batch_size
            # Several input blocks (about one per scorer batch) so results stream back and shards land as they go.
            blocks = max(1, min(1000, -(-len(rows) // batch_size)))
            ds = ray.data.from_items(rows, override_num_blocks=blocks)
            # Decode tasks always record unreadable images as error rows: an exception raised inside a Ray task
            # reaches the driver only as text, so under on_error=fail the driver raises the ImageError itself
            # (same message and exit code as the in-process path) once the block holding it is written.
            decode_pool = ray.data.TaskPoolStrategy(size=res.decode_tasks) if res.decode_tasks else None
            ds = ds.map_batches(decode_batch, fn_kwargs={"roots": dict(roots), "on_error": "record"},
                                batch_size=batch_size, num_cpus=DECODE_CPUS, compute=decode_pool)
            ds = ds.map_batches(ScoringActor, fn_constructor_kwargs={"model": config.model, "scorer": config.scorer,
                                                                     "ledger": self.ledger, "threads": threads},
                                compute=ActorPoolStrategy(size=res.num_actors), batch_size=batch_size,
                                num_cpus=cpus, num_gpus=res.num_gpus_per_actor)
            texts_per_row = max(len(row["texts"]) for row in rows)
            # Re-batch on the driver so a block arrives about every scorer batch, however Ray fused the blocks; a
            # row split across two blocks is only "done" once all its texts are written (see data.shards).
            try:
                for block in ds.iter_batches(batch_size=batch_size * texts_per_row, batch_format="pyarrow"):
                    yield block
                    if on_error == "fail":
                        raise_first_image_error(block)
            except Exception as exc:
                known = known_cause(exc)
                if known is None:
                    raise
                raise known from None  # the same one-line error (and exit code) as the in-process path
            entries = self._ledger_entries()
            if len({describe_digest(e["describe"]) for e in entries}) > 1:
                print("warning: the scorer actors report different describe() outputs; see run_record.json",
                      file=sys.stderr)
        finally:
            context.execution_options.resource_limits = limits_before
            if self.ledger is not None:
                try:
                    self._ledger_entries()
                except Exception:  # noqa: BLE001 (the ledger is bookkeeping; never mask the real error)
                    pass
                ray.kill(self.ledger)
                self.ledger = None
            if started:
                shutdown_ray()

    def describe(self) -> dict[str, Any]:
        entries = self._ledger_entries()
        return dict(entries[0]["describe"]) if entries else {}

    def loads(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "describe"} | {"describe": describe_digest(e["describe"])}
                for e in self._entries]


def quiet_ray_data() -> None:
    """The evaluation's own progress lines are the progress; Ray Data's periodic operator dumps are noise."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def run_eval(config: ExperimentConfig, *, run_id: str | None = None, address: str | None = None,
             track: bool = True, on_error: str | None = None, attach_run: str | None = None):
    """Evaluate ``config`` through Ray Data (the ``perceive-ray eval`` path); resumable by run id."""
    from perceive_ray.evaluation import run_evaluation

    return run_evaluation(config, RayDataExecutor(address), run_id=run_id, track=track, on_error=on_error,
                          attach_run=attach_run)
