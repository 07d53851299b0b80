"""MMVP and MMVP-VLM text->image pair metrics: three tie policies, the MMVP errata switch (PROTOCOLS §2.3).

Each item is one pair with a 2x2 grid ``S[image][text]``. For text t the two candidates are the column
``S[:, t]``; ground truth is image t (swapped to image 1-t for the MMVP errata pairs under ``corrected``).

- ``strict``: t is correct iff its gold image scores strictly higher (ties are wrong).
- ``argmax_first``: numpy-argmax semantics, a tie picks image 0.
- ``mmvp_reference``: the reference's rule, float32 arithmetic included. It casts ``logit_scale * S[:, t]`` to
  float32, takes torch's float32 softmax over the two images on the CPU and picks image 0 iff P(image 0) > 0.5,
  else image 1. ``logit_scale`` is the scorer's factor (100 for cosines, 1 for VQAScore probabilities; the
  registry's ``ScorerEntry.mmvp_logit_scale``). A gap below float32 resolution therefore becomes a tie, and a tie
  picks image 1 (against t0, in favour of t1).

A pair is correct iff both texts are. Keys: ``pair_acc`` (chance 0.25), ``individual_acc`` (chance 0.5) and,
for MMVP-VLM, ``{category}/pair_acc`` and ``{category}/individual_acc``. Ties are counted once per text: exact
ties under ``strict`` / ``argmax_first``; under ``mmvp_reference`` the texts whose float32 decision differs from
the exact comparison ``S[0][t] > S[1][t]`` or whose P(image 0) is exactly 0.5 (exact ties included).
"""

from __future__ import annotations

import math
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
    logit_scale: float = 1.0,
) -> MetricReport:
    """Pair and individual accuracy of text->image matching over MMVP (150 pairs) or MMVP-VLM (135 pairs).

    ``logit_scale`` multiplies the scores before the float32 softmax of ``tie_policy="mmvp_reference"``; the
    other policies ignore it.
    """
    benchmark = manifest.benchmark
    if benchmark not in BENCHMARKS:
        raise MetricError(f"compute_mmvp serves {', '.join(BENCHMARKS)}, not {benchmark!r}")
    check_policy(tie_policy, label_errata, benchmark=benchmark, allow_mmvp=True)
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise MetricError(f"logit_scale must be a finite positive number, got {logit_scale!r}")
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
            ok, tied = _text_correct(grid[:, t], gold[t], tie_policy, logit_scale)
            tally.ties += int(tied)
            correct.append(ok)
        keys = [""]
        if benchmark == "mmvp_vlm" and item.group:
            keys.append(f"{item.group}/")
        for prefix in keys:
            tally.add(f"{prefix}pair_acc", all(correct), PAIR_CHANCE, unit=item.item_id)
            for t, ok in enumerate(correct):
                tally.add(f"{prefix}individual_acc", ok, INDIVIDUAL_CHANCE, unit=f"{item.item_id}/text{t}")

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


def reference_image0_probability(column: np.ndarray, logit_scale: float = 1.0) -> float:
    """P(image 0) as the reference computes it: torch's float32 CPU softmax of float32(logit_scale * scores)."""
    import torch  # only this policy needs it; the other metrics stay numpy-only

    logits = torch.from_numpy(np.asarray(logit_scale * np.asarray(column, dtype=np.float64), dtype=np.float32))
    return float(torch.softmax(logits, dim=-1)[0])


def _text_correct(column: np.ndarray, gold: int, tie_policy: str, logit_scale: float = 1.0) -> tuple[bool, bool]:
    """Whether a text with scores ``column`` over (image 0, image 1) picks image ``gold``; and if it tied."""
    if tie_policy == "mmvp_reference":
        p0 = reference_image0_probability(column, logit_scale)
        predicted = 0 if p0 > 0.5 else 1
        exact = 0 if column[0] > column[1] else 1
        return predicted == gold, bool(predicted != exact or p0 == 0.5)
    ok, tied = wins([float(column[0]), float(column[1])], gold, tie_policy)
    return bool(ok), bool(tied)
