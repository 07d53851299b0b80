"""VLM2Vec scoring (PROTOCOLS §3.4): cosine of the last-token embeddings of an image query and a text target.

Query = image + ``<image> Represent the given image with the following question: {prompt}`` through the llava-hf
processor, no chat template, exactly one ``<image>`` (asserted on the string and on the V expanded positions).
Target = the candidate text alone, text-only forward. Both: final hidden layer at the last non-pad position (right
padding), L2-normalised in fp32; score = dot product. The reference computes the dot in bf16; here the pooled
states (bf16 on a bf16 model) are upcast first, as §0 asks for fp32 comparisons.

Prompts per image, by benchmark (the rendered prompt is stored in the ``query_prompt`` column):

- What'sUp Controlled, ``whatsup_prompt=per_view`` (default, as the reference: its ``eval`` asks the 2-way question,
  its ``eval_4`` the 4-way one): each image is queried twice. ``score`` holds the 4-way-question scores (the
  4way/* metrics), ``score_two_way`` the scores under the 2-way question of the image's relation group (left/right,
  on/under, front/behind; the 2way/* metrics); ``query_prompt`` / ``query_prompt_two_way`` store both questions.
  ``two_way`` / ``four_way`` ask one question for both views (``score`` only).
- COCO-QA / VG-QA: ``Is the {part1} or {part2}?`` built from the true caption (text 0); the gold word is replaced by
  its opposite in part2 or part1 by a coin keyed by (seed, benchmark, item index): ``keyed_rng`` replaces the
  reference's unseeded ``random.random() < 0.5`` (True = part2, as ``p < 0.5`` there).
- MMVP / MMVP-VLM: the pair's first-row question (``meta["questions"][0]``: ``Questions.csv`` for MMVP,
  ``Questions-llava.csv`` for MMVP-VLM), for both images, as the reference's ``questions[qid1 - 1]``.
- Anything else: ``generic_prompt`` (a [U] choice: the paper reports no VLM2Vec numbers for other benchmarks).

Images: the reference hands the decoded image straight to the processor (shortest-edge resize + centre crop), so
``image_preprocess=processor`` is the default. §5.6's aspect-distorting resize to the processor's square size is a
*training* fact, available as ``resize``; ``pad`` is VQAScore's pad-to-square.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from perceive_ray.config import ModelConfig, ScorerConfig
from perceive_ray.data.images import pad_to_square, to_pil
from perceive_ray.models.vlm2vec import Vlm2VecBundle, compute_embeddings, load_vlm2vec
from perceive_ray.randomness import keyed_rng
from perceive_ray.scoring.base import ScoreRows, check_family, device_name, iter_rows
from perceive_ray.scoring.options import Vlm2VecOptions, parse_options
from perceive_ray.scoring.prompts import IMAGE_PLACEHOLDER
from perceive_ray.scoring.prompts import VLM2VEC_FOUR_WAY_PROMPTS as FOUR_WAY_PROMPTS
from perceive_ray.scoring.prompts import VLM2VEC_PROMPTS_VERSION as PROMPTS_VERSION
from perceive_ray.scoring.prompts import VLM2VEC_QUERY_TEMPLATE as QUERY_TEMPLATE
from perceive_ray.scoring.prompts import VLM2VEC_TWO_WAY_PROMPTS as TWO_WAY_PROMPTS

CONTROLLED = ("whatsup_controlled_a", "whatsup_controlled_b")
COCO_VG = ("whatsup_coco_one", "whatsup_coco_two", "whatsup_vg_one", "whatsup_vg_two")
MMVP = ("mmvp", "mmvp_vlm")

# The reference's 2-way branch: left/right, else on/under, else front/behind.
GOLD_GROUP = {"left": "lr", "right": "lr", "on": "ou", "under": "ou", "front": "fb", "behind": "fb",
              "in-front": "fb"}

QA_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom",
               "bottom": "top", "front": "behind", "behind": "front"}
PHOTO_PREFIX = "A photo of a "
COIN_PURPOSE = "vlm2vec_coco_vg_prompt_coin"


class ImageTokenError(ValueError):
    """A VLM2Vec image query does not hold exactly one <image> (or it did not expand to V positions)."""


# ---------------------------------------------------------------------------------------------------------------
# Prompts (pure functions; snapshot-tested)


def render_query(prompt: str, template: str = QUERY_TEMPLATE) -> str:
    """The query string; exactly one ``<image>`` (a prompt that brings its own is an error, not a second image)."""
    if template.count("{}") != 1:
        raise ValueError(f"a VLM2Vec query template needs exactly one '{{}}' slot, got {template!r}")
    query = template.replace("{}", prompt)
    if query.count(IMAGE_PLACEHOLDER) != 1:
        raise ImageTokenError(f"a VLM2Vec image query must hold exactly one {IMAGE_PLACEHOLDER}, "
                              f"found {query.count(IMAGE_PLACEHOLDER)} in {query!r}")
    return query


def object_name(token: str) -> str:
    """Filename token -> prompt text: hyphens become spaces (``beer-bottle`` -> ``beer bottle``)."""
    return token.replace("-", " ")


def build_controlled_prompt(obj1: str, obj2: str, *, gold_word: str, benchmark: str,
                            whatsup_prompt: str = "two_way") -> str:
    """What'sUp Controlled prompt from the raw filename tokens (hyphens -> spaces here)."""
    names = {"obj1": object_name(obj1), "obj2": object_name(obj2)}
    if whatsup_prompt == "four_way":
        if benchmark not in FOUR_WAY_PROMPTS:
            raise ValueError(f"no 4-way What'sUp prompt for benchmark {benchmark!r}")
        return FOUR_WAY_PROMPTS[benchmark].format(**names)
    if whatsup_prompt != "two_way":
        raise ValueError(f"whatsup_prompt must be two_way or four_way, got {whatsup_prompt!r}")
    if gold_word not in GOLD_GROUP:
        raise ValueError(f"unknown What'sUp relation word {gold_word!r}")
    return TWO_WAY_PROMPTS[GOLD_GROUP[gold_word]].format(**names)


