"""LLaVA-1.5 training labels (train/llava_labels.py): golden labels, image spans, truncation, errors naming the
sample, parity with the VQAScore compat tokenisation, collate, and the modality-grouped sampler.

Tokenizers: the tiny offline one (``build_tiny_tokenizer``, <image> = id 4, as ``save_tiny_llava`` registers it) and
transformers' own ``LlamaTokenizer`` class (what llava-hf/llava-1.5-7b-hf loads) built over the same vocabulary,
with ``legacy`` True and False, so the real class's prefix-space and special-token handling is exercised offline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import LlamaTokenizer

from perceive_ray.models.chat_templates import IMAGE_PLACEHOLDER, SYS, get_template
from perceive_ray.models.llava import (
    TINY_IMAGE_SIZE,
    TINY_LLAVA_SIZES,
    TINY_PATCH_SIZE,
    build_tiny_tokenizer,
    compute_num_visual_tokens,
)
from perceive_ray.models.tiny import build_llava_config
from perceive_ray.scoring.prompts import render_vqascore_question
from perceive_ray.scoring.vqascore import build_compat_sequence
from perceive_ray.train.llava_labels import (
    IGNORE_INDEX,
    LabelError,
    TrainingExample,
    build_example,
    build_plain_example,
    build_v1_example,
    collate_examples,
    modality_length,
    modality_length_groups,
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def img(tok):
    return tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


def llama_tokenizer(tiny, *, legacy: bool, add_bos: bool = True) -> LlamaTokenizer:
    """transformers' LlamaTokenizer (Metaspace, byte fallback, legacy switch) over the tiny vocabulary + merges.

    ``add_bos=True`` is the real tokenizer_config.json's setting (the class default here adds none)."""
    state = json.loads(tiny.backend_tokenizer.to_str())
    merges = [tuple(m) for m in state["model"]["merges"]]
    out = LlamaTokenizer(vocab=state["model"]["vocab"], merges=merges, legacy=legacy, add_bos_token=add_bos)
    out.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return out


@pytest.fixture(scope="module", params=[(True, True), (False, True), (False, False)],
                ids=["legacy", "nonlegacy", "nonlegacy-nobos"])
def llama(request, tok):
    legacy, add_bos = request.param
    return llama_tokenizer(tok, legacy=legacy, add_bos=add_bos)


def visual_tokens(tok, select_feature: str, *, image_size: int = TINY_IMAGE_SIZE,
                  patch_size: int = TINY_PATCH_SIZE) -> tuple[int, int]:
    """(V, image_token_id) of the tiny LLaVA config save_tiny_llava would write (no weights are built)."""
    config = build_llava_config(tokenizer=tok, select_feature=select_feature, image_size=image_size,
                                patch_size=patch_size, **TINY_LLAVA_SIZES)
    return compute_num_visual_tokens(config), int(config.image_token_id)


def v1(tok, humans, gpts, *, has_image=True, v=64, max_length=2048, key="mix:7", image_token_id=4):
    return build_v1_example(humans, gpts, tokenizer=tok, image_token_id=image_token_id, num_visual_tokens=v,
                            max_length=max_length, has_image=has_image, key=key)


def supervised_runs(example: TrainingExample) -> list[list[int]]:
    """Contiguous runs of supervised label ids (one per answered round)."""
    runs: list[list[int]] = []
    previous = False
    for label in example.labels:
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = label != IGNORE_INDEX
    return runs


def check_invariants(example: TrainingExample, image_token_id: int, v: int) -> None:
    assert len(example.input_ids) == len(example.labels)
    for label, token in zip(example.labels, example.input_ids, strict=True):
        assert label in (IGNORE_INDEX, token)
    positions = [i for i, t in enumerate(example.input_ids) if t == image_token_id]
    if example.image_positions is None:
        assert positions == []
    else:
        start, end = example.image_positions
        assert positions == list(range(start, end)) and end - start == v  # exactly one span of V ids
        assert all(example.labels[i] == IGNORE_INDEX for i in positions)
    assert example.num_supervised == sum(label != IGNORE_INDEX for label in example.labels) > 0


