"""Per-item score grids ``S[item][image][text]`` built from a scores table (``perceive_ray.data.scores``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from perceive_ray.data.manifest import Manifest
from perceive_ray.data.scores import (  # noqa: F401 (re-exported: metrics read scores through here)
    SCORE_COLUMNS,
    ScoresError,
    read_scores,
    scores_table,
    validate_scores,
)


@dataclass(frozen=True)
class ScoreGrids:
    """Per-item float64 score grids ``grid[image][text]`` for every item of a manifest.

    nan_items lists items with at least one NaN score (only benchmarks that allow NaN, SeeTRUE, accept them);
    extra_rows counts score rows whose item is not in the manifest (scores of a larger run are fine).
    """

    grids: dict[str, np.ndarray]
    nan_items: tuple[str, ...]
    extra_rows: int

    def __getitem__(self, item_id: str) -> np.ndarray:
        return self.grids[item_id]


def build_score_grids(manifest: Manifest, table: pa.Table, *, source: str = "<scores>") -> ScoreGrids:
    """Gather each item's full image x text grid; raise ScoresError naming what is missing or duplicated."""
    table = validate_scores(table, source=source)
    wanted = manifest.by_id()
    shapes = {iid: (len(item.images), len(item.texts)) for iid, item in wanted.items()}
    grids = {iid: np.full(shape, np.nan) for iid, shape in shapes.items()}
    filled = {iid: np.zeros(shape, dtype=bool) for iid, shape in shapes.items()}

    item_ids = table.column("item_id").to_pylist()
    images = table.column("image_index").to_numpy()
    texts = table.column("text_index").to_numpy()
    values = table.column("score").to_numpy()
    extra = 0
    for row, iid in enumerate(item_ids):
        grid = grids.get(iid)
        if grid is None:
            extra += 1
            continue
        i, t = int(images[row]), int(texts[row])
        n_img, n_txt = grid.shape
        if not (0 <= i < n_img and 0 <= t < n_txt):
            raise ScoresError(
                f"{source}: row {row}: item {iid!r} has no (image {i}, text {t}); its grid is {n_img}x{n_txt}"
            )
        if filled[iid][i, t]:
            raise ScoresError(f"{source}: row {row}: duplicate score for item {iid!r} (image {i}, text {t})")
        filled[iid][i, t] = True
        grid[i, t] = float(values[row])

    incomplete = [iid for iid, mask in filled.items() if not mask.all()]
    if incomplete:
        shown = ", ".join(repr(i) for i in incomplete[:5])
        more = f" and {len(incomplete) - 5} more" if len(incomplete) > 5 else ""
        raise ScoresError(
            f"{source}: scores do not cover benchmark {manifest.benchmark!r}: {len(incomplete)} of {len(wanted)} "
            f"item(s) lack scores, e.g. {shown}{more}"
        )
    nan_items = tuple(iid for iid, grid in grids.items() if np.isnan(grid).any())
    return ScoreGrids(grids=grids, nan_items=nan_items, extra_rows=extra)

