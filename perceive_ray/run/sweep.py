"""`perceive-ray sweep`: Ray Tune over a sweep file's search space; each trial trains (Ray Train) and evaluates.

The trainable is a function (Train V2: ``Tuner(TorchTrainer)`` is not supported): a trial builds its configs from
the base experiment + its dotted overrides, finds or creates its MLflow child run, then calls the same
``run_train`` / ``run_eval`` as the CLI, both logging into that child (``attach_run``). Restart safety:

- Tune's state lives in ``<sweep folder>/tune`` (``Tuner.restore`` on ``--resume``); trial ids survive a restore.
- A trial's training run id is its Tune trial id, its run folder ``<sweep folder>/runs/train/<trial id>``: a
  resumed trial's ``run_train`` finds that folder's checkpoints and continues from the newest one (Ray Train's own
  restoration), and an already finished training is not repeated.
- The MLflow parent id is stored in ``<sweep folder>/sweep.json``; a child is found again by its tags.
- ``shared:`` runs (made once, by the driver; run id = the shared id, in the same run folder, so a resumed sweep
  finds them finished) log into their own child run tagged ``perceive.kind: shared``. They train while the first
  trials start: a trial imports what its runs need, then waits at the sweep's ``SharedRunGate`` (an actor) until
  the shared runs have finished (their exports) or failed (the trial fails with their error, and so does the
  sweep; ``--resume`` continues the shared run from its checkpoint and reruns the trials).
- ``sweep.json`` also records the sha256 of every experiment file the trials read (``base:`` files included):
  ``--resume`` refuses (exit 2, naming the file) when one has changed, and so does a trial that starts after an
  edit, so no trial silently reads other contents than the finished ones.
- ``<sweep folder>/trials/<trial id>.json`` records each trial (overrides, label, status, run folders, metrics):
  a report can be rebuilt from the folder alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
from ray import tune

from perceive_ray.config import ConfigError, config_record
from perceive_ray.sweep_config import (
    LoadedSweep,
    SearchDimension,
    build_trial_configs,
    changed_files,
    check_sweep,
    experiment_files,
    file_digests,
    files_changed_error,
    grid_size,
    published_row,
    shared_configs,
    shared_stand_ins,
    stage_run_id,
    trial_label,
)

SWEEP_FILE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
RUNS_DIR = "runs"


def tune_domain(dim: SearchDimension) -> Any:
    if dim.grid is not None:
        return tune.grid_search(list(dim.grid))
    if dim.choice is not None:
        return tune.choice(list(dim.choice))
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    if dim.randint is not None:
        return tune.randint(*dim.randint)
    return tune.quniform(*dim.quniform)


def param_space(sweep: LoadedSweep) -> dict[str, Any]:
    return {key: tune_domain(dim) for key, dim in sweep.config.search.items()}


def fixed_overrides(folder: Path, uri: str, sweep: LoadedSweep, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the sweep sets on every trial's configs: run folders inside the sweep folder, one MLflow store, and the
    caller's ``extra`` keys (``perceive-ray demo --seed``: ``seed`` on every training and evaluation)."""
    fixed: dict[str, Any] = {**(extra or {}), "output_dir": str(folder / RUNS_DIR),
                             "tracking.experiment": sweep.config.tracking.experiment}
    if uri:
        fixed["tracking.uri"] = uri
    return fixed


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


# -- shared runs and the trials that wait for them ----------------------------------------------------------------

@ray.remote(num_cpus=0)
class SharedRunGate:
    """Opened once by the sweep driver when its shared runs have finished (``{id: export}``) or failed (the error);
    every trial's ``wait`` returns that."""

    def __init__(self) -> None:
        self._opened = asyncio.Event()
        self._result: tuple[dict[str, str] | None, str | None] = (None, None)

    async def open(self, exports: dict[str, str] | None, error: str | None) -> None:
        self._result = (exports, error)
        self._opened.set()

    async def wait(self) -> tuple[dict[str, str] | None, str | None]:
        await self._opened.wait()
        return self._result


class SharedRunFailed(RuntimeError):
    """A trial cannot run: the sweep's shared run(s) it builds on failed."""


def preload_trial(configs: Any) -> None:
    """Import what this trial's runs will need in this process (Ray Train's torch backend, each stage's job module
    and the trackers, and DeepSpeed for a stage in Ray Train's local mode, which trains here): done while the shared
    runs train, it is not on the sweep's critical path afterwards."""
    import ray.train.torch  # noqa: F401

    from perceive_ray import registry
    from perceive_ray.tracking import sweep as _tracking_sweep  # noqa: F401
    from perceive_ray.tracking import training as _tracking_training  # noqa: F401

    for stage in configs.stages:
        registry.resolve("jobs", stage.job)
        if stage.resources.local:
            from perceive_ray.run.training import preload_local

            preload_local(stage.resources.use_gpu)  # the stage trains in this process (resources.local)


