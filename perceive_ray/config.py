"""The one configuration schema: frozen pydantic models, YAML with one `base:` level, dotted overrides.

Every view of a run (CLI, experiment YAML, Ray Train/Tune configs, MLflow params) is a view of ``ExperimentConfig``.
Errors are ``ConfigError``s that name the file and the dotted key path; the CLI turns them into exit code 2.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from perceive_ray import registry
from perceive_ray.metrics.policies import LabelErrata, TiePolicy

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|password|passwd|secret|key|access_token)=)[^&\s]+")


def redact_uri(text: object) -> str:
    """``https://user:secret@host`` -> ``https://***@host``; secret query values -> ``***`` (in any text)."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("***@", str(text)))


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message names the file and the key path."""


class StrictModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BenchmarkConfig(StrictModel):
    """One benchmark to evaluate: a registry key and the folder holding it in its published layout."""

    name: str
    root: Path
    strict_sizes: bool = False
    limit: int | None = Field(default=None, gt=0, description="Score only the first N items (smoke runs).")

    @field_validator("name")
    @classmethod
    def _known_benchmark(cls, value: str) -> str:
        if value not in registry.names("benchmarks"):
            raise ValueError(f"unknown benchmark {value!r}; known: {', '.join(registry.names('benchmarks'))}")
        return value


class MetricsConfig(StrictModel):
    tie_policy: TiePolicy = "strict"
    label_errata: LabelErrata = "original"
    max_nan_fraction: float = Field(default=0.0, ge=0.0, le=1.0)


class ModelConfig(StrictModel):
    """Which weights to load. ``source`` is an HF id, an open_clip name, or a local directory."""

    family: str
    source: str
    pretrained: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in registry.names("models"):
            raise ValueError(f"unknown model family {value!r}; known: {', '.join(registry.names('models'))}")
        return value

    @model_validator(mode="after")
    def _remote_code_opt_in(self) -> ModelConfig:
        if self.trust_remote_code and self.family not in registry.REMOTE_CODE_FAMILIES:
            allowed = ", ".join(sorted(registry.REMOTE_CODE_FAMILIES))
            raise ValueError(f"trust_remote_code is refused for family {self.family!r}; only registry entries "
                             f"that opt in may run hub code ({allowed})")
        return self


class ScorerConfig(StrictModel):
    """A registered scorer, its batch size (scoring rows = (item, image) pairs per call) and its typed options."""

    name: str
    batch_size: int = Field(default=8, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_scorer(cls, value: str) -> str:
        if value not in registry.names("scorers"):
            raise ValueError(f"unknown scorer {value!r}; known: {', '.join(registry.names('scorers'))}")
        return value


class ResourcesConfig(StrictModel):
    """The scorer actor pool of ``eval`` (``score`` runs in one process and ignores these)."""

    num_actors: int = Field(default=1, gt=0)
    # null = auto: 1 CPU beside a GPU; on a CPU-only run the cluster's CPUs shared out among the actors, minus half
    # a CPU for image decoding (an actor pool that takes every CPU after a read step deadlocks).
    num_cpus_per_actor: float | None = Field(default=None, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    # null = auto: the actor's CPU share rounded up (at least 1, at most the node's cores). Ray sets
    # OMP_NUM_THREADS=1 for fractional shares; the actor sets torch's thread count from this instead.
    threads_per_actor: int | None = Field(default=None, gt=0)
    # Ray Data's object-store budget for an evaluation: bounds how far image decoding runs ahead of the scorer
    # (benchmarks/RESULTS.md §3: without it decoded images pile up to Ray's default budget). null = Ray's default.
    object_store_mb: int | None = Field(default=512, gt=0)
    # At most this many image-decoding tasks at once (Ray Data TaskPoolStrategy(size=n)); null: as many as the
    # cluster's CPUs allow (0.25 CPU each). Every concurrent task needs its own worker process (~0.2 GB, ~2 CPU-s to
    # start): on a small machine a cap saves the processes, and decoding stays well ahead of the scorer anyway.
    decode_tasks: int | None = Field(default=None, gt=0)


class TrackingConfig(StrictModel):
    uri: str | None = None
    experiment: str = "perceive_ray"
    # Bounds on every tracking call: a dead server costs at most about timeout_s x (max_retries + 1) once.
    timeout_s: float = Field(default=10.0, gt=0)
    max_retries: int = Field(default=2, ge=0)


class ExperimentConfig(StrictModel):
    """An evaluation experiment. ``smoke`` holds dotted overrides that turn it into a tiny-model CPU run."""

    kind: Literal["eval"] = "eval"
    name: str
    description: str = ""
    seed: int = 0
    benchmarks: list[BenchmarkConfig] = Field(min_length=1)
    model: ModelConfig
    scorer: ScorerConfig
    metrics: MetricsConfig = MetricsConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: Path = Path("runs")
    on_error: Literal["record", "fail"] = "record"  # unreadable images: error rows, or stop the run
    # record mode: a benchmark with more unreadable images than this fraction fails the run (after writing all)
    max_error_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    smoke: dict[str, Any] = Field(default_factory=dict)



EvalConfig = ExperimentConfig
# Root schemas by ``kind:`` (training and sweep experiments register theirs here): one loader for all of them.
SCHEMAS: dict[str, type[StrictModel]] = {"eval": ExperimentConfig}
# Schemas in their own modules, imported when first named (they import this module).
LAZY_SCHEMAS: dict[str, str] = {"train": "perceive_ray.training_config:TrainExperimentConfig",
                                 "sweep": "perceive_ray.sweep_config:SweepConfig"}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) in ``top`` replaces ``base``."""
    merged = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_raw(path: str | Path) -> dict[str, Any]:
    """The file merged over its ``base:`` (a path relative to the file; one level only)."""
    path = Path(path)
    data = read_yaml(path)
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data
    if not isinstance(base_ref, str):
        raise ConfigError(f"{path}: base: must be a path string")
    base_path = (path.parent / base_ref).resolve()
    base = read_yaml(base_path)
    if "base" in base:
        raise ConfigError(f"{base_path}: base files cannot have a base: of their own (one level only)")
    return deep_merge(base, data)


