"""Conversation templates and the image placeholder of the LLaVA family (PROTOCOLS §3.2).

Scoring (VQAScore prompts) and training (LLaVA-cls, VLM2Vec) render conversations with these; models and the
converter need the placeholder and the end-of-turn strings. Bump ``TEMPLATES_VERSION`` whenever a rendered string
changes; the snapshot tests in ``tests/unit/test_prompts.py`` pin the rendered text byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATES_VERSION = "1"

IMAGE_PLACEHOLDER = "<image>"

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
