"""LM tokens, sequences and vision encodes of VQAScore on What'sUp: shared-prefix path vs naive per pair.

What it measures
    PROTOCOLS §4 token arithmetic, counted (not estimated) by the real ``VQAScoreScorer``: for each of the six
    What'sUp subsets at their REAL shapes (Controlled A 412 images x 4 options, B 408 x 4, COCO one 2,247 x 2,
    COCO two 440 x 2, VG one 1,160 x 2, VG two 291 x 2 = 4,958 images, 11,556 (image, text) sequences) it runs the
    scorer twice, ``sharing=shared`` and ``sharing=none``, and reads the scorer's own accounting: the ``lm_tokens``
    column (summed) and the running totals ``lm_tokens_total``, ``vision_encodes_total``, ``sequences_total``.

How
    1. Writes full-size What'sUp skeleton folders in the published layout (annotation JSON + JPEGs, the writers mirror
       ``tests/fixtures/whatsup_files.py``): synthetic content, real caption shapes ("A mug to the left of a plate",
       "A photo of a dog on the left", "A photo of a dog to the behind of a cat", ...), object words drawn with a
       seeded RNG. They are loaded through ``perceive_ray.data.catalog.load_benchmark`` with ``strict_sizes=True``.
    2. Writes a tiny random-init LLaVA with ``image_size=48, patch_size=2`` -> V = 576 visual positions, like
       LLaVA-1.5 at 336 px / patch 14, so the prefix/suffix proportions resemble the real model. The LM is tiny
       (hidden 32) but token COUNTS do not depend on its width. The scorer has no model-free counting path (the
       prefix charge and duplicate handling live in ``_score_one_image``), so the tiny model is run; it is fast.
    3. Scores every subset with ``perceive_ray.scoring.local.run_local`` (same scorer object as the Ray pipeline),
       once per sharing mode, and checks the counts three ways: column sum == running total == a model-free plan
       from the scorer's own tokeniser (``build_candidate`` + ``compute_prefix_length``). It also reports
       max |log s_shared - log s_naive| over all rows and modes (a free equivalence check, PROTOCOLS §4 test 1).

Caveat: the tiny BPE tokenizer (``build_tiny_tokenizer``) fuses punctuation with words ('left"?', 'ASSISTANT:'), so
its suffixes are shorter than LLaMA SentencePiece's (PROTOCOLS estimates ~23 tokens); the script therefore also
prints a derived "suffix sensitivity" line: the same ratios if every suffix were lengthened to a mean of 23 tokens.

Output: a per-subset table, totals, and as the LAST line ``ratio_overall=X ratio_controlled_4way=Y`` (naive/shared
LM tokens over all six subsets / over Controlled A+B). ``--quick`` scores only the first 5% of each subset's items
(the skeletons are still written full-size). Usage::

    .venv/bin/python benchmarks/prefix_tokens.py [--quick] [--json out.json] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# What'sUp skeletons in the published layout (shared with pipeline_throughput.py / pipeline_memory.py).

PHRASES = {"on": "on", "under": "under", "left": "to the left of", "right": "to the right of",
           "in-front": "in front of", "behind": "behind"}
CONTROLLED = {  # subset -> (annotation file, image folder, relation keys), as in the real dataset
    "controlled_a": ("controlled_images_dataset.json", "controlled_images", ("left", "right", "on", "under")),
    "controlled_b": ("controlled_clevr_dataset.json", "controlled_clevr", ("left", "right", "in-front", "behind")),
}
QA = {  # subset -> (annotation file, image path pattern)
    "coco_one": ("coco_qa_one_obj.json", "val2017/{:012d}.jpg"),
    "coco_two": ("coco_qa_two_obj.json", "val2017/{:012d}.jpg"),
    "vg_one": ("vg_qa_one_obj.json", "vg_images/{}.jpg"),
    "vg_two": ("vg_qa_two_obj.json", "vg_images/{}.jpg"),
}
SUBSETS = ("controlled_a", "controlled_b", "coco_one", "coco_two", "vg_one", "vg_two")
BENCHMARK = {s: f"whatsup_{s}" for s in SUBSETS}  # registry keys
# Single-token words of the tiny LLaVA vocabulary, so that captions tokenise word by word as with a real LLaMA
# vocabulary (real What'sUp objects such as "armchair" are 1-2 LLaMA tokens).
OBJECTS = ("mug", "plate", "bottle", "chair", "table", "dog", "cat", "butterfly", "elephant", "person", "picture",
           "circle", "square", "triangle", "diamond", "star", "cube", "sphere", "cylinder")
QA_SHAPES = {"lr": ("left", "right"), "tb": ("top", "bottom"), "ab": ("above", "below"), "fb": ("front", "behind")}


def published_sizes() -> dict[str, dict[str, Any]]:
    """Real sizes from the adapters' own spec constants: Controlled (pairs) and QA (items per group)."""
    from perceive_ray.data.benchmarks import whatsup as w

    return {"controlled_a": {"pairs": w.CONTROLLED_A.pairs}, "controlled_b": {"pairs": w.CONTROLLED_B.pairs},
            "coco_one": {"groups": dict(w.COCO_ONE.groups)}, "coco_two": {"groups": dict(w.COCO_TWO.groups)},
            "vg_one": {"groups": dict(w.VG_ONE.groups)}, "vg_two": {"groups": dict(w.VG_TWO.groups)}}