ROUNDS = [
    ("What is the mug on?", "The mug is on the table."),
    ("Is the cat to the left of the dog?", "Yes"),
    ("What color is the chair?", "It is red, with a blue star."),
]


# ---------------------------------------------------------------------------------------------------------------
# Golden labels


@pytest.mark.parametrize("n_rounds", [1, 3])
def test_v1_supervised_tokens_are_the_answers_each_followed_by_eos(tok, img, n_rounds):
    humans = [f"{IMAGE_PLACEHOLDER}\n{ROUNDS[0][0]}"] + [h for h, _ in ROUNDS[1:n_rounds]]
    gpts = [a for _, a in ROUNDS[:n_rounds]]
    example = v1(tok, humans, gpts)
    check_invariants(example, img, 64)
    assert example.num_rounds == n_rounds and example.truncated == 0
    runs = supervised_runs(example)
    assert [tok.decode(run) for run in runs] == [a + "</s>" for a in gpts]
    assert "".join(tok.decode(run) for run in runs) == "".join(a + "</s>" for a in gpts)
    assert all(run[-1] == tok.eos_token_id for run in runs)
    # BOS, the system prompt and every "USER: ... ASSISTANT:" are masked: the masked text (image span removed)
    # decodes to the rendered prompt without the answers.
    assert example.input_ids[0] == tok.bos_token_id and example.labels[0] == IGNORE_INDEX
    start, end = example.image_positions
    masked = [t for i, (t, lab) in enumerate(zip(example.input_ids, example.labels, strict=True))
              if lab == IGNORE_INDEX and not start <= i < end]
    text = tok.decode(masked[1:])
    assert text.startswith(f"{SYS} USER:") and text.count("ASSISTANT:") == n_rounds
    assert text.count("USER:") == n_rounds and ROUNDS[0][0] in text


def test_v1_golden_tokens_text_only(tok, img):
    example = v1(tok, ["Is the mug on the table?", "And the cat?"], ["Yes", "No"], has_image=False)
    check_invariants(example, img, 64)
    assert example.image_positions is None
    tokens = tok.convert_ids_to_tokens(example.input_ids)
    sup = [tokens[i] for i, lab in enumerate(example.labels) if lab != IGNORE_INDEX]
    assert sup == ["▁Yes", "</s>", "▁No", "</s>"]
    # Round 2 directly follows </s> and is tokenised as its own piece: "▁USER:" (LLaVA-1.5's legacy behaviour).
    after_eos = tokens.index("</s>") + 1
    assert tokens[after_eos] == "▁USER:" and example.labels[after_eos] == IGNORE_INDEX
    # "ASSISTANT:" is masked, and no lone "▁" sits between it and the answer (the space is the answer's "▁").
    starts = [i for i in range(1, len(tokens))
              if example.labels[i] != IGNORE_INDEX and example.labels[i - 1] == IGNORE_INDEX]
    assert [tokens[i - 1] for i in starts] == ["▁ASSISTANT:", "▁ASSISTANT:"]


def test_plain_supervises_caption_and_newline(tok, img):
    caption = "A red mug on a table"
    example = build_plain_example(caption, tokenizer=tok, image_token_id=img, num_visual_tokens=64,
                                  max_length=2048, key="lcs:3")
    check_invariants(example, img, 64)
    assert example.input_ids[0] == tok.bos_token_id  # the tokenizer adds BOS: kept and masked
    assert example.image_positions == (1, 65) and example.labels[:65] == [IGNORE_INDEX] * 65
    runs = supervised_runs(example)
    assert len(runs) == 1 and runs[0] == example.input_ids[65:]
    assert tok.decode(runs[0]) == caption + "\n"
    assert tok.convert_ids_to_tokens(runs[0])[-1] == "\n" and tok.eos_token_id not in example.input_ids


