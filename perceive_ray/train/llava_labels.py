"""Tokenised LLaVA-1.5 training examples: input ids + labels for stage 1 (``plain``) and stage 2 (vicuna ``v1``).

Pure (a tokenizer and ints; no model, no Ray). TRAINING.md §3: labels are built segment by segment from the same
conversation strings the VQAScore scorer renders (``models.chat_templates``, template ``chat``), each ``<image>``
becomes exactly V image-token ids (576 patch, 1 cls; ``models.llava.compute_num_visual_tokens``), all labelled -100,
and a sample whose supervised tokens do not match its rounds raises ``LabelError`` naming the sample key — never a
silently all-masked row (LLaVA#779, #1166).

Conversations (haotian-liu/LLaVA ``conversation.py`` / ``train.py``):

- ``plain`` (stage 1, ``preprocess_plain``): ``<image>`` + caption + ``"\\n"``. The human turn's text is dropped
  (LLaVA replaces it by the bare placeholder); the caption and the newline are supervised, BOS and the image span
  are not.
- ``v1`` (stage 2, ``conv_vicuna_v1``, sep ``" "``, sep2 ``"</s>"``):
  ``SYS USER: <human 1> ASSISTANT: <gpt 1></s>USER: <human 2> ASSISTANT: <gpt 2></s>...``; every answer and its
  ``</s>`` are supervised; BOS, the system prompt, every human turn and every ``ASSISTANT:`` are masked. The first
  human turn of an image sample is normalised as LLaVA's ``preprocess_multimodal`` does it: ``"<image>\\n"`` +
  the text without the placeholder, stripped (the 665K data has both ``<image>\\nQ`` and ``Q\\n<image>``).

How the sequence is tokenised (and why the labels are exact)
------------------------------------------------------------
Like the scorer's ``tokenize_compat`` (LLaVA's ``tokenizer_image_token``), text is split at ``<image>`` and every
piece is tokenised on its own: the piece that opens the sequence keeps the tokenizer's BOS (LLaMA adds ``<s>``;
a tokenizer without BOS gets none), every later piece is tokenised the same way and loses its BOS. The V image ids
go between the pieces. Training cuts the text further, at every label boundary, so each segment is either wholly
masked or wholly supervised and no length arithmetic is needed:

    [BOS "SYS USER: "] [V x image] ["\\n<q1> ASSISTANT:"] ["<a1>"] [</s>] ["USER: <q2> ASSISTANT:"] ["<a2>"] [</s>]
     masked             masked      masked                supervised       masked                    supervised

The space after ``ASSISTANT:``. The ``chat`` tail is ``" ASSISTANT: "``. LLaMA's SentencePiece splits on
whitespace and writes a space as a word-initial ``▁``, so in the joint string ``... ASSISTANT: Yes`` the space is
part of the answer's first token (``▁Yes``), while ``... ASSISTANT: `` tokenised alone ends in a lone ``▁`` that does
not exist in the joint sequence (PROTOCOLS §3.2 step 2: the scorer subtracts 1; LLaVA's ``preprocess_v1`` subtracts
2 = BOS + that ``▁`` from each instruction length). Here the masked segment stops at ``ASSISTANT:`` and the space
belongs to the answer segment: a tokenizer that writes a leading ``▁`` itself (SentencePiece's dummy prefix, HF
``Metaspace``; detected once per call) tokenises the bare answer, ``"Yes"`` -> ``▁Yes``; one that does not (byte-level
BPE) tokenises ``" " + answer``. No ``-1``/``-2`` is needed, and every round is checked against the joint
tokenisation of ``"<human part> ASSISTANT: <answer></s>"``: the joint ids must be the masked ids followed by
exactly the answer ids and ``</s>`` (``LabelError`` otherwise). With whitespace-splitting tokenizers (real LLaMA,
the tiny test tokenizer) that holds for any answer.

Round 1 of an image sample is therefore token for token the scorer's Q* + answer (``SYS USER: <image>\\n{question}
ASSISTANT: `` + ``Yes</s>``), including the two LLaVA quirks the scorer also has: a lone ``▁`` before the image
(``"SYS USER: "`` ends with a space) and a ``▁`` before the ``\\n`` after it (the post-image piece gets its own
dummy prefix). The only textual difference from the scorer is the normalisation above: LLaVA strips the human text,
the scorer inserts its question verbatim (the VQAScore question has no surrounding whitespace, so they coincide).

After ``</s>``. Every later ``USER: ...`` segment is tokenised standalone, so it starts with a word-initial ``▁USER``
whatever the tokenizer's ``legacy`` flag. That is what LLaVA-1.5's own training saw (``legacy`` LLaMA tokenizer,
transformers 4.31 / tokenizers < 0.14: LLaVA's length arithmetic matched there). A non-legacy tokenizer run on the
joint string instead writes ``USER`` without ``▁`` after ``</s>`` (LLaVA later added ``round_len -= 1`` for it, and
got "tokenization mismatch" all-masked rows when it was wrong). That affects masked tokens only; the labels here never
depend on it because nothing is tokenised across ``</s>``, which is looked up as one token (the template's eot,
``</s>``, must be a single token of the tokenizer).

Truncation (``model_max_length`` 2048, LLaVA truncates on the right after expanding the image): never inside the
image span (``LabelError``; transformers#36002), elsewhere allowed as long as one supervised token remains.

Also here: ``collate_examples`` (right padding whatever the tokenizer's ``padding_side``; llava-hf defaults to left)
and ``modality_length_groups`` (LLaVA's ``group_by_modality_length`` sampler, keyed by (seed, epoch)).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER, SYS, TEMPLATES
from perceive_ray.randomness import keyed_rng

IGNORE_INDEX = -100
MODEL_MAX_LENGTH = 2048  # LLaVA-1.5 scripts/v1_5: --model_max_length 2048
CONVERSATIONS = ("plain", "v1")
Conversation = Literal["plain", "v1"]

# vicuna_v1 (LLaVA conv_vicuna_v1, SeparatorStyle.TWO), rendered from the scorer's `chat` template strings.
CHAT = TEMPLATES["chat"]
V1_SEP = " "
V1_SEP2 = CHAT.eot  # "</s>"
V1_ROLES = ("USER", "ASSISTANT")
PLAIN_SEP = "\n"  # conv_llava_plain.sep
FIRST_OPEN, IMAGE_SUFFIX = CHAT.head.split(IMAGE_PLACEHOLDER)  # "SYS USER: ", "\n"
NEXT_OPEN = f"{V1_ROLES[0]}: "  # "USER: " of rounds 2, 3, ... (directly after "</s>")
ASSISTANT_OPEN = CHAT.tail.rstrip(" ")  # " ASSISTANT:" masked; the tail's trailing space goes with the answer
if (FIRST_OPEN != f"{SYS}{V1_SEP}{NEXT_OPEN}" or IMAGE_SUFFIX != "\n" or CHAT.tail != f"{V1_SEP}{V1_ROLES[1]}: "
        or V1_SEP2 != "</s>"):  # pragma: no cover - guards an edit of chat_templates.py
    raise RuntimeError("the `chat` template no longer renders LLaVA's vicuna_v1; update train/llava_labels.py")

MODALITY_PURPOSE = "modality_length_groups"


class LabelError(ValueError):
    """A training sample cannot be labelled exactly; the message names the sample key."""


@dataclass(frozen=True)
class TrainingExample:
    """One tokenised sample. ``labels[i]`` is ``input_ids[i]`` where supervised, else ``IGNORE_INDEX``.

    ``image_positions``: the half-open span ``(start, end)`` of the V image-token ids (None for text-only rows).
    ``num_rounds``: answered rounds of the conversation (1 for ``plain``). ``truncated``: tokens cut at
    ``max_length``. ``num_supervised``: labels that are not ``IGNORE_INDEX`` (after truncation).
    """

    input_ids: list[int]
    labels: list[int]
    image_positions: tuple[int, int] | None
    num_rounds: int
    key: str
    num_supervised: int = 0
    truncated: int = 0

    @property
    def has_image(self) -> bool:
        return self.image_positions is not None

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass(frozen=True)
class _Codec:
    """How one tokenizer is driven: the scorer's chunk-wise rule plus the facts the label builder needs."""

    tokenizer: Any
    adds_bos: bool  # tokenizer(text) starts with BOS: kept on the opening piece, dropped from later ones
    implicit_space: bool  # a piece's first word gets a word-initial "▁" (SentencePiece dummy prefix / Metaspace)
    eot_id: int

    def first(self, text: str) -> list[int]:
        """Tokens of the piece that opens the sequence (with the tokenizer's BOS, if it adds one)."""
        return list(self.tokenizer(text).input_ids)

    def next(self, text: str) -> list[int]:
        """Tokens of a later piece: tokenised on its own, its BOS dropped (``tokenize_compat``'s rule)."""
        ids = self.first(text)
        return ids[1:] if self.adds_bos else ids

    def answer(self, answer: str) -> list[int]:
        """Tokens of " " + answer after ``ASSISTANT:``: the space is the dummy-prefix "▁" where there is one."""
        return self.next(answer if self.implicit_space else " " + answer)


