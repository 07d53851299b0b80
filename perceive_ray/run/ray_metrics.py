"""Live training and sweep metrics through ``ray.util.metrics`` (Prometheus, exported by Ray with the ``ray_`` prefix).

``TrainGauges`` is built on training rank 0 and fed the per-step metrics dict; ``SweepProgressCallback`` is a Tune
callback on the sweep driver (trials per state, trials finished, best objective so far, a one-line summary on every
trial state change). ``dashboards/perceive_train.json`` charts both; ``tests/unit/test_dashboards.py`` finds the
names below with a regex over this source, so every metric is created by a literal call: ``metrics.Gauge`` (or
``Counter``) with the quoted name as its first argument.

Outside a Ray worker or driver the metric objects are still built and recording is a no-op, so both classes work
(and are unit-tested) without Ray. Neither ever raises into the training loop or the Tune controller: the first
failure is printed once to stderr and the metrics are switched off.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ray.tune import Callback

# "train/<key>" in the training loop's metrics dict -> the gauge that shows it
TRAIN_GAUGE_KEYS = {
    "train/loss": "loss",
    "train/samples_per_s": "samples_per_s",
    "train/step_time_s": "step_time_s",
    "train/step": "step",
    "train/lr": "lr",
}
TRIAL_STATES = ("PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR")
FINISHED_STATES = ("TERMINATED", "ERROR")


def _number(value: Any) -> float | None:
    """A float for ints, floats and 0-dim tensors / numpy scalars; None for anything else (bools included)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _WarnOnce:
    """Prints the first failure of a metrics object to stderr, then switches the object off."""

    prefix = "[metrics]"

    def __init__(self) -> None:
        self.disabled = False

    def failed(self, what: str, exc: BaseException) -> None:
        if not self.disabled:
            print(f"{self.prefix} {what} failed, live metrics off from here: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
        self.disabled = True


class TrainGauges:
    """Training progress on rank 0: ``update(metrics, job=..., run_id=...)`` once per step (cheap: a few sets).

    Gauges ``perceive_train_loss``, ``_samples_per_s``, ``_step_time_s``, ``_step``, ``_lr`` take the values of
    the keys present in the dict (samples/s and step time exist only on logged steps, so those gauges hold the last
    window's value); the counter ``perceive_train_steps`` counts steps done by this process (a resumed run counts
    from its resume step), so ``rate()`` of it is steps/s. The metric objects are created at the first update.
    """

    TAG_KEYS = ("job", "run_id")

    def __init__(self) -> None:
        self._gauges: dict[str, Any] | None = None
        self._steps: Any = None
        self._last_step: int | None = None
        self._guard = _WarnOnce()

    def _create(self) -> None:
        from ray.util import metrics

        tags = self.TAG_KEYS
        self._gauges = {
            "loss": metrics.Gauge("perceive_train_loss", description="training loss (last step)", tag_keys=tags),
            "samples_per_s": metrics.Gauge("perceive_train_samples_per_s",
                                           description="training samples per second (last logging window)",
                                           tag_keys=tags),
            "step_time_s": metrics.Gauge("perceive_train_step_time_s",
                                         description="seconds per step (last logging window)", tag_keys=tags),
            "step": metrics.Gauge("perceive_train_step", description="optimizer steps done", tag_keys=tags),
            "lr": metrics.Gauge("perceive_train_lr", description="learning rate (first parameter group)",
                                tag_keys=tags),
        }
        self._steps = metrics.Counter("perceive_train_steps", description="optimizer steps done by this process",
                                      tag_keys=tags)

    def update(self, metrics: Mapping[str, Any], *, job: str, run_id: str) -> None:
        if self._guard.disabled:
            return
        try:
            if self._gauges is None:
                self._create()
            tags = {"job": str(job), "run_id": str(run_id)}
            for key, name in TRAIN_GAUGE_KEYS.items():
                value = _number(metrics.get(key))
                if value is not None:
                    self._gauges[name].set(value, tags=tags)
            step = _number(metrics.get("train/step"))
            if step is None:
                done = 1
            else:
                done = 1 if self._last_step is None else int(step) - self._last_step
                self._last_step = int(step)
            if done > 0:
                self._steps.inc(done, tags=tags)
        except Exception as exc:  # never into the training loop
            self._guard.failed("TrainGauges.update", exc)


def result_value(result: Mapping[str, Any] | None, metric: str) -> float | None:
    """``result[metric]`` as a finite float; a ``/`` in the name also finds nested dicts (``{"a": {"b": x}}``)."""
    if not result:
        return None
    value: Any = result
    if metric in result:
        value = result[metric]
    else:
        for part in metric.split("/"):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
    number = _number(value)
    return number if number is not None and math.isfinite(number) else None


def _hook(method: Callable[..., None]) -> Callable[..., None]:
    """A Tune hook that never raises: the first failure is printed, later ones are dropped."""

    @functools.wraps(method)
    def safe(self: SweepProgressCallback, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as exc:
            if not self._hook_failed:
                print(f"[sweep] progress callback {method.__name__} failed (ignored): {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
            self._hook_failed = True

    return safe


class SweepProgressCallback(Callback):
    """Tune callback for the sweep driver: trial counts per state, trials finished, best objective so far.

    Gauge ``perceive_sweep_trials`` (tags sweep, state: PENDING / RUNNING / PAUSED / TERMINATED / ERROR), counter
    ``perceive_sweep_trials_finished`` (tag sweep: trials that terminated or errored under this driver), gauge
    ``perceive_sweep_best`` (tag sweep: the best value of ``metric`` reported by any trial, by ``mode``). On every
    trial start, completion, error and recovery it prints one line, e.g. ``[sweep token_usage] 2/4 finished,
    1 running, 1 pending, best whatsup_controlled_a/pair_acc=0.5300 (trial 3f2a_00001)``.

    Tune calls ``on_trial_start`` before the trial is marked RUNNING and ``on_trial_complete`` before it is marked
    TERMINATED, so each hook counts its own trial in the state the hook means; ``on_step_end`` re-reads the real
    statuses (a resumed sweep's restored trials included).
    """

    def __init__(self, sweep: str, metric: str, mode: str = "max", *, echo: bool = True) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.sweep, self.metric, self.mode, self.echo = str(sweep), metric, mode, echo
        self.states: dict[str, str] = {}
        self.finished: set[str] = set()
        self.best: float | None = None
        self.best_trial: str | None = None
        self.expected = 0
        self._metrics: tuple[Any, Any, Any] | None = None
        self._guard = _WarnOnce()
        self._guard.prefix = "[sweep]"
        self._hook_failed = False

    # -- bookkeeping (pure) -----------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(TRIAL_STATES, 0)
        for state in self.states.values():
            counts[state if state in counts else "PENDING"] += 1
        return counts

    def observe(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        value = result_value(result, self.metric)
        if value is None:
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best, self.best_trial = value, trial_id

    def refresh(self, trials: Sequence[Any], trial: Any = None, state: str | None = None) -> None:
        """Statuses from ``trials``; ``trial`` counted as ``state`` (the state its hook means)."""
        for t in trials or ():
            self.states[str(t.trial_id)] = str(getattr(t, "status", "PENDING"))
            self.observe(str(t.trial_id), getattr(t, "last_result", None))
        if trial is not None:
            tid = str(trial.trial_id)
            self.states[tid] = state or str(getattr(trial, "status", "PENDING"))
            self.observe(tid, getattr(trial, "last_result", None))

    def summary(self) -> str:
        counts = self.counts()
        total = max(len(self.states), self.expected)
        done = counts["TERMINATED"] + counts["ERROR"]
        parts = [f"{done}/{total} finished", f"{counts['RUNNING']} running"]
        if counts["PENDING"]:
            parts.append(f"{counts['PENDING']} pending")
        if counts["PAUSED"]:
            parts.append(f"{counts['PAUSED']} paused")
        if counts["ERROR"]:
            parts.append(f"{counts['ERROR']} failed")
        best = "none yet" if self.best is None else f"{self.best:.4f} (trial {self.best_trial})"
        return f"[sweep {self.sweep}] " + ", ".join(parts) + f", best {self.metric}={best}"

    # -- export -----------------------------------------------------------------------------------------------

    def _create(self) -> None:
        from ray.util import metrics

        self._metrics = (
            metrics.Gauge("perceive_sweep_trials", description="sweep trials per state", tag_keys=("sweep", "state")),
            metrics.Counter("perceive_sweep_trials_finished", description="sweep trials terminated or errored",
                            tag_keys=("sweep",)),
            metrics.Gauge("perceive_sweep_best", description="best objective value so far", tag_keys=("sweep",)),
        )

    def publish(self, *, finished_now: int = 0, announce: bool = False) -> None:
        if not self._guard.disabled:
            try:
                if self._metrics is None:
                    self._create()
                trials, finished, best = self._metrics
                for state, n in self.counts().items():
                    trials.set(n, tags={"sweep": self.sweep, "state": state})
                if finished_now > 0:
                    finished.inc(finished_now, tags={"sweep": self.sweep})
                if self.best is not None:
                    best.set(self.best, tags={"sweep": self.sweep})
            except Exception as exc:  # never into the Tune controller
                self._guard.failed("SweepProgressCallback metrics", exc)
        if announce and self.echo:
            print(self.summary(), flush=True)

    def _finish(self, trials: Sequence[Any], trial: Any, state: str) -> None:
        tid = str(trial.trial_id)
        self.refresh(trials, trial, state)
        new = tid not in self.finished
        self.finished.add(tid)
        self.publish(finished_now=int(new), announce=True)

    # -- Tune hooks (Ray 2.60 signatures; **info for forward compatibility) ---------------------------------

    @_hook
    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        self.expected = max(0, int(total_num_samples or 0))

    @_hook
    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.refresh(trials)
        self.publish()

    @_hook
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.finished.discard(str(trial.trial_id))  # a restarted trial counts again when it finishes
        self.refresh(trials, trial, "RUNNING")
        self.publish(announce=True)

    @_hook
    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        before = self.best
        self.observe(str(trial.trial_id), result)
        if self.best != before:
            self.publish()

    @_hook
    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trials, trial, "TERMINATED")

    @_hook
    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trials, trial, "ERROR")

    @_hook
    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.refresh(trials, trial, "PENDING")
        self.publish(announce=True)

    @_hook
    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.refresh(trials)
        self.publish(announce=True)