def find_qa_gold_word(caption: str) -> str:
    """The single caption word in QA_OPPOSITE (the reference takes the first of a set; we assert one)."""
    found = set(caption.split()) & set(QA_OPPOSITE)
    if len(found) != 1:
        raise ValueError(f"caption {caption!r} must hold exactly one of {sorted(QA_OPPOSITE)}; found {sorted(found)}")
    return found.pop()


def split_coco_vg_parts(caption: str, *, benchmark: str) -> tuple[str, str]:
    """(part1, part2) of a true caption, by the reference's per-file rules (§3.4).

    part1 drops the first ``len("A photo of a ")`` characters, as the reference slices (no prefix check).
    """
    part1 = caption[len(PHOTO_PREFIX):]
    if benchmark.endswith("_one"):
        marker = "on the "
    elif benchmark == "whatsup_coco_two":
        marker = "above " if "above" in caption else "below " if "below" in caption else "to the "
    elif benchmark == "whatsup_vg_two":
        marker = "to the "
    else:
        raise ValueError(f"{benchmark!r} is not a COCO-QA / VG-QA benchmark")
    if marker not in caption:
        raise ValueError(f"{benchmark}: true caption {caption!r} lacks {marker!r}, needed for the VLM2Vec prompt")
    return part1, caption[caption.index(marker):]


def draw_coco_vg_coin(seed: int, benchmark: str, item_index: int) -> bool:
    """True: replace the gold word in part2 (the reference's ``random.random() < 0.5``), else in part1."""
    return bool(keyed_rng(seed, COIN_PURPOSE, benchmark, int(item_index)).random() < 0.5)


def build_coco_vg_prompt(caption: str, *, benchmark: str, flip_part2: bool, gold_word: str | None = None) -> str:
    """``Is the {part1} or {part2}?`` with every occurrence of the gold word replaced by its opposite in one part."""
    gold = gold_word or find_qa_gold_word(caption)
    part1, part2 = split_coco_vg_parts(caption, benchmark=benchmark)
    if flip_part2:
        part2 = part2.replace(gold, QA_OPPOSITE[gold])
    else:
        part1 = part1.replace(gold, QA_OPPOSITE[gold])
    return f"Is the {part1} or {part2}?"