def test_plain_matches_llava_prompt_tokenisation(tok, img):
    """[BOS] + image + tokens of the post-image piece "caption\\n" — LLaVA's tokenizer_image_token layout."""
    caption = "a photo of a cat"
    example = build_plain_example(caption, tokenizer=tok, image_token_id=img, num_visual_tokens=1,
                                  max_length=2048, key="lcs:0")
    assert example.input_ids == [tok.bos_token_id, img] + tok(caption + "\n").input_ids[1:]


def test_build_example_from_samples(tok, img):
    class S:
        key, image = "lcs:5", "/img/5.jpg"
        human_turns, gpt_turns = ("Describe the image.\n<image>",), ("a cat on a chair",)

    plain = build_example(S, conversation="plain", tokenizer=tok, image_token_id=img, num_visual_tokens=1)
    assert tok.decode(supervised_runs(plain)[0]) == "a cat on a chair\n"
    chat = build_example(S, conversation="v1", tokenizer=tok, image_token_id=img, num_visual_tokens=1)
    assert tok.decode(supervised_runs(chat)[0]) == "a cat on a chair</s>"

    class T:
        key, image = "mix:9", None
        human_turns, gpt_turns = ("hello",), ("hi",)

    assert build_example(T, conversation="v1", tokenizer=tok, image_token_id=img,
                         num_visual_tokens=1).image_positions is None
    with pytest.raises(LabelError, match="mix:9"):
        build_example(T, conversation="plain", tokenizer=tok, image_token_id=img, num_visual_tokens=1)


# ---------------------------------------------------------------------------------------------------------------
# Image spans: cls 1 token, patch V tokens


@pytest.mark.parametrize("select_feature,size,patch,expected_v", [
    ("cls", TINY_IMAGE_SIZE, TINY_PATCH_SIZE, 1),
    ("patch", TINY_IMAGE_SIZE, TINY_PATCH_SIZE, 64),
    ("patch", 336, 14, 576),  # LLaVA-1.5's V
    ("cls", 336, 14, 1),
])
def test_image_span_has_exactly_v_masked_ids(tok, img, select_feature, size, patch, expected_v):
    v, image_token_id = visual_tokens(tok, select_feature, image_size=size, patch_size=patch)
    assert v == expected_v and image_token_id == img
    for example in (
        v1(tok, ["<image>\nWhat is this?", "Sure?"], ["A mug.", "Yes"], v=v),
        build_plain_example("a mug", tokenizer=tok, image_token_id=img, num_visual_tokens=v, max_length=2048,
                            key="lcs:1"),
    ):
        check_invariants(example, img, v)
        assert example.input_ids.count(img) == v


def test_image_turn_is_normalised_like_llava(tok, img):
    """"Q\\n<image>" and "<image>\\nQ" give the same sequence: LLaVA moves the placeholder to the front."""
    front = v1(tok, ["<image>\nWhat is on the table?"], ["A mug."])
    back = v1(tok, ["What is on the table?\n<image>"], ["A mug."])
    spaced = v1(tok, ["  What is on the table? <image> "], ["A mug."])
    assert front.input_ids == back.input_ids == spaced.input_ids and front.labels == back.labels


# ---------------------------------------------------------------------------------------------------------------
# Parity with the VQAScore compat tokenisation (the scorer's Q* + "Yes</s>")


