"""VQAScore for the LLaVA family (PROTOCOLS §3.2) with the shared-prefix fast path (§4).

One teacher-forced pass per (image, text) gives all three scores, from the log-softmax (fp32, full vocabulary) at
the two answer positions a0-1 and a0 of the compat sequence  Q*(text) + "Yes" + EOT:

- ``t2v``    = exp(mean(log P(Yes | ..), log P(EOT | .., Yes)))   (t2v_metrics-compatible default)
- ``p_yes``  = P(Yes | ..), y being the answer token as it occurs in context (e.g. "▁Yes")
- ``yes_no`` = P(y) / (P(y) + P(n)) at the same position, n from re-tokenising the sequence with answer "No".

``sharing=shared`` (default): per image, encode the image and prefill the token-level longest common prefix of its
candidates once, repeat the KV cache over the unique candidates and run only their right-padded suffixes with
positions continuing from L. ``sharing=none`` is the naive per-pair path (image re-encoded per candidate), kept for
parity tests. The ``lm_tokens`` column counts the LM tokens each path processed (shared: the prefix is charged to
an image's first candidate, duplicates cost 0), so the saving is measured rather than assumed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from perceive_ray.config import ModelConfig, ScorerConfig
from perceive_ray.data.images import pad_to_square, to_pil
from perceive_ray.models.llava import LlavaBundle, load_llava
from perceive_ray.scoring.base import ScoreRows, check_family, device_name, iter_rows
from perceive_ray.scoring.options import VQAScoreOptions, parse_options
from perceive_ray.scoring.prompts import (
    IMAGE_PLACEHOLDER,
    PROMPTS_VERSION,
    TEMPLATE_NAMES,
    VQASCORE_QUESTION,
    ConversationTemplate,
    get_template,
    render_answer_part,
    render_question_part,
)

MODES = ("t2v", "p_yes", "yes_no")


class AnswerSpanError(ValueError):
    """The unmasked tokens of a compat sequence are not exactly [answer token, end-of-turn token]."""


assert TEMPLATE_NAMES == VQAScoreOptions.model_fields["template"].annotation.__args__[0].__args__


@dataclass(frozen=True)
class CompatSequence:
    """A compat-tokenised sequence; ``ids`` hold V image-token ids where the ``<image>`` placeholder was."""

    ids: tuple[int, ...]
    answer_start: int  # a0: first unmasked (answer) position

    @property
    def answer_ids(self) -> tuple[int, ...]:
        return self.ids[self.answer_start:]


def tokenize_compat(tokenizer: Any, prompt: str, *, image_token_id: int, num_visual: int,
                    double_bos: bool = True) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: split at <image>, tokenise chunks, drop later chunks' first token when
    chunk 0 starts with BOS, and put ``num_visual`` image-token ids between the chunks.

    ``double_bos=False``: when chunk 0 starts with two BOS (the tokenizer's own and a literal one in the prompt,
    as in the llama3 template), drop the tokenizer's so exactly one remains."""
    chunks = [list(tokenizer(chunk).input_ids) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    bos = tokenizer.bos_token_id
    if not double_bos and bos is not None and chunks[0][:2] == [bos, bos]:
        chunks[0] = chunks[0][1:]
    offset = 1 if chunks[0] and chunks[0][0] == bos else 0
    ids = chunks[0][:1] if offset else []
    for index, chunk in enumerate(chunks):
        if index:
            ids.extend([image_token_id] * num_visual)
        ids.extend(chunk[offset:])
    return ids


def build_compat_sequence(tokenizer: Any, template: ConversationTemplate, text: str, *, answer: str,
                          question: str = VQASCORE_QUESTION, image_token_id: int, num_visual: int,
                          llama3_double_bos: bool = True) -> CompatSequence:
    """Q*(text) + answer + EOT, with labels masked by Q*'s chunk-wise token length (-1 if Q* ends with a space).

    ``llama3_double_bos=False`` (llama3 template only) keeps one BOS instead of the reference's two."""
    q_star = render_question_part(template, text, question=question)
    full = q_star + render_answer_part(template, answer)
    if full.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"the VQAScore prompt must contain exactly one {IMAGE_PLACEHOLDER}: {full!r}")
    double_bos = llama3_double_bos or template.name != "llama3"
    ids = tokenize_compat(tokenizer, full, image_token_id=image_token_id, num_visual=num_visual,
                          double_bos=double_bos)
    q_len = len(tokenize_compat(tokenizer, q_star, image_token_id=image_token_id, num_visual=1,
                                double_bos=double_bos))
    if q_star.endswith(" "):
        q_len -= 1  # the lone "▁" of Q* merges into "▁Yes" in the joint string
    sequence = CompatSequence(ids=tuple(ids), answer_start=q_len + num_visual - 1)
    check_answer_span(tokenizer, template, sequence, answer)
    return sequence