def make_jpeg_pool(size: tuple[int, int], *, seed: int, count: int = 16, quality: int = 90) -> list[bytes]:
    """``count`` distinct seeded JPEGs of ``size`` (W, H): smooth colour fields plus mild noise, so that decoding
    costs what a natural photo of that size costs (not a flat image that compresses to nothing)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    pool = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        pool.append(buffer.getvalue())
    return pool


def controlled_records(subset: str, pairs: list[tuple[str, str]], *, seed: int) -> list[dict]:
    """One record per (pair, relation): true caption first, the other three in a seeded order (as in the files)."""
    _, folder, relations = CONTROLLED[subset]
    rng = random.Random(f"{seed}:{subset}:order")
    records = []
    for obj1, obj2 in pairs:
        for relation in relations:
            others = [r for r in relations if r != relation]
            rng.shuffle(others)
            middle = "_of" if relation in ("left", "right", "in-front") else ""
            name = f"{obj1}_{relation}{middle}_{obj2}.jpeg"
            captions = [f"A {obj1.replace('-', ' ')} {PHRASES[r]} a {obj2.replace('-', ' ')}"
                        for r in [relation, *others]]
            records.append({"image_path": f"data/{folder}/{name}", "caption_options": captions})
    return records


def object_pairs(n: int, *, seed: int, tag: str) -> list[tuple[str, str]]:
    """``n`` distinct ordered object pairs (seeded); hyphenated colour names extend the pool when needed."""
    names = list(OBJECTS)
    colours = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
    if n > len(names) * (len(names) - 1):
        names += [f"{c}-{o}" for c in colours for o in OBJECTS]
    candidates = [(a, b) for a in names for b in names if a != b]
    random.Random(f"{seed}:{tag}:pairs").shuffle(candidates)
    if n > len(candidates):
        raise ValueError(f"at most {len(candidates)} object pairs, asked for {n}")
    return candidates[:n]


def qa_records(subset: str, groups: dict[str, int], *, seed: int) -> list[list]:
    """Rows [image_id, true, false] in the real caption shapes (PROTOCOLS §1.2); image ids recur as in the files."""
    two = subset.endswith("two")
    rng = random.Random(f"{seed}:{subset}:objects")
    rows, image_id = [], 1
    for group, count in groups.items():
        for k in range(count):
            gold, other = QA_SHAPES[group] if k % 2 == 0 else QA_SHAPES[group][::-1]
            x, y = rng.sample(OBJECTS, 2)
            if two and group == "ab":
                true, false = (f"A photo of a {x} {w} a {y}" for w in (gold, other))
            elif two:  # includes VG's "to the behind of" / "to the top of"
                true, false = (f"A photo of a {x} to the {w} of a {y}" for w in (gold, other))
            else:
                true, false = (f"A photo of a {x} on the {w}" for w in (gold, other))
            rows.append([image_id, true, false])
            image_id += 1 if k % 3 else 0  # every third item reuses the previous image id
    return rows


def write_whatsup(root: Path, *, seed: int = 0, subsets: tuple[str, ...] = SUBSETS, image_size=(8, 8),
                  sizes: dict[str, dict[str, Any]] | None = None, pool: int = 16) -> Path:
    """Write What'sUp skeleton folders under ``root`` (default: the published sizes of every subset).

    ``sizes`` overrides a subset's size: ``{"pairs": P}`` for Controlled, ``{"groups": {...}}`` for QA.
    """
    sizes = {**published_sizes(), **(sizes or {})}
    root.mkdir(parents=True, exist_ok=True)
    jpegs = make_jpeg_pool(tuple(image_size), seed=seed, count=pool)
    written = 0
    for subset in subsets:
        if subset in CONTROLLED:
            annotation, folder, _ = CONTROLLED[subset]
            records = controlled_records(subset, object_pairs(sizes[subset]["pairs"], seed=seed, tag=subset),
                                         seed=seed)
            (root / annotation).write_text(json.dumps(records, indent=1))
            (root / folder).mkdir(exist_ok=True)
            for record in records:
                (root / folder / record["image_path"].split("/")[-1]).write_bytes(jpegs[written % len(jpegs)])
                written += 1
        else:
            annotation, pattern = QA[subset]
            rows = qa_records(subset, sizes[subset]["groups"], seed=seed)
            (root / annotation).write_text(json.dumps(rows))
            for image_id in sorted({row[0] for row in rows}):
                path = root / pattern.format(image_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpegs[(image_id + written) % len(jpegs)])
            written += len(rows)
    return root


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Token accounting.

PROTOCOL_SEQUENCES, PROTOCOL_IMAGES = 11_556, 4_958  # PROTOCOLS §4 table totals
LLAMA_SUFFIX_ESTIMATE = 23  # PROTOCOLS §4: mean suffix tokens with the LLaMA tokenizer (estimate)


def plan_tokens(scorer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Model-free expectation from the scorer's own tokeniser: per row the token LCP L_i (capped) and the suffixes
    of its unique candidates; naive = sum_i sum_k |X_ik|, shared = sum_i L_i + sum_i sum_unique |suffix|."""
    from perceive_ray.scoring.vqascore import compute_prefix_length

    naive = shared = 0
    prefixes, suffixes = [], []
    for row in rows:
        seqs = [scorer.build_candidate(text).yes for text in row["texts"]]
        unique = list({s.ids: s for s in seqs}.values())
        prefix = compute_prefix_length(unique)
        naive += sum(len(s.ids) for s in seqs)
        shared += prefix + sum(len(s.ids) - prefix for s in unique)
        prefixes.append(prefix)
        suffixes.extend(len(s.ids) - prefix for s in seqs)
    return {"naive": naive, "shared": shared, "prefixes": prefixes, "suffixes": suffixes}


