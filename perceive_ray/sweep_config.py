"""Sweep files (``kind: sweep``): a base experiment + a search space of dotted overrides, validated up front.

A sweep names a base experiment (eval-only, or training stages whose last export an ``evaluate`` experiment then
scores) and a search space whose keys are the same dotted keys as command-line overrides. One search space spans
training and evaluation factors: in a trial that trains, a key goes to the training config(s), except ``eval.<key>``
and the eval-only top keys (scorer, benchmarks, metrics, ...), which go to the evaluation (``model.*``,
``resources.*``, ``seed`` and ``tracking.*`` exist in both: prefix ``eval.`` for the evaluation's). A trial = base +
its overrides; ``evaluate.trained`` names the eval keys that receive ``train:<run id of the last stage>``.

A key starting with ``+`` is a bundle: each value is a mapping of dotted overrides applied together (with an
optional ``label`` for tables), for factors that are not one key (an encoder = model.source + model.pretrained + its
loss), and it may switch the trial's ``experiment`` and ``evaluate`` (an untrained CLIP row beside trained heads;
LLaVA's VQAScore beside a trained VLM2Vec). ``experiment`` may list training stages, run in order; a later stage
whose file reads ``model.source: train:<...>`` gets the previous stage's run.

``shared:`` lists training runs made ONCE, before any trial, by the sweep driver (a CLIP pretrained from scratch
that every variant then starts from): an override value ``shared:<id>`` anywhere in the trials' overrides names
that run's export (a path). While the shared runs have not finished, checks read the shared run's starting
``model.source`` in its place (same architecture), so every trial is still validated before anything runs.

Everything is checked before a trial starts (``check_sweep``): each grid point, and each choice value / range end
of the other dimensions, builds and validates its configs; a bad key fails the sweep naming the sweep file, the trial
and the key. No Ray, no MLflow here (``perceive_ray.run.sweep`` runs it).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from perceive_ray.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    load_config,
    load_raw,
    read_yaml,
    validate,
)
from perceive_ray.data.sources import sha256_file

EVAL_PREFIX = "eval."
EVAL_ONLY_TOP = ("scorer", "benchmarks", "metrics", "on_error", "max_error_fraction")
RANGE_KINDS = ("uniform", "loguniform", "randint", "quniform")
SHARED_REF = "shared:"


class SearchDimension(StrictModel):
    """One key's values: ``grid`` (every value, crossed with the other grids), ``choice`` (sampled), or a range."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # [low, high): high exclusive, as Tune's randint
    quniform: tuple[float, float, float] | None = None  # low, high, q

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        given = [k for k in ("grid", "choice", *RANGE_KINDS) if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, {', '.join(RANGE_KINDS)} (got {given or 'none'})")
        values = self.grid if self.grid is not None else self.choice
        if values is not None and not values:
            raise ValueError(f"{given[0]}: at least one value")
        for kind in ("uniform", "loguniform", "randint", "quniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind}: low {bounds[0]} must be below high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", *RANGE_KINDS) if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that validation tries: every grid/choice value, the ends of a range."""
        if self.grid is not None:
            return list(self.grid)
        if self.choice is not None:
            return list(self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        low, high = getattr(self, self.kind)[:2]
        return [low, high]


class EvaluateConfig(StrictModel):
    experiment: str  # eval experiment file, relative to the sweep file
    # Eval keys that receive ``train:<trial run id>`` (model.source for a fine-tuned CLIP or LLaVA; model.source
    # and scorer.options.head_weights for a head, whose export names the frozen encoder it was trained on).
    trained: list[str] = Field(min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)  # every trial's eval config


class ObjectiveConfig(StrictModel):
    metric: str  # "<benchmark>/<metric key>", e.g. whatsup_controlled_a/2way/lr/pair_acc
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _has_benchmark(cls, value: str) -> str:
        if "/" not in value:
            raise ValueError(f"{value!r}: write <benchmark>/<metric>, e.g. whatsup_controlled_a/2way/lr/pair_acc")
        return value


class SweepResources(StrictModel):
    # The trial's own process (it drives a TorchTrainer and an evaluation and mostly waits): a fraction of a CPU.
    # On a local Ray the driver adds these fractions to the node's CPUs so the trial's workers get whole ones.
    # A stage in Ray Train's local mode (resources.local) trains inside this process, within this reservation: on a
    # shared cluster, give the trial what that training needs (its cpus_per_worker, a GPU).
    trial_cpus: float = Field(default=0.25, gt=0)
    trial_gpus: float = Field(default=0.0, ge=0)
    max_concurrent_trials: int = Field(default=1, ge=1)
    max_failures: int = Field(default=0, ge=0)  # Tune restarts of a failed trial (Train restarts are separate)


class SweepTracking(StrictModel):
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "perceive_ray_sweeps"
    timeout_s: float = Field(default=10.0, gt=0)
    max_retries: int = Field(default=2, ge=0)


class SharedStage(StrictModel):
    """A training run every trial builds on, made once by the driver (run id = ``id``, in the sweep's run folder)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: str  # a kind: train file, relative to the sweep file
    overrides: dict[str, Any] = Field(default_factory=dict)
    label: str = ""


class SweepConfig(StrictModel):
    kind: Literal["sweep"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    # The base experiment (kind train or eval), or training stages run in order (LLaVA: projector, then LoRA; a
    # later stage whose model.source is train:<...> gets the previous stage's run). Relative to the sweep file.
    experiment: str | list[str]
    overrides: dict[str, Any] = Field(default_factory=dict)  # applied to every trial's base config(s)
    evaluate: EvaluateConfig | None = None
    search: dict[str, SearchDimension] = Field(min_length=1)
    num_samples: int = Field(default=1, ge=1)  # Tune's: repeats of the grid; samples of choices and ranges
    seed: int | None = None  # Tune's search seed (choices and ranges); the experiments' own seeds are config keys
    objective: ObjectiveConfig
    resources: SweepResources = Field(default_factory=SweepResources)
    storage_path: str = "runs/sweeps"  # the sweep folder is <storage_path>/<name>; shared storage on a cluster
    tracking: SweepTracking = Field(default_factory=SweepTracking)
    # Paper rows (PROTOCOLS §6) a trial reproduces: row name -> the overrides that select it (all must match; a
    # bundle matches by its label).
    published: dict[str, dict[str, Any]] = Field(default_factory=dict)
    shared: list[SharedStage] = Field(default_factory=list)
    smoke: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _shared_ids(self) -> SweepConfig:
        ids = [s.id for s in self.shared]
        if len(set(ids)) != len(ids):
            raise ValueError(f"shared: ids must be unique, got {ids}")
        return self


class LoadedSweep:
    """A sweep file as loaded: its config, its absolute path, and whether smoke mode applies."""

    def __init__(self, config: SweepConfig, path: Path, *, smoke: bool) -> None:
        self.config, self.path, self.smoke = config, path.resolve(), smoke

    def resolve(self, ref: str) -> Path:
        return (self.path.parent / ref).resolve()

    def folder(self, storage: str | Path | None = None) -> Path:
        """``<storage>/<name>``: a path every node mounts (the trials' run folders and checkpoints live there)."""
        where = str(storage or self.config.storage_path)
        if "://" in where:
            raise ConfigError(f"storage {where!r}: give a path every node mounts (NFS, a PVC); URIs such as s3:// "
                              "are not supported (the trials' run folders are file paths)")
        return (Path(where) / self.config.name).resolve()

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(mode="json"), "path": str(self.path), "smoke": self.smoke}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadedSweep:
        return cls(SweepConfig.model_validate(data["config"]), Path(data["path"]), smoke=bool(data["smoke"]))


def load_sweep(path: str | Path, *, smoke: bool = False) -> LoadedSweep:
    """Read a sweep file (its ``smoke:`` block applied when asked); ``check_sweep`` validates its trials."""
    path = Path(path)
    data = read_yaml(path)
    if data.get("kind") != "sweep":
        raise ConfigError(f"{path}: kind: {data.get('kind')!r}; perceive-ray sweep runs kind: sweep files")
    if smoke:
        block = data.get("smoke") or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: smoke: must be a mapping of dotted overrides")
        data = apply_overrides(data, block, source=f"{path}: smoke")
    return LoadedSweep(validate(data, source=str(path), schema=SweepConfig), path, smoke=smoke)


# -- trials -----------------------------------------------------------------------------------------------------

BUNDLE_PREFIX, BUNDLE_LABEL = "+", "label"
BUNDLE_FILES = ("experiment", "evaluate")  # a bundle may also switch the trial's experiment files


class TrialPlan:
    """One trial's files and overrides: training stages (maybe none), the evaluation, and which keys go where."""

    def __init__(self, stages: list[Path], evaluation: Path, trained: list[str], base: dict[str, Any],
                 evaluation_overrides: dict[str, Any]) -> None:
        self.stages, self.evaluation, self.trained = stages, evaluation, trained
        self.base, self.evaluation_overrides = base, evaluation_overrides

    @property
    def trains(self) -> bool:
        return bool(self.stages)


def _kind(path: Path, key: str, source: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"{source}: {key}: {path} does not exist")
    return str(load_raw(path).get("kind", "eval"))


def plan_trial(sweep: LoadedSweep, overrides: Mapping[str, Any]) -> TrialPlan:
    """Files and overrides of the trial with these swept values. Train keys go to every training stage; with a
    training base, ``eval.`` keys and the eval-only top keys (scorer, benchmarks, metrics, ...) go to the eval."""
    experiment: Any = sweep.config.experiment
    evaluate = sweep.config.evaluate.model_dump() if sweep.config.evaluate else None
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if not key.startswith(BUNDLE_PREFIX):
            flat[key] = value
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{sweep.path}: search: {key}: a bundle's values are mappings of dotted overrides, "
                              f"got {value!r}")
        if "experiment" in value:
            experiment = value["experiment"]
            evaluate = None
        if "evaluate" in value:
            evaluate = dict(value["evaluate"]) if value["evaluate"] else None
        flat.update({k: v for k, v in value.items() if k not in (BUNDLE_LABEL, *BUNDLE_FILES)})
    files = [experiment] if isinstance(experiment, str) else list(experiment)
    paths = [sweep.resolve(f) for f in files]
    kinds = [_kind(p, "experiment", sweep.path) for p in paths]
    if evaluate is not None:
        evaluate = EvaluateConfig.model_validate(evaluate)
    if kinds == ["eval"]:
        if evaluate is not None:
            raise ConfigError(f"{sweep.path}: evaluate: applies to training experiments; {files[0]} is kind: eval")
        base = {**sweep.config.overrides, **{k.removeprefix(EVAL_PREFIX): v for k, v in flat.items()}}
        return TrialPlan([], paths[0], [], {}, base)
    if any(k != "train" for k in kinds):
        raise ConfigError(f"{sweep.path}: experiment: {files}: give one eval experiment, or training stages "
                          f"(kind: train) followed by evaluate:")
    if evaluate is None:
        raise ConfigError(f"{sweep.path}: experiment {files} trains: add evaluate: {{experiment: <eval file>, "
                          "trained: [<eval keys that read the trained run>]}")
    evaluation = sweep.resolve(evaluate.experiment)
    if _kind(evaluation, "evaluate.experiment", sweep.path) != "eval":
        raise ConfigError(f"{sweep.path}: evaluate.experiment: {evaluation} is not an eval experiment")
    base: dict[str, Any] = dict(sweep.config.overrides)
    eval_over: dict[str, Any] = dict(evaluate.overrides)
    for key, value in flat.items():
        if key.startswith(EVAL_PREFIX) or key.split(".", 1)[0] in EVAL_ONLY_TOP:
            eval_over[key.removeprefix(EVAL_PREFIX)] = value
        else:
            base[key] = value
    return TrialPlan(paths, evaluation, list(evaluate.trained), base, eval_over)


def trial_label(overrides: Mapping[str, Any]) -> str:
    """A short human label: ``key=value`` of each swept key, in search order (last key part only when unique)."""
    parts = []
    tails = [k.rsplit(".", 1)[-1] for k in overrides]
    for key, value in overrides.items():
        if key.startswith(BUNDLE_PREFIX) and isinstance(value, Mapping) and BUNDLE_LABEL in value:
            parts.append(str(value[BUNDLE_LABEL]))
            continue
        tail = key.rsplit(".", 1)[-1]
        name = tail if tails.count(tail) == 1 else key
        parts.append(f"{name}={format_value(value)}")
    return ", ".join(parts)


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def published_row(sweep: SweepConfig, overrides: Mapping[str, Any]) -> str | None:
    """The paper row whose selectors all match (a bundle matches by its value or its label)."""
    def matches(value: Any, wanted: Any) -> bool:
        return value == wanted or (isinstance(value, Mapping) and value.get(BUNDLE_LABEL) == wanted)

    for row, when in sweep.published.items():
        if all(k in overrides and matches(overrides[k], v) for k, v in when.items()):
            return row
    return None


class TrialConfigs:
    """A trial's validated configs: its training stages (in order; empty for an eval-only trial) and its eval."""

    def __init__(self, plan: TrialPlan, stages: list[Any], evaluation: Any) -> None:
        self.plan, self.stages, self.evaluation = plan, stages, evaluation

    def all(self) -> list[Any]:
        return [*self.stages, self.evaluation]


def stage_run_id(trial_id: str, index: int, count: int) -> str:
    """The training run id of stage ``index`` of a trial (the trial id itself when there is one stage)."""
    return trial_id if count == 1 else f"{trial_id}-stage{index + 1}"


def shared_configs(sweep: LoadedSweep, *, fixed: Mapping[str, Any] = ()) -> list[tuple[SharedStage, Any]]:
    """Each ``shared:`` run's validated training config (ConfigError naming the sweep file and the shared id)."""
    out = []
    for stage in sweep.config.shared:
        path = sweep.resolve(stage.experiment)
        try:
            if _kind(path, "experiment", sweep.path) != "train":
                raise ConfigError(f"experiment: {path} is not a training experiment (kind: train)")
            out.append((stage, load_config(path, {**stage.overrides, **dict(fixed)}, smoke=sweep.smoke)))
        except ConfigError as exc:
            raise ConfigError(f"{sweep.path}: shared: {stage.id}: {exc}") from None
    return out


def shared_stand_ins(configs: list[tuple[SharedStage, Any]]) -> dict[str, str]:
    """``shared:<id>`` -> the shared run's starting model.source: what checks read before that run has finished."""
    refs = {}
    for stage, config in configs:
        source = Path(str(config.model.source)).expanduser()
        refs[stage.id] = str(source.resolve()) if source.exists() else str(config.model.source)
    return refs


def substitute_shared(values: Mapping[str, Any], refs: Mapping[str, str], *, source: Path) -> dict[str, Any]:
    """Override values ``shared:<id>`` replaced by ``refs[id]`` (a path); ConfigError for an undeclared id."""
    out = {}
    for key, value in values.items():
        if isinstance(value, str) and value.startswith(SHARED_REF):
            name = value.removeprefix(SHARED_REF)
            if name not in refs:
                raise ConfigError(f"{source}: {key}: {value!r} names no shared run (shared: declares "
                                  f"{sorted(refs) or 'none'})")
            value = refs[name]
        out[key] = value
    return out


def build_trial_configs(sweep: LoadedSweep, overrides: Mapping[str, Any], *, fixed: Mapping[str, Any] = (),
                        trial_id: str | None = None, trained: bool = False,
                        shared: Mapping[str, str] | None = None) -> TrialConfigs:
    """Load and validate one trial's configs. ``fixed``: what the sweep driver sets on every config (output_dir,
    tracking). ``trial_id``: chains the stages (a later stage whose model.source is ``train:<...>`` reads the
    previous stage's run). ``trained``: the training has run, so the eval's ``evaluate.trained`` keys get
    ``train:<last stage's run id>`` (before that, the eval validates with those keys as its file has them).
    ``shared``: what ``shared:<id>`` values become (the shared runs' exports, or their stand-ins before)."""
    plan = plan_trial(sweep, overrides)
    plan.base = substitute_shared(plan.base, shared or {}, source=sweep.path)
    plan.evaluation_overrides = substitute_shared(plan.evaluation_overrides, shared or {}, source=sweep.path)
    stages = []
    for index, path in enumerate(plan.stages):
        chained = {}
        if index and trial_id and str(load_raw(path).get("model", {}).get("source", "")).startswith("train:"):
            chained["model.source"] = f"train:{stage_run_id(trial_id, index - 1, len(plan.stages))}"
        stages.append(load_config(path, {**plan.base, **dict(fixed), **chained}, smoke=sweep.smoke))
    refs = {}
    if trained and plan.trains:
        run = stage_run_id(str(trial_id), len(plan.stages) - 1, len(plan.stages))
        refs = {key: f"train:{run}" for key in plan.trained}
    evaluation = load_config(plan.evaluation, {**plan.evaluation_overrides, **dict(fixed), **refs},
                             smoke=sweep.smoke)
    return TrialConfigs(plan, stages, evaluation)


def probe_points(sweep: SweepConfig) -> Iterator[dict[str, Any]]:
    """Every grid point (with the first probe value of the other dimensions), then every probe value of each
    non-grid dimension (with the first grid point): each value of the search space is validated at least once."""
    dims = sweep.search
    grid_keys = [k for k, d in dims.items() if d.kind == "grid"]
    first = {k: d.probe_values()[0] for k, d in dims.items()}
    for combo in itertools.product(*(dims[k].grid for k in grid_keys)):
        yield {**first, **dict(zip(grid_keys, combo, strict=True))}
    for key, dim in dims.items():
        if dim.kind != "grid":
            for value in dim.probe_values()[1:]:
                yield {**first, key: value}


def check_sweep(sweep: LoadedSweep, *, fixed: Mapping[str, Any] = (),
                shared: Mapping[str, str] | None = None) -> list[TrialConfigs]:
    """Validate every probe point's configs; ConfigError naming the sweep file, the trial and the key.
    ``shared``: ``shared:<id>`` values (default: the shared runs' stand-ins, see ``shared_stand_ins``)."""
    config = sweep.config
    if shared is None:
        shared = shared_stand_ins(shared_configs(sweep, fixed=fixed))
    for row, when in config.published.items():
        unknown = sorted(set(when) - set(config.search))
        if unknown:
            raise ConfigError(f"{sweep.path}: published: {row!r} selects on {unknown}, which the search does not "
                              "vary")
    checked = []
    for point in probe_points(config):
        try:
            configs = build_trial_configs(sweep, point, fixed=fixed, shared=shared)
            for key in configs.plan.trained:
                if not re.fullmatch(r"model\.source|scorer\.options\.[A-Za-z0-9_]+", key):
                    raise ConfigError(f"evaluate.trained: {key!r}: train:<run id> is read by model.source and "
                                      "scorer.options.<weights option> only")
            benchmark = config.objective.metric.split("/", 1)[0]
            names = [b.name for b in configs.evaluation.benchmarks]
            if benchmark not in names:
                raise ConfigError(f"objective.metric: {config.objective.metric!r}: the evaluation runs {names}, "
                                  f"not {benchmark!r}")
        except ConfigError as exc:
            raise ConfigError(f"{sweep.path}: trial {trial_label(point)}: {exc}") from None
        checked.append(configs)
    return checked


# -- the experiment files a sweep reads ---------------------------------------------------------------------------

def experiment_files(sweep: LoadedSweep) -> list[Path]:
    """Every experiment file the sweep's shared runs and trials read (each value of the search space, as
    ``check_sweep`` probes it), with their ``base:`` files; sorted. The sweep file itself is compared by content
    (``perceive_ray.run.sweep.check_resume``)."""
    paths = {sweep.resolve(stage.experiment) for stage in sweep.config.shared}
    for point in probe_points(sweep.config):
        plan = plan_trial(sweep, point)
        paths.update([*plan.stages, plan.evaluation])
    with_bases = set(paths)
    for path in paths:
        base = read_yaml(path).get("base")
        if isinstance(base, str):
            with_bases.add((path.parent / base).resolve())
    return sorted(with_bases)


def file_digests(paths: list[Path]) -> dict[str, str]:
    """``{path: sha256 of its bytes}``."""
    return {str(p): sha256_file(p) for p in paths}


def changed_files(recorded: Mapping[str, str]) -> list[str]:
    """The recorded files whose bytes differ now, or that are gone."""
    changed = []
    for name, digest in sorted(recorded.items()):
        path = Path(name)
        if not path.is_file() or sha256_file(path) != digest:
            changed.append(name)
    return changed


def files_changed_error(changed: list[str], *, what: str) -> ConfigError:
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return ConfigError(f"{what}: experiment file(s) changed since the sweep started: {shown}. Its trials must read "
                       "what the finished ones read: restore the file(s) (git diff / git checkout), or start a new "
                       "sweep (another name or --storage)")


def grid_size(sweep: SweepConfig) -> int:
    grids = [len(d.grid) for d in sweep.search.values() if d.grid is not None]
    return math.prod(grids) * sweep.num_samples
