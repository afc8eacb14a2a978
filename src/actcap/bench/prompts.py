"""Prompt building: the question (and its choices) in a fixed format, k-shot examples, chat template.

The exact text built here is what the model reads and what is stored with each sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from actcap.bench.questions import LETTERS, Question
from actcap.models.chat import format_prompt, uses_chat_template

Mode = Literal["generate", "loglik"]
ANSWER_PREFIX = "Answer:"


def question_block(q: Question, answer: str | None = None) -> str:
    """``Question: ...`` with lettered choices and ``Answer:`` (followed by ``answer`` for a shot)."""
    lines = [f"Question: {q.question.strip()}"]
    if q.choices:
        lines.extend(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    lines.append(ANSWER_PREFIX + (f" {answer}" if answer is not None else ""))
    return "\n".join(lines)


def _shot_answer(q: Question) -> str:
    return q.answer.strip() if q.choices else q.answer.strip()


def build_prompt(
    tokenizer: Any,
    q: Question,
    shots: Sequence[Question] = (),
    mode: Mode = "generate",
    chat: bool | None = None,
) -> str:
    """The full prompt for one question.

    Multiple choice in log-likelihood mode ends with ``Answer:``, after which the scorer compares
    the letters (or choice texts). With a chat template the examples and question form the user's
    message; in log-likelihood mode the assistant turn starts with ``Answer:``.

    Args:
        tokenizer: The model's tokenizer (for its chat template).
        q: The question.
        shots: Solved examples to show first.
        mode: ``generate`` or ``loglik``.
        chat: Force the chat template on or off (default: when the tokenizer has one).
    """
    header = ""
    if q.choices:
        subject = q.category.replace("_", " ").strip()
        header = f"The following are multiple choice questions (with answers){f' about {subject}' if subject else ''}.\n\n"
    examples = "".join(question_block(s, _shot_answer(s)) + "\n\n" for s in shots)
    if not uses_chat_template(tokenizer, chat):
        return header + examples + question_block(q)
    if shots or q.choices:
        body = header + examples + question_block(q).removesuffix(ANSWER_PREFIX).rstrip()
    else:
        body = q.question.strip()
    if q.choices and mode == "generate":
        body += "\nAnswer with the letter of the correct option."
    prefix = ANSWER_PREFIX if mode == "loglik" else ""
    return format_prompt(tokenizer, body, chat=True, assistant_prefix=prefix)