def count_subset(scorers: dict[str, Any], manifest, *, limit: int | None, batch_size: int) -> dict[str, Any]:
    """Run both sharing modes over one subset; return the scorer's counts, the plan and the score agreement."""
    from perceive_ray.data.images import scoring_rows
    from perceive_ray.scoring.local import run_local

    rows = scoring_rows(manifest, limit=limit)
    result: dict[str, Any] = {"images": len(rows), "options": sorted({len(r["texts"]) for r in rows})}
    tables = {}
    for sharing, scorer in scorers.items():
        before = (scorer.lm_tokens_total, scorer.vision_encodes_total, scorer.sequences_total)
        start = time.perf_counter()
        local = run_local(manifest, scorer, batch_size=batch_size, limit=limit)
        seconds = time.perf_counter() - start
        tokens, encodes, sequences = (now - then for now, then in zip(
            (scorer.lm_tokens_total, scorer.vision_encodes_total, scorer.sequences_total), before, strict=True))
        column = int(sum(local.scores.column("lm_tokens").to_pylist()))
        if column != tokens:
            raise AssertionError(f"{manifest.benchmark} {sharing}: lm_tokens column {column} != running total {tokens}")
        result[sharing] = {"lm_tokens": tokens, "vision_encodes": encodes, "sequences": sequences,
                           "seconds": round(seconds, 2)}
        tables[sharing] = local.scores
    plan = plan_tokens(scorers["shared"], rows)
    for sharing, key in (("shared", "shared"), ("none", "naive")):
        if plan[key] != result[sharing]["lm_tokens"]:
            raise AssertionError(f"{manifest.benchmark}: {sharing} path counted {result[sharing]['lm_tokens']} LM "
                                 f"tokens, the model-free plan says {plan[key]}")
    result["prefix_mean"] = float(np.mean(plan["prefixes"]))
    result["suffix_mean"] = float(np.mean(plan["suffixes"]))
    result["prefix_sum"] = int(sum(plan["prefixes"]))
    result["suffix_sum"] = int(sum(plan["suffixes"]))
    result["max_abs_dlog"] = max_log_gap(tables["shared"], tables["none"])
    return result