@pytest.mark.parametrize("caption", ["A mug to the left of a plate", "a cat under a chair", '"quoted" dog'])
@pytest.mark.parametrize("v", [1, 64])
def test_first_round_equals_vqascore_compat_sequence(tok, img, caption, v):
    chat = get_template("chat")
    question = render_vqascore_question(caption)
    scored = build_compat_sequence(tok, chat, caption, answer="Yes", image_token_id=img, num_visual=v)
    example = v1(tok, [f"{IMAGE_PLACEHOLDER}\n{question}"], ["Yes"], v=v)
    # Identical ids: BOS, SYS, "▁USER:", the lone "▁" before the image, V image ids, "▁" + "\n" after it, the
    # question, "▁ASSISTANT:", then the answer "▁Yes" and "</s>".
    assert example.input_ids == list(scored.ids)
    first_supervised = next(i for i, lab in enumerate(example.labels) if lab != IGNORE_INDEX)
    assert first_supervised == scored.answer_start  # the scorer masks exactly what training masks
    assert example.labels[first_supervised:] == list(scored.answer_ids)
    tokens = tok.convert_ids_to_tokens(example.input_ids)
    start, end = example.image_positions
    assert tokens[0] == "<s>" and tokens[start - 2:start] == ["▁USER:", "▁"]  # LLaVA's lone "▁" before <image>
    assert tokens[end:end + 2] == ["▁", "\n"]  # the post-image piece's own dummy prefix, then the newline
    assert tokens[first_supervised - 1:] == ["▁ASSISTANT:", "▁Yes", "</s>"]  # the tail's space is in "▁Yes"
    # And the first round of a multi-round conversation is the same prefix.
    longer = v1(tok, [f"{IMAGE_PLACEHOLDER}\n{question}", "Why?"], ["Yes", "Because."], v=v)
    assert longer.input_ids[:len(scored.ids)] == list(scored.ids)


def test_real_llama_tokenizer_class_both_legacy_modes(tok, llama):
    """transformers' LlamaTokenizer: the same labels whatever ``legacy``; round 1 equals the scorer's sequence."""
    assert llama.padding_side == "left"  # the class default collate_examples must not follow
    img = llama.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    caption = "A mug to the left of a plate"
    humans = [f"{IMAGE_PLACEHOLDER}\n{render_vqascore_question(caption)}", "What is behind the dog?"]
    gpts = ["Yes", "A red chair."]
    example = v1(llama, humans, gpts, v=5, image_token_id=img)
    check_invariants(example, img, 5)
    assert [llama.decode(run) for run in supervised_runs(example)] == [a + "</s>" for a in gpts]
    scored = build_compat_sequence(llama, get_template("chat"), caption, answer="Yes", image_token_id=img,
                                   num_visual=5)
    assert example.input_ids[:len(scored.ids)] == list(scored.ids)
    # Independent of the legacy flag: nothing is tokenised across "</s>". BOS follows the tokenizer.
    reference = v1(tok, humans, gpts, v=5)
    skip = 0 if llama.add_bos_token else 1
    assert (example.input_ids[0] == llama.bos_token_id) == bool(llama.add_bos_token)
    assert example.input_ids == reference.input_ids[skip:] and example.labels == reference.labels[skip:]
    # The one place a joint tokenisation would depend on ``legacy``: the masked "USER" right after "</s>".
    joint = llama("Yes</s>USER:").input_ids
    after = llama.convert_ids_to_tokens(joint)[joint.index(llama.eos_token_id) + 1]
    assert after == ("▁USER:" if llama.legacy else "USER")


def test_tokenizer_appending_eos_is_refused(tok):
    appending = llama_tokenizer(tok, legacy=False)
    appending.add_eos_token = True
    if appending("a").input_ids[-1:] != [appending.eos_token_id]:
        pytest.skip("this transformers version does not honour add_eos_token after construction")
    with pytest.raises(ValueError, match="appends EOS"):
        v1(appending, ["Hi"], ["Yes"], has_image=False)


def test_answer_off_a_token_boundary_is_an_error(tok, img):
    """A tokenizer whose joint round merges "ASSISTANT:" with the answer: the labels would be off; LabelError."""

    class Merging:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, text):
            out = self.inner(text)
            if "ASSISTANT: Yes" in text:
                ids = list(out.input_ids)
                a, y = self.inner.convert_tokens_to_ids(["▁ASSISTANT:", "▁Yes"])
                i = ids.index(a)
                assert ids[i + 1] == y
                out = type(out)({"input_ids": ids[:i] + [7] + ids[i + 2:]})
            return out

    with pytest.raises(LabelError, match="'mix:42'.*round 0.*token boundary"):
        v1(Merging(tok), ["<image>\nIs it?"], ["Yes"], key="mix:42")