Overrides = Iterable[str] | Mapping[str, Any]


def apply_overrides(data: Mapping[str, Any], overrides: Overrides, *, source: str = "override") -> dict[str, Any]:
    """Apply dotted overrides: ``a.b=c`` strings (values parsed as YAML scalars/flow values) or a mapping
    ``{"a.b": value}`` (values used as given: the Ray Tune / sweep path). List items by index (``x.0.y``)."""
    result = copy.deepcopy(dict(data))
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            key = str(key)
            if not key or any(not part for part in key.split(".")):
                raise ConfigError(f"{source}: {key!r} is not a dotted key")
            _set_path(result, key.split("."), copy.deepcopy(value), override=key, source=source)
        return result
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{source}: {override!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: {override!r}: value is not valid YAML: {exc}") from exc
        _set_path(result, key.split("."), value, override=override, source=source)
    return result


def _set_path(node: Any, parts: list[str], value: Any, *, override: str, source: str) -> None:
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: {override!r}: {where} is not an index of a {len(node)}-item list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if child is None:  # ``options: null`` in a file: an override below it starts a mapping
                    child = node[part] = {}
                node = child
        else:
            raise ConfigError(f"{source}: {override!r}: {'.'.join(parts[:depth])} is a value, not a mapping")


def validate(data: Mapping[str, Any], *, source: str, schema: type[StrictModel] | None = None) -> Any:
    """Validate into the root schema named by ``kind:`` (or ``schema``), then the cross-field checks that need the
    registry: scorer options against the scorer's own typed model (defaults filled), accepted model families,
    tie policies per benchmark. Relative paths stay relative to the working directory."""
    schema = schema or _schema_for(data, source)
    if schema is ExperimentConfig:  # (a training config resolves its own when the run is prepared)
        from perceive_ray.training import resolve_train_refs

        # ``train:<run id>`` names a finished training run's export (model.source, scorer weight options).
        data = resolve_train_refs(copy.deepcopy(dict(data)), data.get("output_dir") or "runs")
    try:
        config = schema.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    if isinstance(config, ExperimentConfig):
        config = check_experiment(config, source=source)
    return config


def _schema_for(data: Mapping[str, Any], source: str) -> type[StrictModel]:
    kind = data.get("kind", "eval")
    if kind in LAZY_SCHEMAS and kind not in SCHEMAS:
        SCHEMAS[kind] = registry.load_target(LAZY_SCHEMAS[kind])
    if kind not in SCHEMAS:
        raise ConfigError(f"{source}: kind: {kind!r} is not one of {', '.join([*SCHEMAS, *LAZY_SCHEMAS])}")
    return SCHEMAS[kind]


def check_experiment(config: ExperimentConfig, *, source: str) -> ExperimentConfig:
    """Registry checks of an evaluation config; returns it with ``scorer.options`` filled with the defaults."""
    errors: list[str] = []
    entry = registry.scorer(config.scorer.name)
    if config.model.family not in entry.families:
        errors.append(f"  model.family: scorer {config.scorer.name!r} accepts model families "
                      f"{', '.join(repr(f) for f in entry.families)}, not {config.model.family!r}")
    options_model = registry.resolve_options(config.scorer.name)
    filled: dict[str, Any] | None = None
    try:
        filled = options_model.model_validate(dict(config.scorer.options)).model_dump(mode="json")
    except ValidationError as exc:
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                known = ", ".join(sorted(options_model.model_fields))
                message = f"unknown option of scorer {config.scorer.name!r} (known: {known})"
            elif error["type"] == "missing":
                message = f"required option of scorer {config.scorer.name!r} is missing"
            else:
                message = error["msg"]
            errors.append(f"  scorer.options.{key}: {message}")
    for index, bench in enumerate(config.benchmarks):
        policies = registry.benchmark(bench.name).tie_policies
        if config.metrics.tie_policy not in policies:
            errors.append(f"  metrics.tie_policy: {config.metrics.tie_policy!r} does not apply to benchmarks.{index} "
                          f"({bench.name}); it accepts {', '.join(policies)}")
    if errors:
        raise ConfigError("\n".join([f"{source}: {len(errors)} configuration error(s)", *errors]))
    scorer = config.scorer.model_copy(update={"options": filled})
    return config.model_copy(update={"scorer": scorer})


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} configuration error(s)"]
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: Overrides = (), *, schema: type[StrictModel] | None = None,
                smoke: bool = False) -> Any:
    """Load an experiment file: merge its ``base:``, apply its ``smoke:`` block (if asked), then the overrides
    (``a.b=c`` strings or a ``{"a.b": value}`` mapping), and validate against ``schema`` (default: by ``kind:``).

    The one loader for every experiment kind (eval today; training and sweep configs reuse it)."""
    data = load_raw(path)
    if smoke:
        block = data.get("smoke") or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: smoke: must be a mapping of dotted overrides")
        data = apply_overrides(data, block, source=f"{path}: smoke")
    data = apply_overrides(data, overrides)
    return validate(data, source=str(path), schema=schema)


def validate_file(path: str | Path, overrides: Overrides = (), *, smoke: bool | None = None) -> Any:
    """Validate a file as written and, if it has a smoke block, in smoke mode too (``smoke=None``); or only the
    mode asked for. Both modes are checked so that a smoke block cannot mask an error of the real experiment."""
    if smoke:
        return load_config(path, overrides, smoke=True)
    config = load_config(path, overrides)
    if smoke is None and getattr(config, "smoke", None):
        load_config(path, overrides, smoke=True)
    return config


def config_record(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain data for records, params and config.yaml, credentials in URIs redacted."""
    data = config.model_dump(mode="json", by_alias=True)
    tracking = data.get("tracking")
    if isinstance(tracking, dict) and tracking.get("uri"):
        tracking["uri"] = redact_uri(tracking["uri"])
    return data


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (recorded with every run; credentials in URIs redacted)."""
    return yaml.safe_dump(config_record(config), sort_keys=False)
