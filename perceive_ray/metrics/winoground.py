"""Winoground-family metrics (PROTOCOLS §2.4): text, image, group scores and individual accuracy on 2x2 items.

One function serves Winoground, EqBen_Mini, NaturalBench-Retrieval and COCO-Counterfactuals. Grids are
``S[image][text]``, so s(c, i) = ``grid[i, c]`` (the reference's c1_i0 is ``grid[0, 1]``):

- text  = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)   (each image picks its caption)
- image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0)   (each caption picks its image)
- group = text and image
- individual = ½[s(c0,i0) > s(c1,i0)] + ½[s(c1,i1) > s(c0,i1)], tallied as two halves per item (total = 2 x
  items).

``strict`` makes ties wrong; ``argmax_first`` gives a tie to the lower index of the two compared options
(index 0 is correct for the image-0 / caption-0 comparisons, so those ties count as right and the index-1 ones
as wrong).

Keys: ``text_score``, ``image_score``, ``group_score``, ``individual_acc``, each also under breakdown
prefixes: ``{subset}/`` where items carry a subset (EqBen), and for Winoground ``num_main_preds_{1,2}/`` plus
``tag/<slug>/`` for the collapsed_tag and for every why-hard tag (an item without why-hard tags counts as "No
Tag"), slug = lowercase with spaces as ``_``. ``ties`` counts items with at least one exact tie among their
four comparisons.
"""

from __future__ import annotations

import numpy as np

from perceive_ray.data.manifest import Item, Manifest
from perceive_ray.metrics.base import MetricError, MetricReport, Tally, check_policy, wins
from perceive_ray.metrics.scores import ScoreGrids

# Chance for uniformly random, tie-free scores: group needs both diagonal scores above both off-diagonal ones,
# 2!·2!/4! = 1/6 (PROTOCOLS §2.6).
CHANCE = {"text_score": 0.25, "image_score": 0.25, "group_score": 1 / 6, "individual_acc": 0.5}
NO_TAG = "No Tag"


def slugify(name: str) -> str:
    """Tag name -> key component: lowercase, spaces become underscores ("No Tag" -> "no_tag")."""
    return name.lower().replace(" ", "_")


def compute_pair_outcome(grid: np.ndarray, tie_policy: str) -> dict[str, bool | int]:
    """The four comparisons of one 2x2 grid ``[image][text]`` and the scores built from them.

    Returns text0/text1 (image k picks caption k), image0/image1 (caption k picks image k), text, image, group
    and ``ties``, the number of the four comparisons that were exact ties.
    """
    if grid.shape != (2, 2):
        raise MetricError(f"expected a 2x2 score grid [image][text], got shape {grid.shape}")
    s = [[float(v) for v in row] for row in grid]
    text0, tie_t0 = wins([s[0][0], s[0][1]], 0, tie_policy)  # image 0: caption 0 vs caption 1
    text1, tie_t1 = wins([s[1][0], s[1][1]], 1, tie_policy)  # image 1: caption 1 must beat caption 0
    image0, tie_i0 = wins([s[0][0], s[1][0]], 0, tie_policy)  # caption 0: image 0 vs image 1
    image1, tie_i1 = wins([s[0][1], s[1][1]], 1, tie_policy)  # caption 1: image 1 must beat image 0
    return {
        "text0": text0,
        "text1": text1,
        "image0": image0,
        "image1": image1,
        "text": text0 and text1,
        "image": image0 and image1,
        "group": text0 and text1 and image0 and image1,
        "ties": int(tie_t0) + int(tie_t1) + int(tie_i0) + int(tie_i1),
    }


def _winoground_prefixes(item: Item) -> list[str]:
    preds = item.meta.get("num_main_preds")
    collapsed = item.meta.get("collapsed_tag")
    if preds not in (1, 2) or not isinstance(collapsed, str) or not collapsed:
        raise MetricError(
            f"winoground item {item.item_id!r} lacks meta num_main_preds (1/2) or collapsed_tag; "
            "was the manifest built by load_winoground?"
        )
    prefixes = [f"num_main_preds_{preds}/", f"tag/{slugify(collapsed)}/"]
    prefixes += [f"tag/{slugify(tag)}/" for tag in dict.fromkeys(item.tags or (NO_TAG,))]
    return prefixes


def _check_tag_slugs(manifest: Manifest) -> None:
    """Collapsed and why-hard tags share the ``tag/`` namespace: refuse two different tags with one slug."""
    owners: dict[str, set[tuple[str, str]]] = {}
    for item in manifest.items:
        named = [("collapsed_tag", str(item.meta.get("collapsed_tag", "")))]
        named += [("why-hard tag", tag) for tag in item.tags or (NO_TAG,)]
        for kind, tag in named:
            owners.setdefault(slugify(tag), set()).add((kind, tag))
    clashes = {slug: sorted(found) for slug, found in owners.items() if len(found) > 1}
    if clashes:
        raise MetricError(f"winoground: different tags map to one key tag/<slug>: {clashes}")


def compute_winoground_family(
    manifest: Manifest, grids: ScoreGrids, *, tie_policy: str = "strict", label_errata: str = "original"
) -> MetricReport:
    """Text, image and group scores and individual accuracy, overall and per breakdown (module docstring)."""
    check_policy(tie_policy, label_errata, benchmark=manifest.benchmark)
    is_winoground = manifest.benchmark == "winoground"
    if is_winoground:
        _check_tag_slugs(manifest)
    tally = Tally()
    tied_comparisons = 0
    for item in manifest.items:
        try:
            outcome = compute_pair_outcome(np.asarray(grids[item.item_id]), tie_policy)
        except MetricError as exc:
            raise MetricError(f"{manifest.benchmark} item {item.item_id!r}: {exc}") from exc
        prefixes = [""]
        if item.subset:
            prefixes.append(f"{item.subset}/")
        if is_winoground:
            prefixes += _winoground_prefixes(item)
        for prefix in prefixes:
            unit = item.item_id
            tally.add(f"{prefix}text_score", outcome["text"], CHANCE["text_score"], unit=unit)
            tally.add(f"{prefix}image_score", outcome["image"], CHANCE["image_score"], unit=unit)
            tally.add(f"{prefix}group_score", outcome["group"], CHANCE["group_score"], unit=unit)
            # Two halves per item keep the counts integral: individual = correct halves / (2 x items).
            tally.add(f"{prefix}individual_acc", outcome["text0"], CHANCE["individual_acc"], unit=f"{unit}/text0")
            tally.add(f"{prefix}individual_acc", outcome["text1"], CHANCE["individual_acc"], unit=f"{unit}/text1")
        tally.ties += outcome["ties"] > 0
        tied_comparisons += outcome["ties"]
    return tally.report(
        manifest.benchmark,
        tie_policy,
        label_errata,
        items=len(manifest.items),
        tied_comparisons=tied_comparisons,
    )
