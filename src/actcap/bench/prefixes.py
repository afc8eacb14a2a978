"""Which token prefix each question's prompt shares with the others of its group.

Prompts of one category and mode (one MMLU subject with its few-shot examples, GSM8K with its
worked examples) begin with the same tokens; the run writer stores those tokens' activations once
(:mod:`actcap.storage.prefixes`). The prefix of a group is found before any question is answered,
from the prompts of the group's first :data:`GROUP_SAMPLE` questions in the whole benchmark (not
only those of this session), so that it does not depend on batching, ``--limit`` or a resume:
their common text, tokenised, less its last token (where the tokenisation of the rest of a
prompt may merge), cut to what a real prompt's tokens begin with. The writer checks each
sample's own token ids against it, so a prompt tokenised differently simply keeps all its rows.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from actcap.bench.prompts import build_prompt
from actcap.bench.questions import Benchmark, Question
from actcap.bench.runner import EvalOptions, mode_for
from actcap.errors import BenchmarkError
from actcap.models.chat import adds_special_tokens
from actcap.models.loading import LoadedModel
from actcap.storage.prefixes import MIN_PREFIX_TOKENS, common_prefix

GROUP_SAMPLE = 256
"""Questions of a group whose prompts decide its prefix (the first ones, in benchmark order)."""


class PlannedPrompt(Protocol):
    """What this module needs of a planned question."""

    @property
    def question(self) -> Question: ...  # noqa: D102

    @property
    def mode(self) -> str: ...  # noqa: D102

    @property
    def prompt(self) -> str: ...  # noqa: D102


def _group(mode: str, q: Question) -> tuple[str, str]:
    return mode, str(q.category or "")


def shared_prefixes(
    lm: LoadedModel,
    plan: Sequence[PlannedPrompt],
    benchmark: Benchmark,
    options: EvalOptions,
) -> dict[str, tuple[int, ...]]:
    """Question id (of ``plan``) to the token ids its prompt shares with the rest of its group.

    Args:
        lm: The model (its tokenizer).
        plan: The questions to answer now, with their exact prompts.
        benchmark: Every question of the benchmark, before ``--limit``: the groups' prefixes are
            decided on them.
        options: How prompts are built (few-shot, chat, mode).

    Groups of one question, and common prefixes shorter than
    :data:`~actcap.storage.prefixes.MIN_PREFIX_TOKENS`, share nothing.
    """
    special = adds_special_tokens(lm.tokenizer)
    wanted: dict[tuple[str, str], list[PlannedPrompt]] = defaultdict(list)
    for p in plan:
        wanted[_group(p.mode, p.question)].append(p)
    texts: dict[tuple[str, str], list[str]] = defaultdict(list)
    for q in benchmark.questions:
        try:
            mode = mode_for(q, options.mode)
        except BenchmarkError:
            continue  # beyond this run's questions, which are checked when planned
        key = _group(mode, q)
        if key in wanted and len(texts[key]) < GROUP_SAMPLE:
            shots = benchmark.shots_for(q, options.few_shot)
            texts[key].append(build_prompt(lm.tokenizer, q, shots, mode, options.chat))
    out: dict[str, tuple[int, ...]] = {}
    for key, items in wanted.items():
        if len(texts[key]) < 2:
            continue
        common = os.path.commonprefix(texts[key])
        candidate = lm.tokenizer.encode(common, add_special_tokens=special)[:-1]
        real = lm.tokenizer.encode(items[0].prompt, add_special_tokens=special)
        prefix = tuple(common_prefix([candidate, real]))
        if len(prefix) >= MIN_PREFIX_TOKENS:
            out.update({p.question.id: prefix for p in items})
    return out
