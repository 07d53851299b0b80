"""A local Ray started by perceive_ray (``init_ray`` without an address) gives its workers Ray's own settings for one
machine (LOCAL_RAY_ENV: no PreemptionWatcher, a 0.5 s controller poll) unless the user set them (then theirs are
kept), and marks itself as having no dashboard, so training runs go without Ray Train's PlacementGroupCleaner (it
needs the state API). Each case starts a real local Ray in a subprocess (its own instance, whatever else runs in
this session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from perceive_ray.run.inference import (
    HEALTH_CHECK_ENV,
    LOCAL_NO_DASHBOARD_ENV,
    LOCAL_RAY_ENV,
    PREEMPTION_WATCHER_ENV,
)

NAMES = [PREEMPTION_WATCHER_ENV, HEALTH_CHECK_ENV, LOCAL_NO_DASHBOARD_ENV]
SCRIPT = f"""
import json, os, ray
from perceive_ray.run.inference import init_ray, shutdown_ray

assert init_ray(None)
try:
    seen = ray.get(ray.remote(lambda: {{n: os.environ.get(n, "unset") for n in {NAMES!r}}}).remote())
finally:
    shutdown_ray()
print("worker sees", json.dumps(seen))
"""


@pytest.mark.parametrize("preset", [{}, {PREEMPTION_WATCHER_ENV: "1", HEALTH_CHECK_ENV: "3"}])
def test_local_ray_workers_get_the_one_machine_settings_unless_the_user_set_them(preset):
    env = {k: v for k, v in os.environ.items() if k not in (*NAMES, "RAY_ADDRESS")}
    env["RAY_DISABLE_USAGE_STATS"] = "1"
    env.update(preset)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.split("worker sees ", 1)[1])
    assert seen == {**LOCAL_RAY_ENV, **preset, LOCAL_NO_DASHBOARD_ENV: "1"}
    assert LOCAL_RAY_ENV == {PREEMPTION_WATCHER_ENV: "0", HEALTH_CHECK_ENV: "0.5"}


def test_trainer_drops_the_placement_group_cleaner_locally_and_the_datasets_callback_without_datasets(monkeypatch):
    import ray.data
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from perceive_ray.run.training import trainer_class

    def callbacks(**datasets) -> list[str]:
        trainer = trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1), datasets=datasets or None)
        assert isinstance(trainer, TorchTrainer)
        return [type(cb).__name__ for cb in trainer._create_default_callbacks()]

    monkeypatch.delenv(LOCAL_NO_DASHBOARD_ENV, raising=False)
    with_data = callbacks(rank0=lambda: ray.data.range(4))
    assert {"PlacementGroupCleanerCallback", "DatasetsCallback"} <= set(with_data)
    no_data = callbacks()
    assert "PlacementGroupCleanerCallback" in no_data and "DatasetsCallback" not in no_data
    monkeypatch.setenv(LOCAL_NO_DASHBOARD_ENV, "1")
    kept = callbacks(rank0=lambda: ray.data.range(4))
    assert "PlacementGroupCleanerCallback" not in kept
    assert {"BackendSetupCallback", "DatasetsCallback", "UserCallbackHandler"} <= set(kept)
    assert set(callbacks()) == set(kept) - {"DatasetsCallback"}