# ---------------------------------------------------------------------------------------------------------------
# Truncation


def test_truncation_never_cuts_the_image_span(tok, img):
    full = v1(tok, ["<image>\nWhat is this?"], ["A mug."], v=64)
    start, end = full.image_positions
    for cut in (start + 1, end - 1):
        with pytest.raises(LabelError, match="'mix:7'.*cut the image span"):
            v1(tok, ["<image>\nWhat is this?"], ["A mug."], v=64, max_length=cut)


def test_truncation_after_the_image_keeps_a_valid_sample(tok, img):
    humans = ["<image>\nWhat is this?", "And the colour?"]
    gpts = ["A mug on the table.", "It is red."]
    full = v1(tok, humans, gpts)
    cut = len(full.input_ids) - 3  # inside the second answer
    short = v1(tok, humans, gpts, max_length=cut)
    check_invariants(short, img, 64)
    assert short.truncated == 3 and len(short.input_ids) == cut
    assert short.input_ids == full.input_ids[:cut] and short.labels == full.labels[:cut]
    assert short.num_supervised == full.num_supervised - 3
    assert short.image_positions == full.image_positions


def test_all_answers_truncated_away_is_an_error(tok, img):
    humans = ["<image>\nA long question about the mug on the table and the cat under the chair?"]
    full = v1(tok, humans, ["Yes"])
    first = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    assert v1(tok, humans, ["Yes"], max_length=first + 1).num_supervised == 1
    for cut in (first, full.image_positions[1]):
        with pytest.raises(LabelError, match="'mix:7'.*all labels are masked.*removes every answer token"):
            v1(tok, humans, ["Yes"], max_length=cut)
    with pytest.raises(LabelError, match="'lcs:2'.*all labels are masked"):
        build_plain_example("a cat", tokenizer=tok, image_token_id=img, num_visual_tokens=64, max_length=65,
                            key="lcs:2")


# ---------------------------------------------------------------------------------------------------------------
# Placeholder errors name the sample


@pytest.mark.parametrize("humans,gpts,has_image,match", [
    (["What is this?"], ["A mug."], True, "exactly one <image>.*found 0"),
    (["<image>\nWhat is <image> this?"], ["A mug."], True, "found 2"),
    (["<image>\nWhat?", "<image> again"], ["A.", "B."], True, "found 2"),
    (["What?", "<image>\nNow?"], ["A.", "B."], True, "in the first human turn.*turn indices \\[1\\]"),
    (["What?"], ["It shows <image>."], True, "found 1"),
    (["<image>\nWhat is this?"], ["A mug."], False, "text-only sample contains <image>"),
    (["What is this?"], ["A <image> mug."], False, "text-only sample contains <image>"),
    (["What?", "More?"], ["A."], True, "2 human and 1 gpt"),
    ([], [], False, "0 human and 0 gpt"),
    (["<image>\nWhat?"], ["A.</s>B."], True, "end-of-turn string"),
])
def test_placeholder_and_round_errors_name_the_key(tok, humans, gpts, has_image, match):
    with pytest.raises(LabelError, match=f"sample 'mix:123': .*{match}"):
        v1(tok, humans, gpts, has_image=has_image, key="mix:123")


def test_plain_caption_with_placeholder_is_an_error(tok, img):
    with pytest.raises(LabelError, match="'lcs:9'.*caption contains <image>"):
        build_plain_example("a <image> cat", tokenizer=tok, image_token_id=img, num_visual_tokens=1,
                            max_length=2048, key="lcs:9")


