"""What'sUp metrics (PROTOCOLS §2.1-2.2): Controlled 2-way/4-way individual, group, pair and set accuracy; COCO/VG QA.

Controlled items are scored 1x4 (one image, its four caption options); the 2-way result of an image is read from the
same row by keeping [true, opposite] (``Item.two_way``), so there is never a separate 2-way run.
"""

from __future__ import annotations

from collections import defaultdict

from perceive_ray.data.manifest import Item, Manifest
from perceive_ray.metrics.base import MetricReport, Tally, check_policy, wins
from perceive_ray.metrics.scores import ScoreGrids

# Controlled A images whose relation labels appear swapped (whatsup_vlms issue #4); `corrected` swaps them.
CONTROLLED_ERRATA = {"controlled_a": frozenset({"pillow_left_of_chair", "pillow_right_of_chair"})}

# The relation groups of one object pair's set (2 images each): Controlled A = left/right + on/under, B = left/right +
# front/behind (PROTOCOLS §1.1).
SET_GROUPS = {"controlled_a": ("lr", "ou"), "controlled_b": ("fb", "lr")}

# Chance levels for uniformly random, tie-free scores (PROTOCOLS §2.6): (individual, pair, set) per protocol.
CHANCE = {"2way": (0.5, 0.25, 0.0625), "4way": (0.25, 0.0625, 0.25**4)}


def _correct_index(item: Item, label_errata: str) -> int:
    """Index of the true caption; an erratum image takes its 2-way opposite's relation."""
    if label_errata == "corrected" and item.item_id in CONTROLLED_ERRATA.get(item.subset, ()):
        return item.two_way[1]
    return 0


def compute_whatsup_controlled(
    manifest: Manifest, grids: ScoreGrids, *, tie_policy: str = "strict", label_errata: str = "original",
    two_way_grids: ScoreGrids | None = None,
) -> MetricReport:
    """2-way and 4-way accuracy: individual, per relation group, per group pair, pooled pair, set.

    ``two_way_grids``: scores of the 2-way protocol when a scorer asks a different question per protocol (VLM2Vec);
    by default both protocols read the same 1x4 row."""
    check_policy(tie_policy, label_errata, benchmark=manifest.benchmark)
    tally = Tally()
    ties = {"2way": 0, "4way": 0}
    errata_items = 0
    # outcome[protocol][pair_key][group] -> list of per-image correctness
    outcome: dict[str, dict[str, dict[str, list[bool]]]] = {
        p: defaultdict(lambda: defaultdict(list)) for p in CHANCE
    }
    for item in manifest.items:
        scores = [float(s) for s in grids[item.item_id][0]]
        two_way_scores = scores if two_way_grids is None else [float(s) for s in two_way_grids[item.item_id][0]]
        correct = _correct_index(item, label_errata)
        errata_items += correct != 0
        true_idx, opp_idx = item.two_way
        options = [two_way_scores[true_idx], two_way_scores[opp_idx]]
        results = {
            "2way": wins(options, 0 if correct == true_idx else 1, tie_policy),
            "4way": wins(scores, correct, tie_policy),
        }
        any_tie = False
        for protocol, (ok, tied) in results.items():
            individual = CHANCE[protocol][0]
            tally.add(f"{protocol}/individual_acc", ok, individual, unit=item.item_id)
            tally.add(f"{protocol}/{item.group}/individual_acc", ok, individual, unit=item.item_id)
            outcome[protocol][item.pair_key][item.group].append(ok)
            ties[protocol] += tied
            any_tie |= tied
        tally.ties += any_tie

    # Grouped metrics count complete groups only: a pair needs both images of its relation group, a set all four
    # images of its object pair. A group with a missing image (unreadable, or cut by a limit) is left out of the
    # numerator AND the denominator, and counted as excluded.
    groups = SET_GROUPS.get(manifest.items[0].subset, ()) if manifest.items else ()
    for protocol, by_key in outcome.items():
        _, pair_chance, set_chance = CHANCE[protocol]
        for pair_key, by_group in by_key.items():
            complete_set = sorted(by_group) == sorted(groups) and all(len(oks) == 2 for oks in by_group.values())
            for group in sorted(set(by_group) | set(groups)):
                oks = by_group.get(group, [])
                if len(oks) == 2:
                    tally.add(f"{protocol}/{group}/pair_acc", all(oks), pair_chance, unit=f"{pair_key}/{group}")
                    tally.add(f"{protocol}/pair_acc", all(oks), pair_chance, unit=f"{pair_key}/{group}")
                else:
                    tally.exclude(f"{protocol}/{group}/pair_acc", pair_chance)
                    tally.exclude(f"{protocol}/pair_acc", pair_chance)
            if complete_set:
                tally.add(f"{protocol}/set_acc", all(all(oks) for oks in by_group.values()), set_chance,
                          unit=str(pair_key))
            else:
                tally.exclude(f"{protocol}/set_acc", set_chance)
    return tally.report(
        manifest.benchmark, tie_policy, label_errata,
        items=len(manifest.items), errata_items=errata_items, **{f"{p}/ties": n for p, n in ties.items()},
    )


def compute_whatsup_qa(
    manifest: Manifest, grids: ScoreGrids, *, tie_policy: str = "strict", label_errata: str = "original"
) -> MetricReport:
    """COCO-QA / VG-QA: correct iff S[true] > S[false]; individual and per preposition group (no pairs or sets)."""
    check_policy(tie_policy, label_errata, benchmark=manifest.benchmark)
    tally = Tally()
    for item in manifest.items:
        ok, tied = wins([float(s) for s in grids[item.item_id][0]], 0, tie_policy)
        tally.add("individual_acc", ok, 0.5, unit=item.item_id)
        tally.add(f"{item.group}/individual_acc", ok, 0.5, unit=item.item_id)
        tally.ties += tied
    return tally.report(manifest.benchmark, tie_policy, label_errata, items=len(manifest.items))
