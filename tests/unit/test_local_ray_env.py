"""A local Ray started by perceive_ray (``init_ray`` without an address) runs without Ray Train's PreemptionWatcher:
its workers see RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0, unless the user set the variable (then theirs is kept).
Each case starts a real local Ray in a subprocess (its own instance, whatever else runs in this session)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from perceive_ray.run.inference import PREEMPTION_WATCHER_ENV

SCRIPT = f"""
import os, ray
from perceive_ray.run.inference import init_ray, shutdown_ray

assert init_ray(None)
try:
    seen = ray.get(ray.remote(lambda: os.environ.get({PREEMPTION_WATCHER_ENV!r}, "unset")).remote())
finally:
    shutdown_ray()
print("worker sees", seen)
"""


@pytest.mark.parametrize(("preset", "expected"), [(None, "0"), ("1", "1")])
def test_local_ray_workers_run_without_the_preemption_watcher(preset, expected):
    env = {k: v for k, v in os.environ.items() if k not in (PREEMPTION_WATCHER_ENV, "RAY_ADDRESS")}
    env["RAY_DISABLE_USAGE_STATS"] = "1"
    if preset is not None:
        env[PREEMPTION_WATCHER_ENV] = preset
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"worker sees {expected}" in done.stdout