def wait_for_shared(gate: Any, trial_id: str, label: str) -> dict[str, str]:
    """The shared runs' exports, once they have finished; SharedRunFailed if they failed."""
    ref = gate.wait.remote()
    ready, _ = ray.wait([ref], timeout=2.0)  # an open gate answers well within this
    if not ready:
        print(f"[sweep] trial {trial_id}: {label}: ready, waiting for the shared run(s) to finish", flush=True)
    exports, error = ray.get(ref)
    if error is not None:
        raise SharedRunFailed(f"the sweep's shared run failed, so this trial cannot run: {error}")
    return dict(exports or {})


def start_shared(sweep: LoadedSweep, shared: list[tuple[Any, Any]], folder: Path, tracker: Any,
                 parent: str) -> tuple[Any, Future | None]:
    """Train the shared runs in a driver thread (beside ``tuner.fit()``); returns (the gate, the thread's future,
    whose result is ``{id: export}``). (None, None) when the sweep has no shared runs."""
    if not shared:
        return None, None
    gate = SharedRunGate.remote()
    future: Future = Future()

    def train_then_open() -> None:
        try:
            exports = run_shared(sweep, shared, folder, tracker, parent)
        except BaseException as exc:  # noqa: BLE001 (handed to the trials through the gate, to the driver by future)
            future.set_exception(exc)  # (first: the driver finds it done once the trials have failed at the gate)
            with contextlib.suppress(Exception):  # Ray may be shutting down (the driver was interrupted)
                ray.get(gate.open.remote(None, f"{type(exc).__name__}: {exc}"[:2000]))
            return
        future.set_result(exports)
        with contextlib.suppress(Exception):
            ray.get(gate.open.remote(exports, None))

    # a daemon thread: an interrupted driver does not wait for it at exit (shutting Ray down ends its training)
    threading.Thread(target=train_then_open, name="perceive-shared-runs", daemon=True).start()
    return gate, future


# -- trial -------------------------------------------------------------------------------------------------------

