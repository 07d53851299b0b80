"""MMVP and MMVP-VLM text->image pair metrics: three tie policies, the MMVP errata switch (PROTOCOLS §2.3).

Each item is one pair with a 2x2 grid ``S[image][text]``. For text t the two candidates are the column
``S[:, t]``; ground truth is image t (swapped to image 1-t for the MMVP errata pairs under ``corrected``).

- ``strict``: t is correct iff its gold image scores strictly higher (ties are wrong).
- ``argmax_first``: numpy-argmax semantics, a tie picks image 0.
- ``mmvp_reference``: the reference picks image 0 iff softmax P(image 0) > 0.5, i.e. ``S[0][t] > S[1][t]``; a
  tie picks image 1 (against t0, in favour of t1).

A pair is correct iff both texts are. Keys: ``pair_acc`` (chance 0.25), ``individual_acc`` (chance 0.5) and,
for MMVP-VLM, ``{category}/pair_acc`` and ``{category}/individual_acc``. Exact ties are counted once per text.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from perceive_ray.data.manifest import Item, Manifest
from perceive_ray.metrics.base import MetricError, MetricReport, Tally, check_policy, wins
from perceive_ray.metrics.scores import ScoreGrids

BENCHMARKS = ("mmvp", "mmvp_vlm")
PAIR_CHANCE = 0.25
INDIVIDUAL_CHANCE = 0.5

# MMVP label errata (PROTOCOLS §1.6): pair 50 (Question IDs 99/100, elephant tusks) and pair 140 (279/280,
# standing/sitting). Matched by the question ids kept in item meta so that a subset file still finds them;
# items without ids in meta fall back to the pair number (item_id).
ERRATA_QUESTION_IDS = ((99, 100), (279, 280))
ERRATA_ITEM_IDS = ("50", "140")


def compute_mmvp(
    manifest: Manifest,
    grids: ScoreGrids | Mapping[str, np.ndarray],
    *,
    tie_policy: str = "strict",
    label_errata: str = "original",
) -> MetricReport:
    """Pair and individual accuracy of text->image matching over MMVP (150 pairs) or MMVP-VLM (135 pairs)."""
    benchmark = manifest.benchmark
    if benchmark not in BENCHMARKS:
        raise MetricError(f"compute_mmvp serves {', '.join(BENCHMARKS)}, not {benchmark!r}")
    check_policy(tie_policy, label_errata, benchmark=benchmark, allow_mmvp=True)
    apply_errata = label_errata == "corrected" and benchmark == "mmvp"

    tally = Tally()
    tally.declare("pair_acc", PAIR_CHANCE)
    tally.declare("individual_acc", INDIVIDUAL_CHANCE)
    swapped: list[str] = []
    for item in manifest.items:
        grid = _grid(grids, item)
        swap = apply_errata and _is_erratum(item)
        if swap:
            swapped.append(item.item_id)
        # gold[t] = the image index that text t describes.
        gold = (1, 0) if swap else (0, 1)
        correct = []
        for t in (0, 1):
            ok, tied = _text_correct(grid[:, t], gold[t], tie_policy)
            tally.ties += int(tied)
            correct.append(ok)
        keys = [""]
        if benchmark == "mmvp_vlm" and item.group:
            keys.append(f"{item.group}/")
        for prefix in keys:
            tally.add(f"{prefix}pair_acc", all(correct), PAIR_CHANCE)
            for ok in correct:
                tally.add(f"{prefix}individual_acc", ok, INDIVIDUAL_CHANCE)

    report = tally.report(benchmark, tie_policy, label_errata, errata_pairs=len(swapped))
    if label_errata == "corrected":
        if benchmark == "mmvp_vlm":
            report.notes.append(
                "label_errata='corrected' changes nothing for MMVP-VLM: it has no known errata"
            )
        elif swapped:
            report.notes.append(
                "label_errata='corrected': ground truth swapped (t0<->i1, t1<->i0) for pair(s) "
                + ", ".join(swapped)
            )
        else:
            report.notes.append(
                "label_errata='corrected': no errata pair (Question IDs 99/100, 279/280) in this manifest"
            )
    return report


def _grid(grids: ScoreGrids | Mapping[str, np.ndarray], item: Item) -> np.ndarray:
    try:
        raw = grids[item.item_id]
    except KeyError:
        raise MetricError(f"no scores for item {item.item_id!r}") from None
    grid = np.asarray(raw, dtype=np.float64)  # (2 images, 2 texts)
    if grid.shape != (2, 2):
        raise MetricError(f"item {item.item_id!r}: score grid has shape {grid.shape}, MMVP pairs need (2, 2)")
    if np.isnan(grid).any():
        raise MetricError(f"item {item.item_id!r}: NaN score(s); MMVP metrics do not accept NaN")
    return grid


def _is_erratum(item: Item) -> bool:
    ids = item.meta.get("question_ids")
    if ids is None:
        return item.item_id in ERRATA_ITEM_IDS
    return tuple(int(i) for i in ids) in ERRATA_QUESTION_IDS


def _text_correct(column: np.ndarray, gold: int, tie_policy: str) -> tuple[bool, bool]:
    """Whether a text with scores ``column`` over (image 0, image 1) picks image ``gold``; and if it tied."""
    if tie_policy == "mmvp_reference":
        predicted = 0 if column[0] > column[1] else 1
        return predicted == gold, bool(column[0] == column[1])
    ok, tied = wins([float(column[0]), float(column[1])], gold, tie_policy)
    return bool(ok), bool(tied)
