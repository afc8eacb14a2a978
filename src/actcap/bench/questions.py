"""Benchmark questions and benchmarks: the data every loader produces and the runner consumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actcap.errors import BenchmarkError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Question:
    """One benchmark item."""

    id: str
    """Unique within its benchmark; names the sample's activation file."""
    question: str
    """The question text."""
    answer: str
    """The reference answer: a letter for multiple choice, else the expected text or number."""
    choices: tuple[str, ...] | None = None
    """Answer options for multiple choice."""
    category: str = ""
    """Subject or category, for per-category accuracy."""
    grader: str | None = None
    """This question's own default grader, when it differs from the benchmark's."""
    references: tuple[str, ...] = ()
    """Further acceptable answers (TruthfulQA's correct answers)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else the source had."""

    @property
    def is_multiple_choice(self) -> bool:
        """Whether the question has answer options."""
        return bool(self.choices)

    @property
    def answer_index(self) -> int | None:
        """Index of the correct choice for multiple choice."""
        if not self.choices:
            return None
        letter = self.answer.strip().upper()
        if len(letter) == 1 and letter in LETTERS[: len(self.choices)]:
            return LETTERS.index(letter)
        if self.answer in self.choices:
            return self.choices.index(self.answer)
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], index: int = 0) -> Question:
        """Build from a plain dict (``question``, ``answer``, optional ``choices``, ``id``, ``category``).

        Raises:
            BenchmarkError: When the question or answer is missing.
        """
        text = data.get("question")
        if not isinstance(text, str) or not text.strip():
            raise BenchmarkError(f"Question {index}: missing or empty 'question' field.")
        answer = data.get("answer", data.get("reference"))
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise BenchmarkError(f"Question {index}: missing or empty 'answer' field.")
        choices = data.get("choices")
        return cls(
            id=str(data.get("id", f"q{index:05d}")),
            question=text,
            answer=str(answer),
            choices=tuple(str(c) for c in choices) if choices else None,
            category=str(data.get("category", "") or ""),
            grader=data.get("grader"),
            references=tuple(str(r) for r in data.get("references", ()) or ()),
        )

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready view for the manifest."""
        return {
            "question": self.question,
            "reference": self.answer,
            "choices": list(self.choices) if self.choices else None,
            "category": self.category,
        }


@dataclass(frozen=True)
class Benchmark:
    """A named list of questions with its few-shot pool and defaults."""

    name: str
    """What the user asked for (``mmlu:path``, ``demo``, ...)."""
    questions: list[Question]
    """The questions to answer, in order."""
    few_shot: dict[str, list[Question]] = field(default_factory=dict)
    """Few-shot examples per category (``""`` for all); MMLU's dev split."""
    default_grader: str | None = None
    """The grader to use when neither the user nor the question names one."""
    description: str = ""
    """One line on the source."""

    def __post_init__(self) -> None:
        """Refuse an empty benchmark and duplicate ids."""
        if not self.questions:
            raise BenchmarkError(f"Benchmark {self.name!r} has no questions.")
        seen: set[str] = set()
        dups = [q.id for q in self.questions if q.id in seen or seen.add(q.id)]  # type: ignore[func-returns-value]
        if dups:
            raise BenchmarkError(
                f"Benchmark {self.name!r} has duplicate ids: {', '.join(map(repr, dups[:5]))}"
                f"{' ...' if len(dups) > 5 else ''}. Ids name the sample files, so each must be unique."
            )

    def shots_for(self, question: Question, k: int) -> Sequence[Question]:
        """``k`` few-shot examples for ``question``: its category's dev examples, else other questions.

        Raises:
            BenchmarkError: When fewer than ``k`` examples are available.
        """
        if k <= 0:
            return []
        pool = self.few_shot.get(question.category) or self.few_shot.get("")
        if not pool:
            # No dev split: take other questions of the same category, never the question itself.
            pool = [
                q for q in self.questions if q.id != question.id and q.category == question.category
            ]
        if len(pool) < k:
            raise BenchmarkError(
                f"Benchmark {self.name!r}: {k}-shot asked, but only {len(pool)} examples are available "
                f"for category {question.category!r}. Use a smaller --few-shot."
            )
        return pool[:k]

    def limited(self, limit: int | None) -> Benchmark:
        """The first ``limit`` questions (all when None)."""
        if limit is None or limit >= len(self.questions):
            return self
        if limit < 1:
            raise BenchmarkError(f"--limit must be at least 1, got {limit}.")
        return Benchmark(
            self.name, self.questions[:limit], self.few_shot, self.default_grader, self.description
        )
