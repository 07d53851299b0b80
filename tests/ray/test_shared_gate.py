"""The sweep's SharedRunGate on a real local Ray: trials started beside the shared runs wait until the driver opens
it, then all get the exports; a failed shared run reaches every waiting trial (and a later one) as its error."""

from __future__ import annotations

import pytest

from perceive_ray.run.sweep import SharedRunFailed, SharedRunGate, wait_for_shared


def test_waiting_trials_get_the_exports_once_the_gate_opens(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def trial(gate, trial_id):
        return wait_for_shared(gate, trial_id, "a label")

    gate = SharedRunGate.remote()
    waiting = [trial.remote(gate, f"t{i}") for i in range(2)]
    ready, _ = ray.wait(waiting, num_returns=2, timeout=3.0)
    assert ready == []  # nobody passes a closed gate
    ray.get(gate.open.remote({"pretrain": "/sweep/runs/train/pretrain/export"}, None))
    assert ray.get(waiting, timeout=60) == [{"pretrain": "/sweep/runs/train/pretrain/export"}] * 2
    assert ray.get(trial.remote(gate, "late"), timeout=60) == {"pretrain": "/sweep/runs/train/pretrain/export"}


def test_a_failed_shared_run_fails_every_trial_with_its_error(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def trial(gate):
        try:
            wait_for_shared(gate, "t", "a label")
        except SharedRunFailed as exc:
            return str(exc)
        return "passed the gate"

    gate = SharedRunGate.remote()
    waiting = trial.remote(gate)
    ray.get(gate.open.remote(None, "RuntimeError: training ended without a checkpoint"))
    for message in ray.get([waiting, trial.remote(gate)], timeout=60):
        assert "shared run failed" in message and "training ended without a checkpoint" in message


def test_wait_for_shared_raises_in_the_caller(ray_local):
    gate = SharedRunGate.remote()
    ray_local.get(gate.open.remote(None, "ValueError: boom"))
    with pytest.raises(SharedRunFailed, match="ValueError: boom"):
        wait_for_shared(gate, "t", "label")