def _codec(tokenizer: Any, *, eot: bool = True) -> _Codec:
    """The tokenizer's facts; ``eot=False`` (``plain``) skips the end-of-turn lookup (-1)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and list(tokenizer("").input_ids[:1]) == [bos]
    probe = list(tokenizer("a").input_ids)
    if eos is not None and eos != bos and probe[-1:] == [eos]:
        raise ValueError("the tokenizer appends EOS to every text (add_eos_token=True); the label builder needs "
                         "it off (LLaVA's tokenizers do not append EOS)")
    rest = probe[1:] if adds_bos else probe
    implicit_space = bool(rest) and str(tokenizer.convert_ids_to_tokens(rest[0])).startswith("▁")
    eot_id = -1
    if eot:
        eot_ids = list(tokenizer(V1_SEP2).input_ids)[1 if adds_bos else 0:]
        eot_id = tokenizer.convert_tokens_to_ids(V1_SEP2)
        if eot_id is None or eot_id == tokenizer.unk_token_id or eot_ids != [eot_id]:
            raise ValueError(f"the end-of-turn string {V1_SEP2!r} must be one token of the tokenizer, got "
                             f"{tokenizer.convert_ids_to_tokens(eot_ids)}")
    return _Codec(tokenizer=tokenizer, adds_bos=adds_bos, implicit_space=implicit_space, eot_id=int(eot_id))


def _fail(key: str, message: str) -> LabelError:
    return LabelError(f"sample {key!r}: {message}")


def _ints(image_token_id: Any, num_visual_tokens: Any, max_length: Any) -> tuple[int, int, int]:
    """The three integer arguments as Python ints (numpy ints accepted), range-checked."""
    values = []
    for name, value, low in (("image_token_id", image_token_id, 0), ("num_visual_tokens", num_visual_tokens, 1),
                             ("max_length", max_length, 1)):
        try:
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"{name} must be an int, got {value!r}") from None
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
        values.append(value)
    return values[0], values[1], values[2]


def normalise_image_turn(text: str) -> str:
    """LLaVA's ``preprocess_multimodal``: the placeholder moved to the front, ``"<image>\\n"`` + stripped text."""
    return IMAGE_PLACEHOLDER + IMAGE_SUFFIX + text.replace(IMAGE_PLACEHOLDER, "").strip()