def build_query_prompt(row: Mapping[str, Any], options: Vlm2VecOptions, *, view: str = "four_way") -> str:
    """The §3.4 prompt for one scoring row (an ``iter_rows`` dict: benchmark, item_id, texts, meta JSON, ...).

    ``view`` matters only for What'sUp Controlled under ``whatsup_prompt=per_view``: which question to ask."""
    benchmark = str(row["benchmark"])
    meta = row["meta"] if isinstance(row["meta"], Mapping) else json.loads(row["meta"] or "{}")
    if benchmark in CONTROLLED:
        gold = meta.get("gold_word") or meta["relation"]
        question = view if options.whatsup_prompt == "per_view" else options.whatsup_prompt
        return build_controlled_prompt(meta["obj1"], meta["obj2"], gold_word=gold, benchmark=benchmark,
                                       whatsup_prompt=question)
    if benchmark in COCO_VG:
        index = int(row["item_id"])  # QA item ids are the 0-based file row
        flip = draw_coco_vg_coin(options.seed, benchmark, index)
        return build_coco_vg_prompt(row["texts"][0], benchmark=benchmark, flip_part2=flip,
                                    gold_word=meta.get("gold_word"))
    if benchmark in MMVP:
        questions = meta.get("questions")
        if questions:
            return str(questions[0])
        if options.missing_question == "error":
            where = "Questions-llava.csv" if benchmark == "mmvp_vlm" else "Questions.csv"
            raise ValueError(f"{benchmark} item {row['item_id']!r} has no question in meta; VLM2Vec needs "
                             f"{where} in the dataset root (or scorer.options.missing_question=generic)")
    return options.generic_prompt


# ---------------------------------------------------------------------------------------------------------------
# Scorer


