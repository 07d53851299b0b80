"""Config schema: base merge, dotted overrides, smoke mode, and errors that name the file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from perceive_ray.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_config,
    load_config,
    validate_file,
)

REPO = Path(__file__).resolve().parents[2]

BASE = """
seed: 3
metrics: {tie_policy: strict}
resources: {num_actors: 2}
"""

EXPERIMENT = """
base: _base.yaml
name: t
benchmarks:
  - {name: whatsup_controlled_a, root: data/whatsup}
model: {family: clip, source: ViT-L-14-336, pretrained: openai}
scorer: {name: clip_cosine, batch_size: 16}
smoke:
  benchmarks:
    - {name: whatsup_controlled_a, root: synth/whatsup, limit: 4}
  scorer.batch_size: 2
"""


def write(tmp_path: Path, text: str = EXPERIMENT, base: str = BASE, name: str = "exp.yaml") -> Path:
    (tmp_path / "_base.yaml").write_text(base)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_merge_and_overrides(tmp_path):
    path = write(tmp_path)
    config = load_config(path, ["scorer.batch_size=32", "benchmarks.0.limit=10", "metrics.label_errata=corrected"])
    assert config.seed == 3 and config.resources.num_actors == 2  # from the base
    assert config.scorer.batch_size == 32 and config.benchmarks[0].limit == 10
    assert config.metrics.label_errata == "corrected" and config.metrics.tie_policy == "strict"
    assert str(config.benchmarks[0].root) == "data/whatsup"
    with pytest.raises(ValidationError):  # frozen
        config.seed = 4  # type: ignore[misc]


def test_smoke_mode(tmp_path):
    config = load_config(write(tmp_path), smoke=True)
    assert config.scorer.batch_size == 2
    assert str(config.benchmarks[0].root) == "synth/whatsup" and config.benchmarks[0].limit == 4
    # CLI overrides still win over the smoke block.
    assert load_config(write(tmp_path), ["scorer.batch_size=5"], smoke=True).scorer.batch_size == 5


def test_dump_round_trips(tmp_path):
    config = load_config(write(tmp_path))
    again = tmp_path / "dumped.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scorer.batchsize=3"], r"scorer.batchsize: unknown key"),
        (["scorer.batch_size=lots"], r"scorer.batch_size: Input should be a valid integer"),
        (["scorer.batch_size=0"], r"scorer.batch_size: Input should be greater than 0"),
        (["benchmarks.0.name=whatsup_a"], r"benchmarks.0.name: unknown benchmark 'whatsup_a'"),
        (["metrics.tie_policy=loose"], r"metrics.tie_policy: Input should be 'strict', 'argmax_first' or 'mmvp_reference'"),
        (["metrics.tie_policy=mmvp_reference"],
         r"metrics.tie_policy: 'mmvp_reference' does not apply to benchmarks.0 \(whatsup_controlled_a\)"),
        (["benchmarks.3.name=mmvp"], r"benchmarks.3 is not an index of a 1-item list"),
        (["no_equals_sign"], r"'no_equals_sign' is not of the form dotted.key=value"),
        (["seed.x=1"], r"seed is a value, not a mapping"),
        (["model.trust_remote_code=true"], r"trust_remote_code is refused for family 'clip'"),
    ],
)
def test_errors_name_file_and_key(tmp_path, overrides, message):
    path = write(tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, overrides)
    if "override" not in str(info.value):
        assert str(path) in str(info.value)


def test_missing_keys_and_files(tmp_path):
    path = write(tmp_path, text="base: _base.yaml\nname: t\n")
    with pytest.raises(ConfigError, match=r"benchmarks: required key is missing") as info:
        load_config(path)
    assert "model: required key is missing" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    missing_base = write(tmp_path, text="base: gone.yaml\nname: t\n", name="b.yaml")
    with pytest.raises(ConfigError, match=r"gone.yaml: config file not found"):
        load_config(missing_base)


def test_base_is_one_level_and_yaml_errors(tmp_path):
    path = write(tmp_path, base="base: other.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"_base.yaml: base files cannot have a base"):
        load_config(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list.yaml: top level must be a mapping"):
        load_config(listy)


def test_smoke_block_is_validated_too(tmp_path):
    text = EXPERIMENT.replace("scorer.batch_size: 2", "scorer.batch_sise: 2")
    with pytest.raises(ConfigError, match=r"scorer.batch_sise: unknown key"):
        validate_file(write(tmp_path, text=text))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scorer.options.mdoe=t2v"], r"scorer.options.mdoe: unknown option of scorer 'clip_cosine' \(known: "),
        (["scorer.options.clip_transform=random"], r"scorer.options.clip_transform: Input should be 'val' or"),
        (["scorer.name=clip_cosinus"], r"scorer.name: unknown scorer 'clip_cosinus'; known: clip_cosine"),
        (["model.family=clipp"], r"model.family: unknown model family 'clipp'; known: clip"),
        (["model.family=llava"], r"model.family: scorer 'clip_cosine' accepts model families 'clip', not 'llava'"),
        (["scorer.name=pacl"], r"scorer.options.head_weights: required option of scorer 'pacl' is missing"),
        (["scorer.name=vqascore", "scorer.options={mode: t2v}"],
         r"model.family: scorer 'vqascore' accepts model families 'llava', not 'clip'"),
    ],
)
def test_scorer_options_and_families_are_checked_at_load(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path), overrides)
    assert str(tmp_path / "exp.yaml") in str(info.value)


def test_options_are_filled_with_defaults_so_explicit_defaults_compare_equal(tmp_path):
    plain = load_config(write(tmp_path))
    explicit = load_config(write(tmp_path), ["scorer.options.clip_transform=val", "scorer.options.seed=0"])
    assert plain.scorer.options == explicit.scorer.options == {"clip_transform": "val", "seed": 0}
    assert plain == explicit


def test_dict_overrides_are_the_same_mechanism(tmp_path):
    as_strings = load_config(write(tmp_path), ["scorer.batch_size=32", "scorer.options.clip_transform=train_compat"])
    as_dict = load_config(write(tmp_path), {"scorer.batch_size": 32, "scorer.options.clip_transform": "train_compat"})
    assert as_strings == as_dict
    with pytest.raises(ConfigError, match="scorer.options.mdoe: unknown option"):
        load_config(write(tmp_path), {"scorer.options.mdoe": "t2v"})
    with pytest.raises(ConfigError, match="'a..b' is not a dotted key"):
        apply_overrides({}, {"a..b": 1})


def test_kind_selects_the_root_schema(tmp_path):
    assert load_config(write(tmp_path, text=EXPERIMENT + "kind: eval\n")).kind == "eval"
    with pytest.raises(ConfigError, match=r"kind: 'tarin' is not one of eval"):
        load_config(write(tmp_path, text=EXPERIMENT + "kind: tarin\n"))
    assert load_config(write(tmp_path), schema=ExperimentConfig).name == "t"


def test_a_smoke_block_cannot_mask_an_error_of_the_real_experiment(tmp_path):
    text = EXPERIMENT.replace("scorer: {name: clip_cosine, batch_size: 16}",
                              "scorer: {name: clip_cosine, batch_size: lots, options: {mdoe: x}}")
    path = write(tmp_path, text=text)
    load_config(path, ["scorer.batch_size=2", "scorer.options={}"], smoke=True)  # fixed by overrides: fine
    with pytest.raises(ConfigError, match="scorer.batch_size: Input should be a valid integer"):
        validate_file(path)  # both modes are validated; the smoke block fixes batch_size but not the file
    with pytest.raises(ConfigError, match="scorer.options.mdoe: unknown option"):
        validate_file(path, smoke=True)


def test_override_values_are_yaml():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]", "a.c=true", "d.e=null", "f=x=y"])
    assert data == {"a": {"b": [1, 2], "c": True}, "d": {"e": None}, "f": "x=y"}


def experiment_files() -> list[Path]:
    return sorted(p for p in (REPO / "experiments").rglob("*.yaml") if "_base" not in p.parts)


def test_experiments_exist():
    assert len(experiment_files()) >= 2


@pytest.mark.parametrize("path", experiment_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_experiment_validates(path):
    config = validate_file(path)
    lines = path.read_text().splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert header[0].startswith("# Question:"), f"{path}: the header comment block must open with '# Question:'"
    for field in ("# Command:", "# Expected runtime", "# Published"):
        assert any(line.startswith(field) for line in header), f"{path}: header lacks {field!r}"
    assert config.smoke, f"{path}: every experiment needs a smoke block"