def max_log_gap(a, b) -> float:
    """max |log s_a - log s_b| over rows (matched by key) and the three modes."""
    key = ("item_id", "image_index", "text_index")
    ra = {tuple(r[k] for k in key): r for r in a.to_pylist()}
    gap = 0.0
    for r in b.to_pylist():
        other = ra[tuple(r[k] for k in key)]
        for mode in ("score_t2v", "score_p_yes", "score_yes_no"):
            x, y = other[mode], r[mode]
            if x > 0 and y > 0:
                gap = max(gap, abs(math.log(x) - math.log(y)))
    return gap


def summarise(results: dict[str, dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    part = [results[n] for n in names if n in results]
    total = {"images": sum(r["images"] for r in part)}
    for sharing in ("shared", "none"):
        total[sharing] = {k: sum(r[sharing][k] for r in part) for k in ("lm_tokens", "vision_encodes", "sequences")}
    total["ratio"] = total["none"]["lm_tokens"] / total["shared"]["lm_tokens"]
    total["encode_ratio"] = total["none"]["vision_encodes"] / total["shared"]["vision_encodes"]
    # Sensitivity: every suffix lengthened by delta so that the mean suffix is the LLaMA estimate (PROTOCOLS §4).
    sequences = total["none"]["sequences"]
    delta = LLAMA_SUFFIX_ESTIMATE - sum(r["suffix_sum"] for r in part) / sequences
    total["ratio_llama_suffix"] = ((total["none"]["lm_tokens"] + delta * sequences)
                                   / (total["shared"]["lm_tokens"] + delta * sequences))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="score the first 5%% of each subset's items")
    parser.add_argument("--fraction", type=float, default=None, help="fraction of each subset's items to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="scoring rows per scorer call")
    parser.add_argument("--template", default="chat", choices=("chat", "phi3_instruct", "llama3"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None, help="where skeletons and the tiny model go "
                        "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args(argv)
    fraction = args.fraction if args.fraction is not None else (0.05 if args.quick else 1.0)
    if not 0 < fraction <= 1:
        parser.error("--fraction must be in (0, 1]")

    import torch

    from perceive_ray.config import ModelConfig, ScorerConfig
    from perceive_ray.data.catalog import load_benchmark
    from perceive_ray.models.llava import save_tiny_llava
    from perceive_ray.scoring.vqascore import VQAScoreScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prefix_tokens_") as tmp:
        work = args.workdir or Path(tmp)
        data = write_whatsup(work / "whatsup", seed=args.seed)
        model_dir = save_tiny_llava(work / "tiny_llava_v576", template=args.template, seed=args.seed,
                                    image_size=48, patch_size=2)
        model = ModelConfig(family="llava", source=str(model_dir), dtype="float32")
        scorers = {sharing: VQAScoreScorer(model, ScorerConfig(name="vqascore", batch_size=args.batch_size,
                                                               options={"sharing": sharing, "device": "cpu"}))
                   for sharing in ("shared", "none")}
        visual = scorers["shared"].bundle.num_visual_tokens
        results = {}
        for subset in SUBSETS:
            manifest = load_benchmark(BENCHMARK[subset], data, strict_sizes=True)
            limit = None if fraction == 1 else max(1, math.ceil(len(manifest.items) * fraction))
            results[subset] = count_subset(scorers, manifest, limit=limit, batch_size=args.batch_size)
            r = results[subset]
            print(f"  {subset}: {r['images']} images scored ({r['shared']['seconds']} s shared, "
                  f"{r['none']['seconds']} s naive)", file=sys.stderr)
    overall = summarise(results, SUBSETS)
    controlled = summarise(results, ("controlled_a", "controlled_b"))
    elapsed = time.perf_counter() - started

    header = (f"{'subset':<13}{'images':>7}{'K':>3}{'sequences':>10}{'enc shared':>11}{'enc naive':>10}"
              f"{'LM shared':>11}{'LM naive':>11}{'ratio':>7}{'L mean':>8}{'sfx mean':>9}{'max|dlog|':>11}")
    print(f"VQAScore LM-token accounting, tiny LLaVA ({args.template}, V={visual}), fraction={fraction:g}, "
          f"seed={args.seed}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s")
    print(header)
    for subset in SUBSETS:
        r = results[subset]
        print(f"{subset:<13}{r['images']:>7}{'/'.join(map(str, r['options'])):>3}{r['none']['sequences']:>10}"
              f"{r['shared']['vision_encodes']:>11}{r['none']['vision_encodes']:>10}{r['shared']['lm_tokens']:>11,}"
              f"{r['none']['lm_tokens']:>11,}{r['none']['lm_tokens'] / r['shared']['lm_tokens']:>7.2f}"
              f"{r['prefix_mean']:>8.1f}{r['suffix_mean']:>9.1f}{r['max_abs_dlog']:>11.1e}")
    for name, t in (("controlled", controlled), ("overall", overall)):
        print(f"{name:<13}{t['images']:>7}{'':>3}{t['none']['sequences']:>10}{t['shared']['vision_encodes']:>11}"
              f"{t['none']['vision_encodes']:>10}{t['shared']['lm_tokens']:>11,}{t['none']['lm_tokens']:>11,}"
              f"{t['ratio']:>7.2f}")
    print(f"vision encodes naive/shared: {overall['encode_ratio']:.2f} (PROTOCOLS §4: 2.33)")
    if fraction == 1:
        ok = (overall["none"]["sequences"], overall["images"]) == (PROTOCOL_SEQUENCES, PROTOCOL_IMAGES)
        print(f"sequences {overall['none']['sequences']:,} / images {overall['images']:,}: "
              f"{'match' if ok else 'DO NOT MATCH'} PROTOCOLS §4 ({PROTOCOL_SEQUENCES:,} / {PROTOCOL_IMAGES:,})")
    print(f"suffix sensitivity (derived, not counted): with every suffix lengthened to a mean of "
          f"{LLAMA_SUFFIX_ESTIMATE} tokens (LLaMA estimate) the ratios would be overall "
          f"{overall['ratio_llama_suffix']:.2f}, controlled 4-way {controlled['ratio_llama_suffix']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"fraction": fraction, "seed": args.seed, "template": args.template,
                                         "visual_tokens": visual, "seconds": elapsed, "subsets": results,
                                         "controlled": controlled, "overall": overall}, indent=2))
    print(f"ratio_overall={overall['ratio']:.3f} ratio_controlled_4way={controlled['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