def test_label_error_is_a_value_error():
    assert issubclass(LabelError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Collate


def test_collate_pads_right_with_masked_labels(tok, img):
    a = v1(tok, ["<image>\nWhat is this?"], ["A mug."], v=1)
    b = v1(tok, ["Hello there, what is the table?", "More?"], ["It is red.", "No."], has_image=False)
    pad = tok.pad_token_id
    batch = collate_examples([a, b], pad_token_id=pad)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    width = max(len(a), len(b))
    assert tuple(batch["input_ids"].shape) == (2, width)
    for row, example in enumerate((a, b)):
        n = len(example)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids
        assert batch["labels"][row, :n].tolist() == example.labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][row, n:].tolist() == [pad] * (width - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
    left = collate_examples([a, b], pad_token_id=pad, padding_side="left")
    short = min((a, b), key=len)
    row = (a, b).index(short)
    assert left["attention_mask"][row].tolist() == [0] * (width - len(short)) + [1] * len(short)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate_examples([a], pad_token_id=None)
    with pytest.raises(ValueError, match="at least one"):
        collate_examples([], pad_token_id=pad)


# ---------------------------------------------------------------------------------------------------------------
# Modality-grouped sampler


def mixed_lengths(n: int = 1000, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 500, size=n)
    return np.where(rng.random(n) < 0.3, -lengths, lengths)


@pytest.mark.parametrize("global_batch", [64, 48])
def test_modality_groups_cover_every_index_once_single_modality(global_batch):
    lengths = mixed_lengths()
    groups = modality_length_groups(lengths, global_batch=global_batch, seed=0, epoch=0)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    n_image, n_text = int((lengths > 0).sum()), int((lengths < 0).sum())
    assert sum(len(g) == global_batch for g in groups) == n_image // global_batch + n_text // global_batch
    for g in groups:
        signs = np.sign(lengths[g])
        assert (signs == signs[0]).all()  # each mega-batch is one modality
    partial = [g for g in groups if len(g) < global_batch]
    assert all(len(g) < global_batch for g in groups[len(groups) - len(partial):])  # remainders last
    assert len(partial) <= 2


def test_modality_groups_deterministic_per_seed_and_epoch():
    lengths = mixed_lengths()
    run = lambda seed, epoch: np.concatenate(  # noqa: E731
        modality_length_groups(lengths.tolist(), global_batch=32, seed=seed, epoch=epoch))
    assert np.array_equal(run(1, 0), run(1, 0))
    assert not np.array_equal(run(1, 0), run(1, 1))
    assert not np.array_equal(run(1, 0), run(2, 0))


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_modality_groups_independent_of_worker_slicing(world_size):
    """Rank r takes the contiguous slice r of each mega-batch: union = mega-batch, lengths balanced per rank."""
    lengths = mixed_lengths()
    magnitude = np.abs(lengths)
    global_batch = 64
    for group in modality_length_groups(lengths, global_batch=global_batch, seed=5, epoch=2):
        if len(group) < global_batch:
            continue
        per = global_batch // world_size
        slices = [group[r * per:(r + 1) * per] for r in range(world_size)]
        assert np.array_equal(np.concatenate(slices), group)
        totals = [int(magnitude[s].sum()) for s in slices]
        assert max(totals) - min(totals) <= int(magnitude[group].max() - magnitude[group].min())


def test_modality_groups_single_modality_and_errors():
    groups = modality_length_groups([5, 3, 9, 1, 7], global_batch=2, seed=0, epoch=0)
    assert sorted(np.concatenate(groups).tolist()) == [0, 1, 2, 3, 4]
    assert [len(g) for g in groups] == [2, 2, 1]
    for g in groups:  # longest first within a power-of-two mega-batch of 2
        assert g.tolist() == sorted(g.tolist(), key=lambda i: -[5, 3, 9, 1, 7][i])
    with pytest.raises(ValueError, match="length 0"):
        modality_length_groups([3, 0, -2], global_batch=2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="global_batch"):
        modality_length_groups([3], global_batch=0, seed=0, epoch=0)


def test_modality_length_sign():
    assert modality_length(["<image>\nWhat is it?"], ["A mug."], has_image=True) == 6
    assert modality_length(["Hi there"], ["Hello"], has_image=False) == -3
    assert modality_length([""], [""], has_image=False) == -1
