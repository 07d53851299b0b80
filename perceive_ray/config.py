"""The one configuration schema: frozen pydantic models, YAML with one `base:` level, dotted overrides.

Every view of a run (CLI, experiment YAML, Ray Train/Tune configs, MLflow params) is a view of ``ExperimentConfig``.
Errors are ``ConfigError``s that name the file and the dotted key path; the CLI turns them into exit code 2.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from perceive_ray import registry
from perceive_ray.metrics.base import LABEL_ERRATA, TIE_POLICIES

TiePolicy = Literal["strict", "argmax_first", "mmvp_reference"]
LabelErrata = Literal["original", "corrected"]
assert set(TiePolicy.__args__) == set(TIE_POLICIES) and set(LabelErrata.__args__) == set(LABEL_ERRATA)


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

    @model_validator(mode="after")
    def _remote_code_opt_in(self) -> ModelConfig:
        if self.trust_remote_code and self.family not in registry.REMOTE_CODE_FAMILIES:
            allowed = ", ".join(sorted(registry.REMOTE_CODE_FAMILIES))
            raise ValueError(f"trust_remote_code is refused for family {self.family!r}; only registry entries "
                             f"that opt in may run hub code ({allowed})")
        return self


class ScorerConfig(StrictModel):
    name: str
    batch_size: int = Field(default=8, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class ResourcesConfig(StrictModel):
    num_actors: int = Field(default=1, gt=0)
    num_cpus_per_actor: float = Field(default=0.5, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    # Ray Data's object-store budget for an evaluation: bounds how far image decoding runs ahead of the scorer
    # (benchmarks/RESULTS.md §3: without it decoded images pile up to Ray's default budget). null = Ray's default.
    object_store_mb: int | None = Field(default=512, gt=0)


class TrackingConfig(StrictModel):
    uri: str | None = None
    experiment: str = "perceive_ray"


class ExperimentConfig(StrictModel):
    """A full experiment. ``smoke`` holds dotted overrides that turn it into a tiny-model CPU run."""

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
    smoke: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _mmvp_policy(self) -> ExperimentConfig:
        if self.metrics.tie_policy == "mmvp_reference":
            others = [b.name for b in self.benchmarks if b.name not in ("mmvp", "mmvp_vlm")]
            if others:
                raise ValueError(f"tie_policy 'mmvp_reference' applies to MMVP only, not to {', '.join(others)}")
        return self


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


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], *, source: str = "override") -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML scalars/flow values; list items by index (``x.0.y``)."""
    result = copy.deepcopy(dict(data))
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
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{source}: {override!r}: {'.'.join(parts[:depth])} is a value, not a mapping")


def validate(data: Mapping[str, Any], *, source: str) -> ExperimentConfig:
    """Validate into ExperimentConfig; relative paths stay relative to the working directory."""
    try:
        return ExperimentConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} configuration error(s)"]
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"]
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: Iterable[str] = (), *, smoke: bool = False) -> ExperimentConfig:
    """Load an experiment file, merge its base, apply the smoke block (if asked) and then CLI overrides."""
    data = load_raw(path)
    if smoke:
        block = data.get("smoke") or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: smoke: must be a mapping of dotted overrides")
        data = _apply_values(data, block, source=f"{path}: smoke")
    data = apply_overrides(data, overrides)
    return validate(data, source=str(path))


def _apply_values(data: dict[str, Any], block: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    result = copy.deepcopy(data)
    for key, value in block.items():
        _set_path(result, str(key).split("."), copy.deepcopy(value), override=str(key), source=source)
    return result


def validate_file(path: str | Path) -> ExperimentConfig:
    """Validate a file as written and, if it has a smoke block, in smoke mode too."""
    config = load_config(path)
    if config.smoke:
        load_config(path, smoke=True)
    return config


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (recorded with every run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