def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One trial (runs in a Tune trial actor): train if the base experiment trains, evaluate, report the metrics."""
    from perceive_ray.run.inference import quiet_ray_data, run_eval
    from perceive_ray.run.training import run_train

    # Relative paths of the experiment files are relative to where the sweep was started: that folder when this
    # node has it (a local Ray, a shared mount), else the worker's own (a job's working_dir on another node; Tune's
    # move into the trial folder is switched off by the driver).
    if Path(ctx["cwd"]).is_dir():
        os.chdir(ctx["cwd"])
    quiet_ray_data()
    sweep = LoadedSweep.from_dict(ctx["sweep"])
    folder, uri = Path(ctx["folder"]), ctx["uri"]
    trial_id = tune.get_context().get_trial_id()
    # A trial reads the experiment files when it starts: one edited since the sweep started would make this trial
    # differ from the finished ones, silently. It fails instead, naming the file.
    changed = changed_files(ctx.get("files") or {})
    if changed:
        raise files_changed_error(changed, what=f"trial {trial_id}")
    overrides = {key: params[key] for key in sweep.config.search}
    label = trial_label(overrides)
    fixed = fixed_overrides(folder, uri, sweep, ctx.get("extra"))
    shared = ctx.get("shared") or {}
    if ctx.get("shared_gate") is not None:
        # Started while the shared runs train: get ready (configs checked with the shared runs' stand-ins, imports),
        # then wait for their exports.
        preload_trial(build_trial_configs(sweep, overrides, fixed=fixed, trial_id=trial_id,
                                          shared=ctx["shared_stand_ins"]))
        shared = wait_for_shared(ctx["shared_gate"], trial_id, label)
    configs = build_trial_configs(sweep, overrides, fixed=fixed, trial_id=trial_id, shared=shared)
    stages = len(configs.stages)
    record_path = folder / TRIALS_DIR / f"{trial_id}.json"
    record: dict[str, Any] = {
        "trial_id": trial_id, "label": label, "overrides": overrides,
        "published_row": published_row(sweep.config, overrides), "status": "RUNNING",
        "eval_run_dir": str(folder / RUNS_DIR / trial_id),
        "train_run_dirs": [str(folder / RUNS_DIR / "train" / stage_run_id(trial_id, i, stages))
                           for i in range(stages)]}
    tracker, child = None, None
    if uri:
        from perceive_ray.tracking.sweep import SweepTracker, trial_params

        tracking = sweep.config.tracking
        tracker = SweepTracker(uri, tracking.experiment, timeout_s=tracking.timeout_s,
                               max_retries=tracking.max_retries)
        child = tracker.child(ctx["parent_run_id"], trial_id, sweep=sweep.config.name, label=label,
                              overrides=overrides,
                              params=trial_params(configs.stages, None if stages else configs.evaluation),
                              published_row=record["published_row"])
        record["mlflow_run_id"] = child
    print(f"[sweep] trial {trial_id}: {label}" + (f" (MLflow run {child})" if child else ""), flush=True)
    write_json(record_path, record)
    try:
        for index, stage in enumerate(configs.stages):
            # A later stage is loaded only now: its model.source (train:<previous stage>) resolves when it is
            # prepared, and the previous stage has finished by then.
            run_train(stage, run_id=stage_run_id(trial_id, index, stages), track=bool(uri), attach_run=child)
        evaluation = configs.evaluation
        if stages:
            evaluation = build_trial_configs(sweep, overrides, fixed=fixed, trial_id=trial_id,
                                             trained=True, shared=shared).evaluation
            if tracker is not None:
                from perceive_ray.tracking.tracker import flatten_params

                tracker.log_params(child, {f"eval.{k}": v for k, v in
                                           flatten_params(config_record(evaluation)).items()})
        results = run_eval(evaluation, run_id=trial_id, track=bool(uri), attach_run=child)
        metrics = {f"{r.benchmark}/{key}": float(value) for r in results for key, value in r.report.metrics.items()}
    except BaseException as exc:
        record.update(status="FAILED", error=f"{type(exc).__name__}: {exc}"[:2000])
        write_json(record_path, record)
        if tracker is not None:
            tracker.end(child, "FAILED")
        raise
    record.update(status="FINISHED", metrics=metrics)
    write_json(record_path, record)
    if tracker is not None:
        tracker.end(child, "FINISHED")
    tune.report(metrics)


# -- driver ------------------------------------------------------------------------------------------------------

def check_resume(sweep: LoadedSweep, folder: Path, *, resume: bool,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sweep folder's state: refused when it exists without --resume, or when --resume finds another sweep."""
    state_path = folder / SWEEP_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if not resume:
        if state or (folder / TUNE_DIR).exists():
            raise ConfigError(f"sweep {sweep.config.name!r} already has a folder {folder}: continue it with --resume, "
                              "or remove the folder / choose another --storage to start over")
        return {}
    no_state = f"--resume: no sweep state to resume in {folder} (start the sweep without --resume)"
    if not state:
        raise ConfigError(no_state)
    changed = changed_files(state.get("files") or {})  # (a sweep folder written before files were recorded: none)
    if changed:
        raise files_changed_error(changed, what="--resume")
    if not tune.Tuner.can_restore(str(folder / TUNE_DIR)):
        raise ConfigError(no_state)
    before, now = state["sweep"]["config"], sweep.to_dict()["config"]
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k != "resources")
    if state.get("extra", {}) != json.loads(json.dumps(extra or {})):
        changed.append(f"overrides {state.get('extra', {})} -> {extra or {}}")
    if changed or state["sweep"]["smoke"] != sweep.smoke:
        what = changed + (["--smoke"] if state["sweep"]["smoke"] != sweep.smoke else [])
        raise ConfigError(f"--resume: the sweep file changed since the sweep started ({', '.join(what)}); Tune "
                          f"cannot change a search space on restore. Start a new sweep (another name or --storage)")
    return state


def init_sweep_ray(config: Any, address: str | None) -> bool:
    """Connect to ``address`` / RAY_ADDRESS, else start a local Ray sized for the sweep; whether it was started.

    A local Ray gets the machine's CPUs once per concurrent trial, plus the trials' own fractions: every trial's
    configs were checked to fit the machine alone, and concurrent trials on one machine share its cores (their Ray
    Train and Ray Data startups mostly wait)."""
    from perceive_ray.run.inference import init_ray

    res = config.resources
    cores = os.cpu_count() or 1
    return init_ray(address, log_to_driver=True,
                    extra_cpus=cores * (res.max_concurrent_trials - 1)
                    + math.ceil(res.trial_cpus * res.max_concurrent_trials))