class Vlm2VecScorer:
    """VLM2Vec LLaVA scores: <query(image, prompt), target(text)> of last-token embeddings (PROTOCOLS §3.4)."""

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_family(model, scorer)
        self.options = parse_options(Vlm2VecOptions, scorer.options, scorer=scorer.name)
        render_query("", self.options.query_template)  # template errors surface at construction
        self.device = torch.device(self.options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bundle: Vlm2VecBundle = load_vlm2vec(model, device=self.device, merge=self.options.merge)
        tokenizer = self.bundle.llava.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        self.queries_encoded = 0
        self.targets_encoded = 0

    def describe(self) -> dict[str, Any]:
        """What a run record needs to reproduce these scores."""
        opts, bundle = self.options, self.bundle
        return {"scorer": "vlm2vec", "prompts_version": PROMPTS_VERSION, "query_template": opts.query_template,
                "two_way_prompts": dict(TWO_WAY_PROMPTS), "four_way_prompts": dict(FOUR_WAY_PROMPTS),
                "device": device_name(self.device),
                "whatsup_prompt": opts.whatsup_prompt, "score_columns": self.score_columns(),
                "generic_prompt": opts.generic_prompt, "seed": opts.seed,
                "image_preprocess": opts.image_preprocess, "merged": bundle.merged, "base": bundle.base_source,
                "adapter": bundle.adapter_source, "dtype": str(bundle.model.dtype).removeprefix("torch."),
                "num_visual_tokens": bundle.num_visual_tokens, "pooling": "last_non_pad", "score": "dot_fp32"}

    def score_columns(self) -> dict[str, str]:
        """Which query prompt produced which score column on What'sUp Controlled (metrics.json repeats this)."""
        mode = self.options.whatsup_prompt
        if mode == "per_view":
            return {"score": "4-way question (reference eval_4): 4way/* keys",
                    "score_two_way": "2-way question of the image's relation group (reference eval): 2way/* keys"}
        return {"score": f"{mode.replace('_', '-')} question for 2way/* and 4way/* keys"}

    # -- inputs -----------------------------------------------------------------------------------------------
    def prepare_image(self, image: Any) -> Image.Image:
        pil = to_pil(np.asarray(image))
        if self.options.image_preprocess == "pad":
            return pad_to_square(pil)
        if self.options.image_preprocess == "resize":
            crop = self.bundle.llava.image_processor.crop_size
            return pil.resize((int(crop["width"]), int(crop["height"])), Image.BICUBIC)
        return pil

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right padding: (B, T) ids and attention mask."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    def encode_queries(self, images: list[Any], prompts: list[str]) -> torch.Tensor:
        """(Q, D) embeddings of image queries (one processor call, right-padded batch forward)."""
        queries = [render_query(p, self.options.query_template) for p in prompts]
        pils = [self.prepare_image(image) for image in images]
        out = self.bundle.processor(images=pils, text=queries)
        sequences = [list(map(int, s)) for s in out["input_ids"]]
        v, image_id = self.bundle.num_visual_tokens, self.bundle.llava.image_token_id
        for query, seq in zip(queries, sequences, strict=True):
            if seq.count(image_id) != v:
                raise ImageTokenError(f"query {query!r} expanded to {seq.count(image_id)} image positions, not {v}")
        ids, mask = self._pad(sequences)
        pixels = torch.as_tensor(np.asarray(out["pixel_values"])).to(self.device, self.bundle.model.dtype)
        self.queries_encoded += len(queries)
        return compute_embeddings(self.bundle, ids, mask, pixels)  # (Q, D)

    def encode_targets(self, texts: list[str]) -> torch.Tensor:
        """(K, D) embeddings of texts alone (tokenizer with its BOS, as ``processor(text=...)``)."""
        for text in texts:
            if IMAGE_PLACEHOLDER in text:
                raise ImageTokenError(f"a VLM2Vec target must not contain {IMAGE_PLACEHOLDER}: {text!r}")
        sequences = [list(map(int, s)) for s in self.bundle.processor(text=texts)["input_ids"]]
        ids, mask = self._pad(sequences)
        self.targets_encoded += len(texts)
        return compute_embeddings(self.bundle, ids, mask)  # (K, D)

    # -- contract ---------------------------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        rows = list(iter_rows(batch))
        out = ScoreRows()
        if not rows:
            return out.to_batch()
        per_view = self.options.whatsup_prompt == "per_view"
        # ``score`` comes from each row's own prompt (What'sUp Controlled per_view: the 4-way question); Controlled
        # rows under per_view are scored a second time with the 2-way question into ``score_two_way``.
        prompts = [build_query_prompt(row, self.options, view="four_way") for row in rows]
        two_way = [build_query_prompt(row, self.options, view="two_way")
                   if per_view and row["benchmark"] in CONTROLLED else None for row in rows]
        wanted = [(row["image"], prompt) for row, prompt in zip(rows, prompts, strict=True)]
        wanted += [(row["image"], prompt) for row, prompt in zip(rows, two_way, strict=True) if prompt is not None]
        # One query per distinct (image content, prompt); one target per distinct text.
        query_index: dict[tuple[str, str], int] = {}
        first: list[tuple[Any, str]] = []
        for image, prompt in wanted:
            key = (_image_key(image), prompt)
            if key not in query_index:
                query_index[key] = len(query_index)
                first.append((image, prompt))
        texts = list(dict.fromkeys(text for row in rows for text in row["texts"]))
        text_index = {text: k for k, text in enumerate(texts)}
        with torch.inference_mode():
            queries = self.encode_queries([image for image, _ in first], [prompt for _, prompt in first])
            targets = self.encode_targets(texts) if texts else queries.new_zeros((0, queries.shape[1]))
            scores = (queries @ targets.T).cpu().numpy()  # (Q, K) fp32
        for row, prompt, prompt_2 in zip(rows, prompts, two_way, strict=True):
            image_key = _image_key(row["image"])
            q = query_index[(image_key, prompt)]
            q2 = query_index[(image_key, prompt_2)] if prompt_2 is not None else None
            for k, text in enumerate(row["texts"]):
                extra = {"query_prompt": prompt}
                if q2 is not None:
                    extra |= {"score_two_way": float(scores[q2, text_index[text]]), "query_prompt_two_way": prompt_2}
                out.add(row["item_id"], row["image_index"], k, float(scores[q, text_index[text]]), **extra)
        return out.to_batch()


def _image_key(image: Any) -> str:
    array = np.ascontiguousarray(np.asarray(image))
    digest = hashlib.sha1(array.tobytes(), usedforsecurity=False).hexdigest()
    return f"{array.shape}:{array.dtype}:{digest}"
