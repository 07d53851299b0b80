"""Seeded synthetic benchmark: rendered scenes in the real layout of every registered benchmark, plus LLaVA-1.5.

``generate(out_dir, seed=S, pairs=N)`` writes, under ``out_dir``::

    whatsup/controlled_images_dataset.json, controlled_images/*.jpeg    Controlled A (on/under/left/right)
    whatsup/controlled_clevr_dataset.json, controlled_clevr/*.jpeg      Controlled B (in-front/behind/...)
    whatsup/coco_qa_{one,two}_obj.json, val2017/{id:012d}.jpg           COCO-QA one/two-object
    whatsup/vg_qa_{one,two}_obj.json, vg_images/{id}.jpg                VG-QA one/two-object
    MMVP/Questions.csv, Questions-clip.csv, "MMVP Images"/{q}.jpg       MMVP (statements + questions)
    MMVP_VLM/Questions.csv, "MLLM_VLM Images"/<Type>/<Question ID>.jpg  MMVP-VLM, 9 categories
    t2v/winoground/, eqben_vllm/, NaturalBench-Retrieval/,              t2v_metrics datasets/ folder: Winoground,
        cococounterfactuals.jsonl + COCOCounterfactuals/,               EqBen_Mini, NaturalBench-Retrieval,
        sugar_crepe/ + val2017/, SeeTRUE.csv + images/                  COCO-CF, SugarCrepe, SeeTRUE
    llava/synthetic_558k.json, synthetic_mix665k.json, images/          LLaVA-1.5 record schema (training)
    SYNTH.json                                                          seed, pairs, counts, version, digest

``ROOTS`` maps every registry benchmark name (and ``llava``) to its folder relative to ``out_dir``. Every text's
truth follows from the drawn geometry (``scenes.derive_relation``, ``scenes_extra.derive_position``).
The same seed gives a byte-identical tree (for one Pillow/libjpeg/zlib build); different seeds give different ones.
``ensure_generated`` writes the tree only where no current one exists (``perceive-ray eval --smoke``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceive_ray.data.synthetic.scenes import VLM_TYPES, max_pairs
from perceive_ray.data.synthetic.writers import (
    Plan,
    TreeWriter,
    clear_generated,
    plan_mmvp_vlm,
    read_generator_summary,
    write_llava,
    write_plan,
    write_whatsup,
)
from perceive_ray.data.synthetic.writers_qa import plan_mmvp, plan_whatsup_qa
from perceive_ray.data.synthetic.writers_t2v import plan_t2v

GENERATOR_VERSION = 3  # bump whenever the bytes a given seed produces change
SUMMARY_FILE = "SYNTH.json"
GENERATOR_NAME = "perceive_ray.data.synthetic"
# Data roots (relative to out_dir) keyed by what reads them: registry benchmark names, plus the LLaVA split.
ROOTS = {
    "whatsup_controlled_a": "whatsup",
    "whatsup_controlled_b": "whatsup",
    "whatsup_coco_one": "whatsup",
    "whatsup_coco_two": "whatsup",
    "whatsup_vg_one": "whatsup",
    "whatsup_vg_two": "whatsup",
    "mmvp": "MMVP",
    "mmvp_vlm": "MMVP_VLM",
    "winoground": "t2v",
    "eqben_mini": "t2v",
    "naturalbench": "t2v",
    "coco_cf": "t2v",
    "sugarcrepe": "t2v",
    "seetrue": "t2v",
    "llava": "llava",
}
MAX_PAIRS = min(max_pairs("A"), max_pairs("B"))  # distinct object pairs available to the smaller subset
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SynthSummary:
    """What ``generate`` wrote: the data roots (relative to ``out_dir``) and the item counts."""

    out_dir: Path
    seed: int
    pairs: int
    version: int
    roots: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    tree_sha256: str = ""
    reused: bool = False  # ensure_generated found this tree on disk (seed/pairs are the tree's, not the request's)

    def root(self, name: str) -> Path:
        return self.out_dir / self.roots[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "seed": self.seed,
            "pairs": self.pairs,
            "version": self.version,
            "roots": dict(self.roots),
            "counts": dict(self.counts),
            "tree_sha256": self.tree_sha256,
            "reused": self.reused,
        }


def mmvp_vlm_pairs_per_type(pairs: int) -> int:
    """MMVP-VLM pairs per category for a given What'sUp ``pairs`` (the real data has 15 per category)."""
    return max(1, pairs // 4)


def _check_args(out_dir: Path, seed: Any, pairs: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or not 1 <= pairs <= MAX_PAIRS:
        raise ValueError(
            f"pairs must be an integer in [1, {MAX_PAIRS}] (object pairs per What'sUp subset), got {pairs!r}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")


def _clear_previous(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix trees; with ``overwrite`` remove only what a previous ``generate`` wrote here."""
    clear_generated(out_dir, sorted(set(ROOTS.values())), SUMMARY_FILE, overwrite=overwrite,
                    owner="this generator", check_summary=read_summary, hint=" (--overwrite)")


def plans(seed: int, pairs: int) -> list[tuple[str, Plan]]:
    """(root, plan) of every planned family: what ``generate`` writes besides Controlled A/B and LLaVA.

    Pure: rebuilding the plans gives the spec behind every such image (tests render them again and compare).
    """
    return [
        (ROOTS["whatsup_coco_one"], plan_whatsup_qa(seed, pairs)),
        (ROOTS["mmvp"], plan_mmvp(seed, pairs)),
        (ROOTS["mmvp_vlm"], plan_mmvp_vlm(seed, mmvp_vlm_pairs_per_type(pairs))),
        (ROOTS["winoground"], plan_t2v(seed, pairs)),
    ]


def image_specs(seed: int, pairs: int) -> dict[str, Any]:
    """``{path relative to out_dir: spec}`` for every image of the planned families (see ``plans``)."""
    return {f"{root}/{rel}": spec for root, plan in plans(seed, pairs) for rel, spec in plan.images.items()}


def generate(out_dir: str | Path, *, seed: int, pairs: int = 8, overwrite: bool = False) -> SynthSummary:
    """Write the synthetic benchmark under ``out_dir`` (see the module docstring) and return what was written.

    ``pairs`` = object pairs per What'sUp Controlled subset (4 images each); it also scales the rest:
    MMVP-VLM ``max(1, pairs // 4)`` pairs per category; COCO/VG-QA ``max(3, pairs)`` images per subset (~1.3-1.5
    items each); MMVP ``max(2, pairs)`` pairs; Winoground, EqBen, NaturalBench, COCO-CF ``max(4, pairs)`` 2x2
    items each; SugarCrepe ``max(2, pairs // 2)`` entries per subset; SeeTRUE ``max(2, pairs // 2)`` images per
    source, 2 rows each; LLaVA 4 x pairs captions and image chats, max(1, pairs // 2) text-only chats.
    ``overwrite`` replaces a tree an earlier call wrote in ``out_dir``.
    """
    out = Path(out_dir)
    _check_args(out, seed, pairs)
    _clear_previous(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tree = TreeWriter(out)
    counts: dict[str, int] = {"whatsup_sets_per_subset": pairs}
    counts.update(write_whatsup(tree, ROOTS["whatsup_controlled_a"], seed=seed, pairs=pairs))
    for root, plan in plans(seed, pairs):
        counts.update(write_plan(tree, root, plan))
    counts["mmvp_vlm_types"] = len(VLM_TYPES)
    counts.update(write_llava(tree, ROOTS["llava"], seed=seed, pairs=pairs))
    counts["images"] = sum(rel.endswith((".jpg", ".jpeg", ".png")) for rel in tree.hashes)
    summary = SynthSummary(
        out_dir=out,
        seed=seed,
        pairs=pairs,
        version=GENERATOR_VERSION,
        roots=dict(ROOTS),
        counts=dict(sorted(counts.items())),
        tree_sha256=tree.tree_sha256(),
    )
    on_disk = {"generator": GENERATOR_NAME, **summary.to_dict()}
    del on_disk["out_dir"]  # no absolute paths on disk: the same seed must give the same bytes anywhere
    del on_disk["reused"]  # a property of one call, not of the tree
    tree.write_json(SUMMARY_FILE, on_disk)
    return summary


def read_summary(out_dir: str | Path) -> SynthSummary | None:
    """The summary a previous ``generate`` left in ``out_dir`` (``reused=True``), or None if there is none.

    ValueError if ``SYNTH.json`` exists but is not one this generator writes.
    """
    out = Path(out_dir)
    data = read_generator_summary(out / SUMMARY_FILE, GENERATOR_NAME,
                                  ("seed", "pairs", "version", "roots", "counts", "tree_sha256"))
    if data is None:
        return None
    version = data["version"]
    return SynthSummary(
        out_dir=out,
        seed=data["seed"],
        pairs=data["pairs"],
        version=version,
        roots=dict(data["roots"]),
        counts=dict(data["counts"]),
        tree_sha256=data["tree_sha256"],
        reused=True,
    )


def ensure_generated(out_dir: str | Path, *, seed: int = 0, pairs: int = 8) -> SynthSummary:
    """A current synthetic tree in ``out_dir``: reuse one that is there, else write one.

    - ``SYNTH.json`` of the current ``GENERATOR_VERSION`` and every root present: nothing is written; the
      returned summary has ``reused=True`` and the seed/pairs the tree was made with (maybe not the ones asked).
    - No ``SYNTH.json``: ``generate(out_dir, seed=seed, pairs=pairs)``; ValueError, nothing removed, where files
      not written by this generator occupy its roots.
    - ``SYNTH.json`` of an older version, or a current one whose roots were deleted: regenerated with
      ``overwrite=True`` (the tree was written by this generator).
    - ``SYNTH.json`` of a newer version: ValueError (written by a newer checkout; not replaced).
    """
    out = Path(out_dir)
    _check_args(out, seed, pairs)
    found = read_summary(out)
    if found is None:  # overwrite=True only to get the clearer error where foreign files hold our roots
        return generate(out, seed=seed, pairs=pairs, overwrite=True)
    if found.version > GENERATOR_VERSION:
        raise ValueError(
            f"{out / SUMMARY_FILE} was written by generator version {found.version}, newer than this one "
            f"({GENERATOR_VERSION}); not replacing it"
        )
    complete = all((out / root).is_dir() for root in ROOTS.values())
    if found.version == GENERATOR_VERSION and complete:
        return found
    return generate(out, seed=seed, pairs=pairs, overwrite=True)


__all__ = [
    "GENERATOR_VERSION",
    "MAX_PAIRS",
    "ROOTS",
    "SynthSummary",
    "ensure_generated",
    "generate",
    "image_specs",
    "mmvp_vlm_pairs_per_type",
    "plans",
    "read_summary",
]