def _finish(key: str, ids: list[int], labels: list[int], image: tuple[int, int] | None, *, rounds: int,
            expected: int, image_token_id: int, max_length: int) -> TrainingExample:
    """Validate the full sequence, then truncate on the right at ``max_length`` (never into the image span)."""
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    span = [] if image is None else list(range(*image))
    if positions != span:
        raise _fail(key, f"image-token ids at {len(positions)} position(s), expected the contiguous span {image}")
    if any(labels[i] != IGNORE_INDEX for i in span):
        raise _fail(key, "an image position is supervised")
    if any(label not in (IGNORE_INDEX, token) for label, token in zip(labels, ids, strict=True)):
        raise _fail(key, "a label differs from its input id")
    supervised = sum(label != IGNORE_INDEX for label in labels)
    if supervised != expected:
        raise _fail(key, f"{supervised} supervised tokens but its {rounds} round(s) tokenise to {expected} "
                         "answer + end-of-turn tokens")
    truncated = max(0, len(ids) - max_length)
    if truncated:
        if image is not None and image[1] > max_length:
            raise _fail(key, f"truncation at max_length {max_length} would cut the image span [{image[0]}, "
                             f"{image[1]}) of a {len(ids)}-token sequence")
        ids, labels = ids[:max_length], labels[:max_length]
        supervised = sum(label != IGNORE_INDEX for label in labels)
    if supervised == 0:
        why = f"truncation at max_length {max_length} removes every answer token" if truncated else "no answer tokens"
        raise _fail(key, f"all labels are masked ({why}); an all-masked row is never trained on silently")
    return TrainingExample(input_ids=ids, labels=labels, image_positions=image, num_rounds=rounds, key=key,
                           num_supervised=supervised, truncated=truncated)


