"""Every file in cluster/ parses and is consistent with the project: known runtime-env keys, a launcher config
whose head type exists, a RayJob whose entrypoint is a valid `perceive-ray eval` of an existing experiment."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from perceive_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda", "env_vars",
                    "container", "image_uri", "config", "nsight", "mpi"}


def test_cluster_folder_is_covered():
    assert sorted(p.name for p in CLUSTER.iterdir()) == ["kuberay-rayjob.yaml", "ray-cluster.yaml",
                                                         "runtime_env.yaml"]


def test_runtime_env():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= RUNTIME_ENV_KEYS
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())  # Ray requires string values


def test_cluster_launcher():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert config["head_node_type"] in config["available_node_types"]
    assert {"cluster_name", "provider", "max_workers"} <= set(config)
    assert "2.60.0" in config["docker"]["image"]


def check_entrypoint(entrypoint: str) -> None:
    """`perceive-ray eval EXP [--run-id X] overrides...` (or `python -m perceive_ray eval ...`) must validate."""
    words = shlex.split(entrypoint)
    if words[:3] == ["python", "-m", "perceive_ray"]:
        words = ["perceive-ray", *words[3:]]
    assert words[:2] == ["perceive-ray", "eval"], entrypoint
    experiment, rest = words[2], words[3:]
    overrides, skip = [], False
    for n, word in enumerate(rest):
        if skip:
            skip = False
        elif word in ("--run-id", "--address", "--on-error"):
            skip = True
        elif not word.startswith("--"):
            overrides.append(word)
        assert not word.startswith("--") or word in ("--run-id", "--address", "--on-error", "--smoke",
                                                     "--no-track"), f"unknown flag {word} (position {n})"
    load_config(REPO / experiment, overrides)


def test_kuberay_rayjob():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    assert set(yaml.safe_load(spec["runtimeEnvYAML"])) <= RUNTIME_ENV_KEYS
    check_entrypoint(spec["entrypoint"])


def test_readme_job_submit_command_validates():
    text = (REPO / "README.md").read_text()
    block = text[text.index("ray job submit --working-dir"):]
    command = block[: block.index("```")].replace("\\\n", " ")
    entry = command.split(" -- ", 1)[1]
    entry = entry.replace("<mlflow-host>", "mlflow").replace("/shared/whatsup", "/data/whatsup")
    check_entrypoint(entry)
    with pytest.raises(AssertionError):
        check_entrypoint("perceive-ray score experiments/eval/clip_whatsup.yaml")
