"""Every scorer prompt in one versioned place: the VQAScore question/answers (PROTOCOLS §3.2), VLM2Vec queries (§3.4).

Conversation templates live in ``perceive_ray.models.chat_templates`` (training renders them too).

Bump ``PROMPTS_VERSION`` whenever a rendered string changes; it is recorded with every scores table so that
scores produced under different prompts are never compared silently. The snapshot tests in
``tests/unit/test_prompts.py`` pin the rendered text byte for byte.
"""

from __future__ import annotations

from perceive_ray.models.chat_templates import (  # noqa: F401 (re-exported for scorers)
    IMAGE_PLACEHOLDER,
    SYS,
    TEMPLATE_NAMES,
    TEMPLATES,
    ConversationTemplate,
    get_template,
)

PROMPTS_VERSION = "1"

# t2v_metrics' VQAScore question: ASCII double quotes, lowercase "yes or no", final period.
VQASCORE_QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
VQASCORE_ANSWER = "Yes"
VQASCORE_NEGATIVE_ANSWER = "No"  # only for the yes_no mode: P(Yes) / (P(Yes) + P(No))


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