def run_sweep(sweep: LoadedSweep, *, resume: bool = False, storage: str | None = None, address: str | None = None,
              track: bool = True, tracking_uri: str | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate every trial, then run (or resume) the sweep; returns the summary written to ``summary.json``.
    ``tracking_uri``: instead of the sweep file's; ``extra``: dotted keys set on every config (shared runs, trials'
    trainings and evaluations), e.g. ``{"seed": 3}``."""
    from perceive_ray.run.inference import quiet_ray_data, shutdown_ray
    from perceive_ray.tracking.tracker import resolve_tracking_uri

    config = sweep.config
    folder = sweep.folder(storage)
    state = check_resume(sweep, folder, resume=resume, extra=extra)
    uri = resolve_tracking_uri(tracking_uri or config.tracking.uri) if track else ""
    fixed = fixed_overrides(folder, uri, sweep, extra)
    shared = shared_configs(sweep, fixed=fixed)
    # every trial's configs, before anything runs (shared:<id> read as the shared run's starting model)
    checked = check_sweep(sweep, fixed=fixed, shared=shared_stand_ins(shared))
    # what every trial must read: compared by --resume and by each trial when it starts
    files = state.get("files") or file_digests(experiment_files(sweep))
    if sweep.smoke:
        from perceive_ray.smoke import prepare_smoke

        for cfg in [c for configs in checked for c in configs.all()] + [c for _, c in shared]:
            prepare_smoke(cfg)
    parent, tracker = "", None
    if uri:
        from perceive_ray.tracking.sweep import SweepTracker

        tracker = SweepTracker(uri, config.tracking.experiment, timeout_s=config.tracking.timeout_s,
                               max_retries=config.tracking.max_retries)
        params = {"sweep.file": str(sweep.path), "sweep.experiment": json.dumps(config.experiment),
                  "sweep.evaluate": json.dumps(config.evaluate.model_dump() if config.evaluate else None),
                  "sweep.smoke": sweep.smoke,
                  "sweep.objective": f"{config.objective.metric} ({config.objective.mode})",
                  "sweep.num_samples": config.num_samples,
                  **{f"search.{k.lstrip('+')}": json.dumps(d.model_dump(exclude_none=True))  # no '+' in MLflow keys
                     for k, d in config.search.items()}}
        parent = tracker.open_parent(config.name, params, {"perceive.sweep_folder": str(folder)},
                                     resume_run_id=state.get("parent_run_id"))
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SWEEP_FILE, {"name": config.name, "parent_run_id": parent, "tracking_uri": uri,
                                     "experiment": config.tracking.experiment, "sweep": sweep.to_dict(),
                                     "extra": dict(extra or {}), "files": files,
                                     "started": state.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    trials = grid_size(config) if all(d.grid is not None for d in config.search.values()) else config.num_samples
    print(f"[sweep] {config.name}: {trials} trial(s) over {', '.join(config.search)}; "
          f"{'resuming' if resume else 'starting'} in {folder}" + (f"; MLflow parent run {parent}" if parent else ""),
          flush=True)
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # Tune hands it to the trials: keep their working directory
    res = config.resources
    started_ray = init_sweep_ray(config, address)  # False when the caller has started Ray (perceive-ray demo)
    quiet_ray_data()
    status = "FAILED"
    try:
        # The shared runs train in a thread while Tune starts the first trials, which wait for them at the gate.
        gate, shared_runs = start_shared(sweep, shared, folder, tracker, parent)
        if shared_runs is not None and res.trial_gpus > 0:
            shared_runs.result()  # waiting trials would hold GPUs the shared runs' workers need: train them first
        ctx = {"sweep": sweep.to_dict(), "folder": str(folder), "cwd": os.getcwd(), "uri": uri,
               "parent_run_id": parent, "shared": {}, "shared_gate": gate,
               "shared_stand_ins": shared_stand_ins(shared), "extra": dict(extra or {}), "files": files}
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                        {"cpu": res.trial_cpus, "gpu": res.trial_gpus})
        if resume:
            tuner = tune.Tuner.restore(str(folder / TUNE_DIR), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            tuner = tune.Tuner(
                trainable, param_space=param_space(sweep),
                tune_config=tune.TuneConfig(num_samples=config.num_samples,
                                            # a finished trial's actor runs the next trial (all ask the same
                                            # resources): one process start and its imports less per trial
                                            reuse_actors=True,
                                            # BasicVariantGenerator's own limit: TuneConfig's
                                            # max_concurrent_trials is not applied to a search_alg passed in
                                            # (4 trials ran at once; Tune warns that it ignores it), so it is
                                            # not set there.
                                            search_alg=BasicVariantGenerator(
                                                random_state=config.seed,
                                                max_concurrent=res.max_concurrent_trials)),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(folder),
                                          failure_config=tune.FailureConfig(max_failures=res.max_failures),
                                          callbacks=progress_callbacks(sweep)))
        grid = tuner.fit()
        if shared_runs is not None and shared_runs.done():
            shared_runs.result()  # a shared run's failure is the sweep's error (its trials failed at the gate)
        elif shared_runs is not None:  # the trials ended first (an interrupted sweep): do not wait, Ray stops below
            print("[sweep] the trials ended before the shared run(s) finished; stopping them (--resume continues)",
                  file=sys.stderr, flush=True)
        summary = summarize(sweep, folder, grid, parent)
        status = "FINISHED" if not summary["errored"] else "FAILED"
        return summary
    finally:
        if tracker is not None and parent:
            try:
                finish_parent(tracker, parent, folder, status)
            except Exception as exc:  # noqa: BLE001 (the trials' results are in the sweep folder either way)
                print(f"warning: could not close the MLflow parent run {parent}: {exc}", file=sys.stderr)
        if started_ray:
            shutdown_ray()


def run_shared(sweep: LoadedSweep, shared: list[tuple[Any, Any]], folder: Path, tracker: Any,
               parent: str) -> dict[str, str]:
    """Train each ``shared:`` run once (a finished one is not repeated: --resume), in its own child run; returns
    ``{id: export path}``, what the trials' ``shared:<id>`` values become."""
    from perceive_ray.run.training import run_train
    from perceive_ray.tracking.sweep import trial_params

    exports = {}
    for stage, config in shared:
        label = stage.label or f"shared: {stage.id}"
        child = None
        if tracker is not None:
            child = tracker.child(parent, stage.id, sweep=sweep.config.name, label=label, overrides=stage.overrides,
                                  params=trial_params([config], None), published_row=None, kind="shared")
        print(f"[sweep] shared run {stage.id} ({label}): trained once, every trial builds on it", flush=True)
        try:
            result = run_train(config, run_id=stage.id, track=tracker is not None, attach_run=child)
        except BaseException:
            if tracker is not None:
                tracker.end(child, "FAILED")
            raise
        if tracker is not None:
            tracker.end(child, "FINISHED")
        exports[stage.id] = str(Path(result["export"]).resolve())
    return exports