# ---------------------------------------------------------------------------------------------------------------
# Builders


def build_plain_example(caption: str, *, tokenizer: Any, image_token_id: int, num_visual_tokens: int,
                        max_length: int = MODEL_MAX_LENGTH, key: str) -> TrainingExample:
    """Stage 1 (``plain``): [BOS] + V image ids (masked) + caption + ``"\\n"`` (supervised).

    BOS follows the tokenizer (LLaMA adds ``<s>``; then it is masked, as in LLaVA where ``<image>`` tokenises to
    [BOS, image]). The caption is tokenised as the post-image piece (its own dummy prefix: `` caption``), exactly as
    LLaVA's ``tokenizer_image_token`` does. No ``</s>``: ``plain`` ends with its separator ``"\\n"``.
    """
    image_token_id, num_visual_tokens, max_length = _ints(image_token_id, num_visual_tokens, max_length)
    if not isinstance(caption, str):
        raise _fail(key, f"the caption must be a string, got {type(caption).__name__}")
    if IMAGE_PLACEHOLDER in caption:
        raise _fail(key, f"the caption contains {IMAGE_PLACEHOLDER} (the image comes before it)")
    codec = _codec(tokenizer, eot=False)
    head = codec.first("")  # [BOS] or []
    body = codec.next(caption + PLAIN_SEP)
    ids = head + [image_token_id] * num_visual_tokens + body
    labels = [IGNORE_INDEX] * (len(head) + num_visual_tokens) + body
    # Independently, LLaVA's way: length of the whole prompt minus the length of the masked "<image>" part.
    whole, masked = _compat(codec, IMAGE_PLACEHOLDER + caption + PLAIN_SEP), _compat(codec, IMAGE_PLACEHOLDER)
    expected = len(whole) - len(masked)
    image = (len(head), len(head) + num_visual_tokens)
    return _finish(key, ids, labels, image, rounds=1, expected=expected, image_token_id=image_token_id,
                   max_length=max_length)


def _compat(codec: _Codec, text: str) -> list[int]:
    """The scorer's chunk-wise tokenisation with a 1-position placeholder (-1 marks it); for counting only."""
    chunks = text.split(IMAGE_PLACEHOLDER)
    ids = codec.first(chunks[0])
    for chunk in chunks[1:]:
        ids += [-1] + codec.next(chunk)
    return ids