def check_answer_span(tokenizer: Any, template: ConversationTemplate, sequence: CompatSequence, answer: str) -> None:
    """Assert the unmasked tokens are exactly [token decoding to ``answer``, the template's EOT token]."""
    span = sequence.answer_ids
    eot_id = tokenizer.convert_tokens_to_ids(template.eot)
    if eot_id is None or eot_id == tokenizer.unk_token_id:
        raise AnswerSpanError(f"template {template.name!r}: end-of-turn {template.eot!r} is not a token")
    ok = len(span) == 2 and span[1] == eot_id and tokenizer.decode([span[0]]).strip() == answer.strip()
    if not ok:
        raise AnswerSpanError(
            f"template {template.name!r}: unmasked answer tokens {tokenizer.convert_ids_to_tokens(list(span))} "
            f"are not [{answer!r}, {template.eot!r}] (check the template's spacing and end-of-turn string)")


def compute_prefix_length(sequences: Sequence[CompatSequence]) -> int:
    """Token-level LCP of the sequences, capped at min(a0) - 1 so every answer-scoring logit is in a suffix."""
    cap = min(s.answer_start for s in sequences) - 1
    first = sequences[0].ids
    length = 0
    while length < cap and all(s.ids[length] == first[length] for s in sequences[1:]):
        length += 1
    return length


def compute_scores(lp_yes: np.ndarray, lp_eot: np.ndarray, lp_no: np.ndarray) -> dict[str, np.ndarray]:
    """The three modes from fp32 log-probs (arrays of shape (N,)); arithmetic in float64."""
    lp_yes, lp_eot, lp_no = (np.asarray(a, dtype=np.float64) for a in (lp_yes, lp_eot, lp_no))
    return {
        "t2v": np.exp((lp_yes + lp_eot) / 2.0),
        "p_yes": np.exp(lp_yes),
        "yes_no": 1.0 / (1.0 + np.exp(lp_no - lp_yes)),  # P(y) / (P(y) + P(n))
    }


@dataclass
class _Candidate:
    yes: CompatSequence
    no_id: int | None  # first answer token of the "No" sequence; None if it has no clean [No, EOT] span


