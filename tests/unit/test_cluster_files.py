"""Every file in cluster/ parses and is consistent with the project: known runtime-env keys, a launcher config
whose head type exists, a RayJob whose entrypoint is a valid `perceive-ray eval` of an existing experiment, a sweep
RayJob whose entrypoint is a valid `perceive-ray sweep` of an existing sweep file with shared storage on every group,
and a sweep launcher script that bash accepts."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from perceive_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda", "env_vars",
                    "container", "image_uri", "config", "nsight", "mpi"}


def test_cluster_folder_is_covered():
    assert sorted(p.name for p in CLUSTER.iterdir()) == ["kuberay-rayjob-sweep.yaml", "kuberay-rayjob.yaml",
                                                         "launch_sweep.sh", "ray-cluster.yaml", "runtime_env.yaml"]


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


# -- sweeps -----------------------------------------------------------------------------------------------------

SHARED = "/mnt/shared"


def sweep_parser() -> argparse.ArgumentParser:
    """`perceive-ray sweep FILE [--smoke] [--resume] [--storage DIR] [--address ADDR]` (no other arguments)."""
    parser = argparse.ArgumentParser(prog="perceive-ray sweep", add_help=False, allow_abbrev=False)
    parser.add_argument("sweep_file")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--storage")
    parser.add_argument("--address")
    return parser


def check_sweep_entrypoint(entrypoint: str) -> argparse.Namespace:
    """A `perceive-ray sweep` (or `python -m perceive_ray sweep`) command line of a sweep file in the repository."""
    words = shlex.split(entrypoint)
    if words[:3] == ["python", "-m", "perceive_ray"]:
        words = ["perceive-ray", *words[3:]]
    assert words[:2] == ["perceive-ray", "sweep"], entrypoint
    try:
        args, extra = sweep_parser().parse_known_args(words[2:])
    except SystemExit as exc:  # argparse's own error (a flag without its value)
        raise AssertionError(f"not a valid sweep command line: {entrypoint}") from exc
    assert not extra, f"unknown arguments {extra}: {entrypoint}"
    path = Path(args.sweep_file)
    assert not path.is_absolute() and path.parent == Path("experiments/sweeps") and path.suffix == ".yaml", path
    assert (REPO / path).is_file(), f"{path} does not exist (experiments/sweeps/ holds the sweep files)"
    return args


@pytest.mark.parametrize("command", [
    "perceive-ray sweep experiments/sweeps/token_usage.yaml --storage",  # flag without value
    "perceive-ray sweep experiments/sweeps/token_usage.yaml --bogus",
    "perceive-ray sweep experiments/sweeps/token_usage.yaml scorer.batch_size=2",
    "perceive-ray sweep experiments/eval/clip_whatsup.yaml",
    "perceive-ray sweep experiments/sweeps/no_such_sweep.yaml",
    "perceive-ray eval experiments/sweeps/token_usage.yaml",
])
def test_sweep_entrypoint_check_refuses(command):
    with pytest.raises(AssertionError):
        check_sweep_entrypoint(command)


def group_templates(cluster_spec: dict) -> dict[str, dict]:
    groups = {"head": cluster_spec["headGroupSpec"]}
    groups |= {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}
    return groups


def test_kuberay_sweep_rayjob():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob-sweep.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and int(spec["ttlSecondsAfterFinished"]) > 0
    assert set(yaml.safe_load(spec["runtimeEnvYAML"])) <= RUNTIME_ENV_KEYS
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster.get("authOptions", {}).get("mode") == "token"  # Ray 2.60 token auth, token made by KubeRay
    args = check_sweep_entrypoint(spec["entrypoint"])
    assert args.sweep_file == "experiments/sweeps/token_usage.yaml" and not args.smoke
    assert args.storage and Path(args.storage).is_relative_to(SHARED)  # Tune's state on the shared volume
    groups = group_templates(cluster)
    assert len(groups) >= 2 and "rayStartParams" in groups["head"]
    gpus = 0
    for name, group in groups.items():
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            assert "2.60.0-py311-gpu" in container["image"], (name, container["image"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get(SHARED) in claims, f"{name}: the shared PVC is not mounted at {SHARED}"
            env = {e["name"]: e for e in container.get("env", [])}
            uri = env["MLFLOW_TRACKING_URI"]["value"]
            parts = urlsplit(uri)
            assert parts.scheme in ("http", "https") and parts.hostname, uri
            assert parts.username is None and parts.password is None and "@" not in uri, "credentials in the URI"
            for key, var in env.items():  # anything secret comes from a Secret, never a literal
                if any(word in key for word in ("PASSWORD", "TOKEN", "SECRET", "KEY")):
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], key
            gpus += int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) * int(group.get("replicas", 1))
    assert len({c for g in groups.values() for v in g["template"]["spec"]["volumes"]
                if (c := v.get("persistentVolumeClaim", {}).get("claimName"))}) == 1  # the same PVC everywhere
    assert gpus > 0 and not groups["head"]["template"]["spec"]["containers"][0]["resources"]["limits"].get(
        "nvidia.com/gpu")  # trials run on the GPU workers


def test_launch_sweep_script():
    script = CLUSTER / "launch_sweep.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the launcher"
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "cluster/runtime_env.yaml" in text and "ray job submit" in text and "--resume" in text
    assert "report --sweep" in text and "RAY_AUTH_MODE" in text
    # refuses to run without the addresses, with a message naming the variable (no cluster is contacted)
    for missing in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "RAY_ADDRESS": "http://h:8265"}
        del env[missing]
        result = subprocess.run([bash, str(script), "submit", "cluster/runtime_env.yaml"], capture_output=True,
                                text=True, env=env, check=False)
        assert result.returncode == 2 and f"{missing} is not set" in result.stderr, result.stderr


def test_readme_sweep_command_validates():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Run a sweep on a cluster"):]
    block = section[section.index("ray job submit"):]
    command = block[: block.index("```")].replace("\\\n", " ")
    entry = command.split(" -- ", 1)[1].split("\n", 1)[0]
    args = check_sweep_entrypoint(entry)
    assert args.storage and not args.resume
    assert "--resume" in section and "perceive-ray report --sweep" in section