def progress_callbacks(sweep: LoadedSweep) -> list[Any]:
    """The live sweep gauges (dashboards/perceive_train.json) and a progress line per trial state change."""
    from perceive_ray.run.ray_metrics import SweepProgressCallback

    return [SweepProgressCallback(sweep.config.name, sweep.config.objective.metric, sweep.config.objective.mode)]


def summarize(sweep: LoadedSweep, folder: Path, grid: Any, parent: str) -> dict[str, Any]:
    """Per trial: label, status, objective (from the trial records, which survive restores); best trial."""
    objective = sweep.config.objective
    records = [json.loads(p.read_text()) for p in sorted((folder / TRIALS_DIR).glob("*.json"))]
    errored = [str(getattr(r, "error", "")) for r in grid if getattr(r, "error", None)]
    finished = [r for r in records if r["status"] == "FINISHED"]
    sign = 1 if objective.mode == "max" else -1
    best = max(finished, key=lambda r: sign * r["metrics"].get(objective.metric, -sign * math.inf), default=None)
    summary = {"name": sweep.config.name, "folder": str(folder), "parent_run_id": parent,
               "objective": objective.model_dump(), "trials": records, "errored": errored,
               "best": best and {"trial_id": best["trial_id"], "label": best["label"],
                                 "value": best["metrics"].get(objective.metric)}}
    write_json(folder / "summary.json", summary)
    width = max([len(r["label"]) for r in records] + [5])
    print(f"\n[sweep] {sweep.config.name}: {len(finished)}/{len(records)} trial(s) finished; objective "
          f"{objective.metric} ({objective.mode})")
    for r in sorted(records, key=lambda r: r["label"]):
        value = r.get("metrics", {}).get(objective.metric)
        shown = f"{100 * value:6.1f}%" if isinstance(value, float) else "     -"
        print(f"  {r['label']:<{width}}  {r['status']:<9} {shown}")
    if errored:
        print(f"[sweep] {len(errored)} trial(s) failed: {errored[0][:500]}", file=sys.stderr)
    return summary


def finish_parent(tracker: Any, parent: str, folder: Path, status: str) -> None:
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        finished = sum(r["status"] == "FINISHED" for r in summary["trials"])
        metrics = {"trials_finished": finished, "trials_failed": len(summary["trials"]) - finished}
        if summary["best"] and summary["best"]["value"] is not None:
            metrics[f"best/{summary['objective']['metric']}"] = summary["best"]["value"]
        tracker.log_metrics(parent, metrics)
        tracker.log_artifact(parent, summary_path)
    tracker.end(parent, status)
