"""Snapshot tests of every VQAScore prompt (PROTOCOLS §3.2): rendered text byte for byte, token ids on the tiny
tokenizer. A change here changes scores: bump PROMPTS_VERSION with it."""

from __future__ import annotations

import pytest

from perceive_ray.models.llava import build_tiny_tokenizer
from perceive_ray.scoring import prompts
from perceive_ray.scoring.prompts import (
    PROMPTS_VERSION,
    SYS,
    TEMPLATES,
    get_template,
    render_answer_part,
    render_question_part,
    render_vqascore_question,
)
from perceive_ray.scoring.vqascore import build_compat_sequence

CAPTION = "A mug to the left of a plate"
QUESTION = 'Does this figure show "A mug to the left of a plate"? Please answer yes or no.'
SYS_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

EXPECTED_Q_STAR = {
    "chat": SYS_TEXT + " USER: <image>\n" + QUESTION + " ASSISTANT: ",
    "phi3_instruct": (
        "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\n" + QUESTION
        + "<|end|>\n<|assistant|>\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYS_TEXT
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\n" + QUESTION
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
EXPECTED_ANSWER = {"chat": "Yes</s>", "phi3_instruct": "Yes<|end|>", "llama3": "Yes<|eot_id|>"}

# Compat token ids (placeholder = 1 image token, id 4) on the tiny tokenizer, with a0 and the answer tokens.
# The tiny tokenizer is trained in-process by `tokenizers`; a tokenizers upgrade that changes BPE training would
# show up here first.
EXPECTED_IDS = {
    "chat": (
        [1, 168, 244, 239, 111, 250, 151, 152, 118, 249, 252, 170, 225, 143, 247, 240, 253, 152, 251, 233, 161, 197,
         237, 254, 293, 110, 4, 110, 14, 193, 196, 190, 191, 200, 396, 161, 197, 313, 210, 111, 479, 194, 147, 192,
         164, 195, 296, 322, 2],
        47, ["▁Yes", "</s>"],
    ),
    "phi3_instruct": (
        [1, 5, 14, 291, 282, 111, 173, 288, 170, 6, 14, 7, 14, 4, 110, 14, 193, 196, 190, 191, 200, 396, 161, 197,
         313, 210, 111, 479, 194, 147, 192, 164, 195, 6, 14, 8, 14, 261, 6],
        37, ["Yes", "<|end|>"],
    ),
    "llama3": (
        [9, 9, 10, 259, 11, 14, 14, 48, 244, 239, 111, 250, 151, 152, 118, 249, 252, 170, 225, 143, 247, 240, 253,
         152, 251, 233, 161, 197, 237, 254, 12, 10, 133, 11, 14, 14, 4, 110, 14, 193, 196, 190, 191, 200, 396, 161,
         197, 313, 210, 111, 479, 194, 147, 192, 164, 195, 12, 10, 255, 11, 14, 14, 261, 12],
        62, ["Yes", "<|eot_id|>"],
    ),
}


def test_constants_are_the_reference_strings():
    assert PROMPTS_VERSION == "1"
    assert prompts.VQASCORE_QUESTION == 'Does this figure show "{}"? Please answer yes or no.'
    assert prompts.VQASCORE_ANSWER == "Yes"
    assert prompts.VQASCORE_NEGATIVE_ANSWER == "No"
    assert SYS == SYS_TEXT
    assert set(TEMPLATES) == {"chat", "phi3_instruct", "llama3"}


def test_question_is_inserted_verbatim():
    assert render_vqascore_question(CAPTION) == QUESTION
    # No stripping, no brace interpretation, quotes kept (PROTOCOLS §0: text is byte-exact).
    assert render_vqascore_question(' "{x}" ends with a space ') == (
        'Does this figure show " "{x}" ends with a space "? Please answer yes or no.'
    )
    with pytest.raises(ValueError, match="exactly one"):
        render_vqascore_question(CAPTION, question="no slot here")


@pytest.mark.parametrize("name", ["chat", "phi3_instruct", "llama3"])
def test_rendered_prompts_snapshot(name):
    assert render_question_part(name, CAPTION) == EXPECTED_Q_STAR[name]
    assert render_answer_part(name) == EXPECTED_ANSWER[name]
    assert render_question_part(get_template(name), CAPTION) == EXPECTED_Q_STAR[name]
    assert render_answer_part(name, "No") == EXPECTED_ANSWER[name].replace("Yes", "No")


def test_chat_keeps_the_trailing_space_and_llama3_the_literal_bos():
    assert render_question_part("chat", CAPTION).endswith("? Please answer yes or no. ASSISTANT: ")
    assert render_question_part("llama3", CAPTION).startswith("<|begin_of_text|>")


def test_unknown_template():
    with pytest.raises(KeyError, match="unknown conversation template"):
        get_template("vicuna")


@pytest.mark.parametrize("name", ["chat", "phi3_instruct", "llama3"])
def test_token_ids_snapshot_on_tiny_tokenizer(name):
    bos, pad = ("<|begin_of_text|>", "<pad>") if name == "llama3" else ("<s>", "<unk>")
    tokenizer = build_tiny_tokenizer(bos=bos, pad=pad)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == 4
    seq = build_compat_sequence(tokenizer, get_template(name), CAPTION, answer="Yes", image_token_id=image_id,
                                num_visual=1)
    ids, a0, answer_tokens = EXPECTED_IDS[name]
    assert list(seq.ids) == ids
    assert seq.answer_start == a0
    assert tokenizer.convert_ids_to_tokens(list(seq.answer_ids)) == answer_tokens
    if name == "llama3":  # the literal <|begin_of_text|> + the tokenizer's BOS: two BOS (llama3_double_bos)
        assert seq.ids[:2] == (tokenizer.bos_token_id, tokenizer.bos_token_id)
