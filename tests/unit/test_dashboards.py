"""The Grafana dashboard parses and queries only metrics the evaluation actors actually export."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def exported_metrics() -> set[str]:
    """Names passed to ray.util.metrics.Counter/Histogram in the run layer."""
    source = (REPO / "perceive_ray" / "run" / "inference.py").read_text()
    return set(re.findall(r'metrics\.(?:Counter|Histogram|Gauge)\("([a-z_]+)"', source))


def test_dashboard_queries_exported_metrics():
    names = exported_metrics()
    assert names == {"perceive_rows_scored", "perceive_rows_failed", "perceive_batch_latency_s"}
    dashboard = json.loads((REPO / "dashboards" / "perceive_eval.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for expr in exprs for m in re.findall(r"ray_(perceive_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b", expr)}
    assert used and used <= names, used - names
    assert used == names  # every exported metric has a panel
