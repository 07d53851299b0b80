"""Seeded synthetic spatial benchmark: rendered scenes in the real What'sUp, MMVP-VLM and LLaVA-1.5 layouts.

``generate(out_dir, seed=S, pairs=N)`` writes, under ``out_dir``::

    whatsup/controlled_images_dataset.json, controlled_images/*.jpeg    Controlled A (on/under/left/right)
    whatsup/controlled_clevr_dataset.json, controlled_clevr/*.jpeg      Controlled B (in-front/behind/...)
    MMVP_VLM/Questions.csv, "MLLM_VLM Images"/<Type>/<Question ID>.jpg  MMVP-VLM, 9 categories
    llava/synthetic_558k.json, synthetic_mix665k.json, images/          LLaVA-1.5 record schema (training)
    SYNTH.json                                                          seed, pairs, counts, version, digest

The same seed gives a byte-identical tree (for one Pillow/libjpeg build); different seeds give different ones.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceive_ray.data.synthetic.scenes import VLM_TYPES, max_pairs
from perceive_ray.data.synthetic.writers import TreeWriter, write_llava, write_mmvp_vlm, write_whatsup

GENERATOR_VERSION = 1  # bump whenever the bytes a given seed produces change
SUMMARY_FILE = "SYNTH.json"
# Data roots (relative to out_dir) keyed by what reads them: registry benchmark names, plus the LLaVA split.
ROOTS = {
    "whatsup_controlled_a": "whatsup",
    "whatsup_controlled_b": "whatsup",
    "mmvp_vlm": "MMVP_VLM",
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
    ours = sorted({*ROOTS.values(), SUMMARY_FILE})
    present = [name for name in ours if (out_dir / name).exists()]
    if not present:
        return
    if not overwrite:
        raise ValueError(f"{out_dir} already holds {', '.join(present)}; pass overwrite=True (--overwrite) to replace them")
    if not (out_dir / SUMMARY_FILE).is_file():
        raise ValueError(
            f"{out_dir} holds {', '.join(present)} but no {SUMMARY_FILE}: "
            "not written by this generator, not removing it"
        )
    for name in present:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def generate(out_dir: str | Path, *, seed: int, pairs: int = 8, overwrite: bool = False) -> SynthSummary:
    """Write the synthetic benchmark under ``out_dir`` (see the module docstring) and return what was written.

    ``pairs`` = object pairs per What'sUp subset (4 images each); it also scales MMVP-VLM
    (``max(1, pairs // 4)`` pairs per category) and the LLaVA split (4 x pairs captions and image chats,
    max(1, pairs // 2) text-only chats). ``overwrite`` replaces a tree an earlier call wrote in ``out_dir``.
    """
    out = Path(out_dir)
    _check_args(out, seed, pairs)
    _clear_previous(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tree = TreeWriter(out)
    counts: dict[str, int] = {"whatsup_sets_per_subset": pairs}
    counts.update(write_whatsup(tree, ROOTS["whatsup_controlled_a"], seed=seed, pairs=pairs))
    counts.update(
        write_mmvp_vlm(tree, ROOTS["mmvp_vlm"], seed=seed, pairs_per_type=mmvp_vlm_pairs_per_type(pairs))
    )
    counts["mmvp_vlm_types"] = len(VLM_TYPES)
    counts.update(write_llava(tree, ROOTS["llava"], seed=seed, pairs=pairs))
    counts["images"] = sum(rel.endswith((".jpg", ".jpeg")) for rel in tree.hashes)
    summary = SynthSummary(
        out_dir=out,
        seed=seed,
        pairs=pairs,
        version=GENERATOR_VERSION,
        roots=dict(ROOTS),
        counts=counts,
        tree_sha256=tree.tree_sha256(),
    )
    on_disk = {"generator": "perceive_ray.data.synthetic", **summary.to_dict()}
    del on_disk["out_dir"]  # no absolute paths on disk: the same seed must give the same bytes anywhere
    tree.write_json(SUMMARY_FILE, on_disk)
    return summary


__all__ = ["GENERATOR_VERSION", "MAX_PAIRS", "ROOTS", "SynthSummary", "generate", "mmvp_vlm_pairs_per_type"]