class VQAScoreScorer:
    """VQAScore (t2v / p_yes / yes_no) of a LLaVA-family model; shared-prefix or naive per-pair path."""

    def __init__(self, model: ModelConfig, scorer: ScorerConfig) -> None:
        check_family(model, scorer)
        self.options = parse_options(VQAScoreOptions, scorer.options, scorer=scorer.name)
        self.device = torch.device(self.options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bundle: LlavaBundle = load_llava(model, device=self.device, template=self.options.template)
        self.template = get_template(self.bundle.template)
        text_config = self.bundle.model.config.text_config
        self.max_length = self.options.max_length or text_config.max_position_embeddings
        reference = self.bundle.reference_vocab_size if self.options.softmax_vocab == "reference" else None
        self.vocab_size = int(reference or text_config.vocab_size)  # softmax width
        self.prompts_version = PROMPTS_VERSION
        # Running totals, comparable between sharing modes on the same rows.
        self.lm_tokens_total = 0
        self.vision_encodes_total = 0
        self.sequences_total = 0
        self.token_record: dict[str, tuple[int, str]] = {}  # y / n / eot ids and strings (PROTOCOLS §3.2)
        # The answer ids do not depend on the caption (asserted per text): settle them now, so describe() is
        # complete before any score exists and a template or tokenizer problem fails at construction.
        self.build_candidate("a photo")

    def describe(self) -> dict[str, Any]:
        """What a run record needs to reproduce these scores (PROTOCOLS §8.13): templates, answer/EOT token ids and
        strings, softmax width (with the converter's LLaMA-3 <pad> row mode), BOS handling, dtype, visual tokens,
        device."""
        opts, bundle = self.options, self.bundle
        return {
            "scorer": "vqascore", "prompts_version": self.prompts_version, "template": self.template.name,
            "template_head": self.template.head, "template_tail": self.template.tail, "eot": self.template.eot,
            "question": opts.question, "device": device_name(self.device),
            "answer": opts.answer, "negative_answer": opts.negative_answer, "mode": opts.mode,
            "image_preprocess": opts.image_preprocess, "sharing": opts.sharing, "dtype": str(bundle.model.dtype).removeprefix("torch."),
            "select_feature": bundle.select_feature, "num_visual_tokens": bundle.num_visual_tokens,
            "vocab_size": self.vocab_size, "softmax_vocab": opts.softmax_vocab,
            "reference_vocab_size": bundle.reference_vocab_size, "llama3_pad_row": bundle.llama3_pad_row,
            "pad_row_id": bundle.pad_row_id,
            "llama3_double_bos": opts.llama3_double_bos if self.template.name == "llama3" else None,
            "tokens": {name: list(entry) for name, entry in self.token_record.items()},
        }

    # -- tokenisation -----------------------------------------------------------------------------------------
    def build_candidate(self, text: str) -> _Candidate:
        bundle, opts = self.bundle, self.options
        kwargs = {"question": opts.question, "image_token_id": bundle.image_token_id,
                  "num_visual": bundle.num_visual_tokens, "llama3_double_bos": opts.llama3_double_bos}
        yes = build_compat_sequence(bundle.tokenizer, self.template, text, answer=opts.answer, **kwargs)
        a0 = yes.answer_start
        if len(yes.ids) > self.max_length:
            raise ValueError(f"VQAScore sequence of {len(yes.ids)} tokens exceeds max_length {self.max_length} "
                             f"(text {text!r}); nothing is truncated")
        try:
            no = build_compat_sequence(bundle.tokenizer, self.template, text, answer=opts.negative_answer, **kwargs)
            if no.answer_start != a0 or no.ids[:a0] != yes.ids[:a0]:
                raise AnswerSpanError(f"the {opts.negative_answer!r} sequence does not share the question tokens "
                                      f"of the {opts.answer!r} sequence for text {text!r}")
            no_id = no.ids[a0]
        except AnswerSpanError as exc:
            if opts.mode == "yes_no":
                raise
            # t2v / p_yes do not need n: keep scoring, with score_yes_no = NaN, but say why once.
            if "no" not in self.token_record:
                warnings.warn(f"score_yes_no will be NaN: {exc}", stacklevel=2)
            no_id = None
        if max(yes.ids[a0], yes.ids[a0 + 1], no_id or 0) >= self.vocab_size:
            raise AnswerSpanError(f"answer tokens {yes.answer_ids}, {no_id} lie outside the softmax "
                                  f"vocabulary of {self.vocab_size}")
        self._record("yes", yes.ids[a0])
        self._record("eot", yes.ids[a0 + 1])
        self._record("no", no_id)
        return _Candidate(yes=yes, no_id=no_id)

    def _record(self, name: str, token_id: int | None) -> None:
        entry = (-1, "") if token_id is None else (int(token_id),
                                                    self.bundle.tokenizer.convert_ids_to_tokens(int(token_id)))
        if self.token_record.setdefault(name, entry) != entry:
            raise AnswerSpanError(f"{name} token changed between texts: {self.token_record[name]} vs {entry}")

    # -- model passes -----------------------------------------------------------------------------------------
    def load_pixels(self, images: Sequence[Any]) -> torch.Tensor:
        pils = [to_pil(np.asarray(image)) for image in images]
        if self.options.image_preprocess == "pad":
            pils = [pad_to_square(p) for p in pils]
        pixels = self.bundle.image_processor(images=pils, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.bundle.model.dtype)  # (B, 3, H, W)

    def _answer_logprobs(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         yes_ids: Sequence[int], eot_ids: Sequence[int], no_ids: Sequence[int]) -> np.ndarray:
        """Log-probs (N, 3) of [y at a0-1, EOT at a0, n at a0-1]; the LM head runs at those 2N positions only."""
        picked = hidden[rows[:, None], torch.stack([cols, cols + 1], dim=1)]  # (N, 2, D)
        logits = self.bundle.model.lm_head(picked)[..., : self.vocab_size]  # (N, 2, vocab)
        logprobs = logits.float().log_softmax(dim=-1)  # fp32 over the whole (reference) vocabulary
        n = torch.arange(len(yes_ids), device=hidden.device)
        missing = torch.tensor([i is None for i in no_ids], device=hidden.device)
        no_ids = [y if i is None else i for y, i in zip(yes_ids, no_ids, strict=True)]
        yes, eot, no = (torch.tensor(list(ids), device=hidden.device) for ids in (yes_ids, eot_ids, no_ids))
        lp_no = logprobs[n, 0, no].masked_fill(missing, float("nan"))
        out = torch.stack([logprobs[n, 0, yes], logprobs[n, 1, eot], lp_no], dim=1)
        return out.cpu().numpy()

    def score_naive(self, pixels: torch.Tensor, cands: list[list[_Candidate]]) -> list[list[tuple[np.ndarray, int]]]:
        """One full sequence per (image, text), image re-encoded each time (the reference's cost)."""
        flat = [(i, c) for i, row in enumerate(cands) for c in row]
        if not flat:
            return [[] for _ in cands]
        width = max(len(c.yes.ids) for _, c in flat)
        pad_id = self.pad_id
        ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(flat), width), dtype=torch.long)
        for j, (_, c) in enumerate(flat):
            ids[j, : len(c.yes.ids)] = torch.tensor(c.yes.ids)
            mask[j, : len(c.yes.ids)] = 1
        image_of = torch.tensor([i for i, _ in flat])
        out = self.bundle.model.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      pixel_values=pixels[image_of.to(self.device)], use_cache=False)
        hidden = out.last_hidden_state  # (N, T, D)
        cols = torch.tensor([c.yes.answer_start - 1 for _, c in flat], device=self.device)
        lps = self._answer_logprobs(hidden, torch.arange(len(flat), device=self.device), cols,
                                    [c.yes.ids[c.yes.answer_start] for _, c in flat],
                                    [c.yes.ids[c.yes.answer_start + 1] for _, c in flat], [c.no_id for _, c in flat])
        self.vision_encodes_total += len(flat)
        results: list[list[tuple[np.ndarray, int]]] = [[] for _ in cands]
        for j, (i, c) in enumerate(flat):
            results[i].append((lps[j], len(c.yes.ids)))
        return results

    def score_shared(self, pixels: torch.Tensor, cands: list[list[_Candidate]]) -> list[list[tuple[np.ndarray, int]]]:
        """Per image: prefill the token LCP once, repeat the KV cache over unique candidates, run the suffixes."""
        model = self.bundle.model
        features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        self.vision_encodes_total += len(cands)
        return [self._score_one_image(f, row) if row else [] for f, row in zip(features, cands, strict=True)]

    def _score_one_image(self, image_features: torch.Tensor, row: list[_Candidate]) -> list[tuple[np.ndarray, int]]:
        lm = self.bundle.model.model.language_model
        unique: dict[tuple[int, ...], int] = {}
        for c in row:
            unique.setdefault(c.yes.ids, len(unique))
        uniq = [next(c for c in row if c.yes.ids == key) for key in unique]  # first occurrence of each
        prefix = compute_prefix_length([c.yes for c in uniq])
        if prefix < 1:
            raise ValueError("no shared prefix: the candidates do not even share their first token")
        embeds = [self._embed(c.yes.ids, image_features) for c in uniq]  # each (T_u, D)
        positions = torch.arange(prefix, device=self.device)[None]
        pre = lm(inputs_embeds=embeds[0][None, :prefix], position_ids=positions, use_cache=True)
        cache = pre.past_key_values
        cache.batch_repeat_interleave(len(uniq))  # (1, H, L, d) -> (U, H, L, d) per layer
        lengths = [len(c.yes.ids) - prefix for c in uniq]
        width = max(lengths)
        suffix = embeds[0].new_zeros((len(uniq), width, embeds[0].shape[-1]))
        mask = torch.zeros((len(uniq), prefix + width), dtype=torch.long, device=self.device)
        mask[:, :prefix] = 1
        for u, (emb, n) in enumerate(zip(embeds, lengths, strict=True)):
            suffix[u, :n] = emb[prefix:]
            mask[u, prefix : prefix + n] = 1
        pos = (prefix + torch.arange(width, device=self.device))[None].expand(len(uniq), -1)
        hidden = lm(inputs_embeds=suffix, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True).last_hidden_state  # (U, S, D)
        cols = torch.tensor([c.yes.answer_start - 1 - prefix for c in uniq], device=self.device)
        lps = self._answer_logprobs(hidden, torch.arange(len(uniq), device=self.device), cols,
                                    [c.yes.ids[c.yes.answer_start] for c in uniq],
                                    [c.yes.ids[c.yes.answer_start + 1] for c in uniq], [c.no_id for c in uniq])
        out, charged = [], set()
        for k, c in enumerate(row):
            u = unique[c.yes.ids]
            tokens = (prefix if k == 0 else 0) + (lengths[u] if u not in charged else 0)
            charged.add(u)
            out.append((lps[u], tokens))
        return out

    def _embed(self, ids: tuple[int, ...], image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings of one full sequence with the image features scattered into its V image positions."""
        ids_t = torch.tensor(ids, device=self.device)
        embeds = self.bundle.model.get_input_embeddings()(ids_t)  # (T, D)
        where = ids_t == self.bundle.image_token_id
        if int(where.sum()) != image_features.shape[0]:
            raise ValueError(f"{int(where.sum())} image positions for {image_features.shape[0]} image features")
        embeds[where] = image_features.to(embeds.dtype)
        return embeds

    @property
    def pad_id(self) -> int:
        tok = self.bundle.tokenizer
        # Right padding under an attention mask: the id only has to exist (LLaMA-3 without <pad> has no unk either).
        for candidate in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    # -- contract ---------------------------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        rows = list(iter_rows(batch))
        out = ScoreRows()
        if not rows:
            return out.to_batch()
        built: dict[str, _Candidate] = {}  # texts recur across an item's images: tokenise once
        for row in rows:
            for text in row["texts"]:
                if text not in built:
                    built[text] = self.build_candidate(text)
        cands = [[built[text] for text in row["texts"]] for row in rows]
        with torch.inference_mode():
            pixels = self.load_pixels([row["image"] for row in rows])
            scorer = self.score_shared if self.options.sharing == "shared" else self.score_naive
            results = scorer(pixels, cands)
        for row, scored in zip(rows, results, strict=True):
            if not scored:  # an image without candidate texts has nothing to score
                continue
            lps = np.stack([lp for lp, _ in scored])  # (K, 3)
            modes = compute_scores(lps[:, 0], lps[:, 1], lps[:, 2])
            for k, (_, tokens) in enumerate(scored):
                values = {m: float(modes[m][k]) for m in MODES}
                out.add(row["item_id"], row["image_index"], k, values[self.options.mode],
                        score_t2v=values["t2v"], score_p_yes=values["p_yes"], score_yes_no=values["yes_no"],
                        lm_tokens=int(tokens))
                self.lm_tokens_total += int(tokens)
                self.sequences_total += 1
        return out.to_batch()
