"""Every prompt template of the scorers, in one versioned place (PROTOCOLS §3.2): VQAScore question and chat formats.

Bump ``PROMPTS_VERSION`` whenever a rendered string changes; it is recorded with every scores table so that
scores produced under different prompts are never compared silently. The snapshot tests in
``tests/unit/test_prompts.py`` pin the rendered text byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPTS_VERSION = "1"

IMAGE_PLACEHOLDER = "<image>"

# t2v_metrics' VQAScore question: ASCII double quotes, lowercase "yes or no", final period.
VQASCORE_QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
VQASCORE_ANSWER = "Yes"
VQASCORE_NEGATIVE_ANSWER = "No"  # only for the yes_no mode: P(Yes) / (P(Yes) + P(No))

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class ConversationTemplate:
    """One conversation format: Q* = ``head`` + question + ``tail``; answer part = answer + ``eot``.

    ``head`` contains the single ``<image>`` placeholder. ``eot`` is the end-of-turn string, which must be one
    token of the model's tokenizer (the answer span is asserted to be [answer token, eot token]).
    """

    name: str
    head: str
    tail: str
    eot: str

    def render_question_part(self, question: str) -> str:
        """Q*: everything up to where the assistant's answer starts (the masked part of the sequence)."""
        return f"{self.head}{question}{self.tail}"

    def render_answer_part(self, answer: str) -> str:
        return f"{answer}{self.eot}"


TEMPLATES: dict[str, ConversationTemplate] = {
    # LLaVA-1.5 (vicuna_v1): note the trailing space after "ASSISTANT:"; with LLaMA SentencePiece the lone "▁"
    # merges into "▁Yes" in the joint string, hence the -1 in the label mask (PROTOCOLS §3.2 step 2).
    "chat": ConversationTemplate(
        name="chat",
        head=f"{SYS} USER: {IMAGE_PLACEHOLDER}\n",
        tail=" ASSISTANT: ",
        eot="</s>",
    ),
    # LLaVA++ Phi-3-mini.
    "phi3_instruct": ConversationTemplate(
        name="phi3_instruct",
        head=f"<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n{IMAGE_PLACEHOLDER}\n",
        tail="<|end|>\n<|assistant|>\n",
        eot="<|end|>",
    ),
    # LLaVA++ LLaMA-3-8B-Instruct: the literal <|begin_of_text|> plus the tokenizer's BOS gives two BOS tokens,
    # reproduced on purpose (llama3_double_bos, PROTOCOLS §3.2 step 3).
    "llama3": ConversationTemplate(
        name="llama3",
        head=(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"{SYS}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{IMAGE_PLACEHOLDER}\n"
        ),
        tail="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        eot="<|eot_id|>",
    ),
}

TEMPLATE_NAMES = tuple(TEMPLATES)


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


def render_vqascore_question(text: str, *, question: str = VQASCORE_QUESTION) -> str:
    """The question about one candidate text; the text is inserted verbatim (no stripping, PROTOCOLS §0)."""
    if question.count("{}") != 1:
        raise ValueError(f"a VQAScore question template needs exactly one '{{}}' slot, got {question!r}")
    return question.replace("{}", text)


def render_question_part(template: str | ConversationTemplate, text: str, *, question: str = VQASCORE_QUESTION) -> str:
    """Q* for one candidate text: conversation head (with <image>) + question + assistant turn opener."""
    conv = get_template(template) if isinstance(template, str) else template
    return conv.render_question_part(render_vqascore_question(text, question=question))


def render_answer_part(template: str | ConversationTemplate, answer: str = VQASCORE_ANSWER) -> str:
    """The teacher-forced answer: answer word + end-of-turn string (e.g. ``Yes</s>``)."""
    conv = get_template(template) if isinstance(template, str) else template
    return conv.render_answer_part(answer)


# VLM2Vec-converted LLaVA query prompts (PROTOCOLS §3.4). The query is image + QUERY_TEMPLATE.format(prompt),
# with no chat template; the target is the option text alone.
VLM2VEC_PROMPTS_VERSION = "vlm2vec-1"  # bump when any rendered string below changes
VLM2VEC_QUERY_TEMPLATE = "<image> Represent the given image with the following question: {}"
VLM2VEC_GENERIC_PROMPT = "What is shown in the image?"  # [U]: benchmarks the paper gives no VLM2Vec prompt for
VLM2VEC_TWO_WAY_PROMPTS = {
    "lr": "Is the {obj1} to the left of or to the right of the {obj2}?",
    "ou": "Is the {obj1} at the bottom of the {obj2} or at the top of the {obj2}?",
    "fb": "Is the {obj1} in the back of the {obj2} or in the front of the {obj2}?",
}
VLM2VEC_FOUR_WAY_PROMPTS = {
    "whatsup_controlled_a": "Is the {obj1} to the left of, to the right of, on, or under the {obj2}?",
    "whatsup_controlled_b": "Is the {obj1} to the left of, to the right of, in front of, or behind the {obj2}?",
}