def build_v1_example(human_turns: Sequence[str], gpt_turns: Sequence[str], *, tokenizer: Any, image_token_id: int,
                     num_visual_tokens: int, max_length: int = MODEL_MAX_LENGTH, has_image: bool,
                     key: str) -> TrainingExample:
    """Stage 2 (vicuna ``v1``): every answer + ``</s>`` supervised; BOS, system, human turns, ``ASSISTANT:`` masked.

    ``human_turns[i]`` precedes ``gpt_turns[i]``; both lists must have the same non-zero length (a trailing
    unanswered human turn is an error: LLaVA would mask the whole row). An image sample has exactly one
    ``<image>``, in the first human turn; a text-only sample has none.
    """
    image_token_id, num_visual_tokens, max_length = _ints(image_token_id, num_visual_tokens, max_length)
    humans, answers = list(human_turns), list(gpt_turns)
    if not all(isinstance(t, str) for t in humans + answers):
        raise _fail(key, "every turn must be a string")
    if not answers or len(humans) != len(answers):
        raise _fail(key, f"{len(humans)} human and {len(answers)} gpt turn(s): a v1 example needs answered rounds "
                         "(human, gpt) x N with N >= 1")
    counts = [t.count(IMAGE_PLACEHOLDER) for t in humans + answers]
    if has_image and (sum(counts) != 1 or counts[0] != 1):
        where = [i for i, c in enumerate(counts) if c]
        raise _fail(key, f"an image sample needs exactly one {IMAGE_PLACEHOLDER}, in the first human turn; found "
                         f"{sum(counts)} (turn indices {where}, humans first)")
    if not has_image and sum(counts):
        raise _fail(key, f"a text-only sample contains {IMAGE_PLACEHOLDER} ({sum(counts)} time(s))")
    for i, text in enumerate(humans + answers):
        if V1_SEP2 in text:
            raise _fail(key, f"turn {i} (humans first) contains the end-of-turn string {V1_SEP2!r}")
    codec = _codec(tokenizer)
    if has_image:
        humans[0] = normalise_image_turn(humans[0])

    ids: list[int] = []
    labels: list[int] = []
    image: tuple[int, int] | None = None
    expected = 0

    def add(tokens: list[int], supervised: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if supervised else [IGNORE_INDEX] * len(tokens))

    for r, (human, answer) in enumerate(zip(humans, answers, strict=True)):
        masked = (FIRST_OPEN if r == 0 else NEXT_OPEN) + human + ASSISTANT_OPEN
        encode = codec.first if r == 0 else codec.next
        if r == 0 and has_image:
            before, masked = masked.split(IMAGE_PLACEHOLDER)
            add(codec.first(before), False)
            image = (len(ids), len(ids) + num_visual_tokens)
            add([image_token_id] * num_visual_tokens, False)
            encode = codec.next
        prompt = encode(masked)
        reply = codec.answer(answer) + [codec.eot_id]
        add(prompt, False)
        add(reply, True)
        # Independent check: the round's joint string must tokenise to the masked ids + exactly these answer ids.
        joint = encode(masked + CHAT.tail[len(ASSISTANT_OPEN):] + answer + V1_SEP2)
        if joint[:len(prompt)] != prompt or joint[len(prompt):] != reply:
            tok = tokenizer.convert_ids_to_tokens
            raise _fail(key, f"round {r}: the answer does not start on a token boundary: segments give "
                             f"{tok(reply)}, the joint round gives {tok(joint[len(prompt) - 1:])} after "
                             f"{tok(prompt[-1:])}")
        expected += len(joint) - len(prompt)
    return _finish(key, ids, labels, image, rounds=len(answers), expected=expected, image_token_id=image_token_id,
                   max_length=max_length)


def build_example(sample: Any, *, conversation: Conversation, tokenizer: Any, image_token_id: int,
                  num_visual_tokens: int, max_length: int = MODEL_MAX_LENGTH) -> TrainingExample:
    """The example of a ``data.llava_data.Sample`` (``key``, ``image``, ``human_turns``, ``gpt_turns``).

    ``plain`` needs an image row with one human turn holding ``<image>`` and one gpt turn (the caption).
    """
    key, has_image = str(sample.key), sample.image is not None
    common = {"tokenizer": tokenizer, "image_token_id": image_token_id, "num_visual_tokens": num_visual_tokens,
              "max_length": max_length, "key": key}
    if conversation == "plain":
        humans, answers = tuple(sample.human_turns), tuple(sample.gpt_turns)
        if not has_image or len(humans) != 1 or len(answers) != 1 or humans[0].count(IMAGE_PLACEHOLDER) != 1:
            raise _fail(key, f"plain needs an image row with one human turn holding one {IMAGE_PLACEHOLDER} and "
                             f"one gpt turn; got image={has_image}, {len(humans)} human / {len(answers)} gpt turn(s)")
        return build_plain_example(answers[0], **common)
    if conversation == "v1":
        return build_v1_example(sample.human_turns, sample.gpt_turns, has_image=has_image, **common)
    raise ValueError(f"unknown conversation {conversation!r}; use one of {CONVERSATIONS}")


# ---------------------------------------------------------------------------------------------------------------
# Batching


