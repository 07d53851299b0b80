"""SugarCrepe metric (PROTOCOLS §2.5): a 1x2 item is correct iff S[0][positive] > S[0][negative].

Keys: ``acc`` over all items (7,512 for the full benchmark) and ``{subset}/acc`` for each of the seven
subsets; chance 0.5. ``strict`` makes a tie wrong; ``argmax_first`` (the numpy argmax of t2v_metrics'
SugarCrepe class) gives it to index 0, the positive caption. ``ties`` counts items whose two scores are
exactly equal.
"""

from __future__ import annotations

import numpy as np

from perceive_ray.data.manifest import Manifest
from perceive_ray.metrics.base import MetricError, MetricReport, Tally, check_policy, wins
from perceive_ray.metrics.scores import ScoreGrids

CHANCE = 0.5


def compute_sugarcrepe(
    manifest: Manifest, grids: ScoreGrids, *, tie_policy: str = "strict", label_errata: str = "original"
) -> MetricReport:
    """Overall and per-subset accuracy of picking the positive caption over its hard negative."""
    check_policy(tie_policy, label_errata, benchmark=manifest.benchmark)
    tally = Tally()
    for item in manifest.items:
        grid = np.asarray(grids[item.item_id])
        if grid.shape != (1, 2):
            raise MetricError(
                f"sugarcrepe item {item.item_id!r}: expected a 1x2 score grid, got shape {grid.shape}"
            )
        ok, tied = wins([float(grid[0, 0]), float(grid[0, 1])], 0, tie_policy)
        tally.add("acc", ok, CHANCE, unit=item.item_id)
        if item.subset:
            tally.add(f"{item.subset}/acc", ok, CHANCE, unit=item.item_id)
        tally.ties += tied
    return tally.report(manifest.benchmark, tie_policy, label_errata, items=len(manifest.items))
