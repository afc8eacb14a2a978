"""Which token prefix each question's prompt shares with the others of its group.

Prompts of one category and mode (one MMLU subject with its few-shot examples, GSM8K with its
worked examples) begin with the same tokens; the run writer stores those tokens' activations once
(:mod:`actcap.storage.prefixes`). The prefix of a group is the longest run of token ids all its
prompts begin with, found before any question is answered, so it does not depend on batching.
The writer checks each sample's real token ids against it, so a prompt tokenised differently
simply keeps all its rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from actcap.bench.questions import Question
from actcap.models.chat import has_chat_template
from actcap.models.loading import LoadedModel
from actcap.storage.prefixes import MIN_PREFIX_TOKENS, common_prefix


class PlannedPrompt(Protocol):
    """What this module needs of a planned question."""

    @property
    def question(self) -> Question: ...  # noqa: D102

    @property
    def mode(self) -> str: ...  # noqa: D102

    @property
    def prompt(self) -> str: ...  # noqa: D102


def shared_prefixes(lm: LoadedModel, plan: Sequence[PlannedPrompt]) -> dict[str, tuple[int, ...]]:
    """Question id to the token ids its prompt shares with the rest of its group.

    A group is the questions of one mode and category; groups of one question, and common
    prefixes shorter than :data:`~actcap.storage.prefixes.MIN_PREFIX_TOKENS`, share nothing.
    """
    special = not has_chat_template(lm.tokenizer)  # a chat template writes them out itself
    groups: dict[tuple[str, str], list[PlannedPrompt]] = defaultdict(list)
    for p in plan:
        groups[(p.mode, str(p.question.category or ""))].append(p)
    out: dict[str, tuple[int, ...]] = {}
    for items in groups.values():
        if len(items) < 2:
            continue
        rows = [lm.tokenizer.encode(p.prompt, add_special_tokens=special) for p in items]
        prefix = tuple(common_prefix(rows))
        if len(prefix) < MIN_PREFIX_TOKENS:
            continue
        for p in items:
            out[p.question.id] = prefix
    return out