def collate_examples(examples: Sequence[TrainingExample], pad_token_id: int,
                     padding_side: Literal["right", "left"] = "right") -> dict[str, Any]:
    """``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``, (B, T) int64 tensors.

    Right padding by default, whatever the tokenizer says (llava-hf tokenizers default to left; training and
    last-token pooling need right). For ``chat`` models the pad id is ``unk`` (PROTOCOLS §3.2 step 4).
    """
    import torch

    if not examples:
        raise ValueError("collate_examples needs at least one example")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None (for LLaVA-1.5 pad with the unk id)")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(example.labels, dtype=torch.long)
        mask[row, cols] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------------------------
# group_by_modality_length


def modality_length(human_turns: Sequence[str], gpt_turns: Sequence[str], *, has_image: bool) -> int:
    """LLaVA's ``modality_lengths``: whitespace words of all turns, positive for image rows, negative for text-only.

    At least 1 word is counted, so the sign (the modality) is never lost."""
    words = max(1, sum(len(t.split()) for t in (*human_turns, *gpt_turns)))
    return words if has_image else -words


@functools.lru_cache(maxsize=16)
def _balanced_positions(n: int) -> np.ndarray:
    """``out[p]`` = the length rank placed at position p: the bit-reversal permutation (restricted to < n).

    For n and R powers of two, the R contiguous blocks of size n/R hold the rank classes ``c, c+R, c+2R, ...``:
    every block takes one of each R consecutive lengths, so block totals differ by at most max - min length."""
    bits = max(0, (n - 1).bit_length())
    reversed_ = [int(format(p, f"0{bits}b")[::-1], 2) if bits else 0 for p in range(1 << bits)]
    out = np.asarray([r for r in reversed_ if r < n], dtype=np.int64)
    out.flags.writeable = False  # cached: shared by every call
    return out


def _megabatches(indices: np.ndarray, lengths: np.ndarray, global_batch: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    shuffled = indices[rng.permutation(len(indices))]
    out = []
    for start in range(0, len(shuffled), global_batch):
        block = shuffled[start:start + global_batch]
        ordered = block[np.lexsort((block, -lengths[block]))]  # longest first, ties by index
        out.append(ordered[_balanced_positions(len(ordered))])
    return out


def modality_length_groups(lengths_with_sign: Sequence[int], *, global_batch: int, seed: int,
                           epoch: int) -> list[np.ndarray]:
    """LLaVA's ``group_by_modality_length`` sampler, re-implemented from its description; pure numpy.

    ``lengths_with_sign[i]`` > 0: sample i has an image; < 0: text-only (``modality_length``); 0 is an error.
    Each modality is shuffled (keyed by (seed, modality, epoch)) and cut into mega-batches of ``global_batch``
    indices, so a mega-batch (one optimizer step over all workers) never mixes modalities. Within a mega-batch the
    indices are sorted by length and laid out so that contiguous per-worker slices are length-balanced (see
    ``_balanced_positions``). The full mega-batches of both modalities are then shuffled together (keyed by
    (seed, epoch)); the partial remainders (at most one per modality, each single-modality) come last, image
    first. LLaVA merges its two remainders into one mixed batch; here they stay apart.

    Nothing depends on the worker count: rank r of R takes the contiguous slice ``[r*G/R, (r+1)*G/R)`` of each
    mega-batch (``data.llava_data.rank_rows``' convention), so the union over ranks is the mega-batch for every R.
    Returns the mega-batches in order (int64 arrays; every index exactly once).
    """
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    lengths = np.asarray(lengths_with_sign, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths_with_sign must be one-dimensional")
    if (lengths == 0).any():
        zero = np.flatnonzero(lengths == 0)[:5].tolist()
        raise ValueError(f"length 0 has no modality (indices {zero}); image rows > 0, text-only rows < 0")
    magnitude = np.abs(lengths)
    full: list[np.ndarray] = []
    partial: list[np.ndarray] = []
    for modality, select in (("image", lengths > 0), ("text", lengths < 0)):
        indices = np.flatnonzero(select).astype(np.int64)
        if not len(indices):
            continue
        rng = keyed_rng(seed, MODALITY_PURPOSE, modality, int(epoch))
        for block in _megabatches(indices, magnitude, global_batch, rng):
            (full if len(block) == global_batch else partial).append(block)
    order = keyed_rng(seed, MODALITY_PURPOSE, "megabatches", int(epoch)).permutation(len(full))
    return [full[i] for i in order] + partial
