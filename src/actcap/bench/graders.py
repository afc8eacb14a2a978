"""Graders: pure functions ``(response, reference) -> Grade``.

A reference is a string or a sequence of acceptable strings (any match counts). Graders never see
a model; the log-likelihood choice is graded from the chosen index the scorer stored.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from actcap.errors import UnknownNameError

Reference = str | Sequence[str]


@dataclass(frozen=True)
class Grade:
    """The verdict on one answer."""

    correct: bool
    """Whether the answer counts as right."""
    score: float
    """1.0 or 0.0 for these graders; partial credit for graders that give it."""
    extracted: str | None
    """What the grader read from the response (a letter, a number), when it extracts anything."""


class Grader(Protocol):
    """A grading function."""

    def __call__(self, response: str, reference: Reference) -> Grade:
        """Grade ``response`` against ``reference``."""
        ...


def _refs(reference: Reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def _grade(ok: bool, extracted: str | None) -> Grade:
    return Grade(ok, 1.0 if ok else 0.0, extracted)


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze whitespace (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(response: str, reference: Reference) -> Grade:
    """Normalised exact match."""
    got = normalize(response)
    return _grade(any(got == normalize(r) for r in _refs(reference)), got)


def contains(response: str, reference: Reference) -> Grade:
    """The normalised reference appears in the normalised response, as whole words."""
    got = normalize(response)
    for r in _refs(reference):
        want = normalize(r)
        if want and re.search(rf"(?<!\w){re.escape(want)}(?!\w)", got):
            return _grade(True, r)
    return _grade(False, None)


_LETTER_PATTERNS = [
    re.compile(r"answer\s*(?:is|:)?\s*(?:option\s*)?\(?([A-J])\)?(?![A-Za-z])", re.I),
    re.compile(r"^\s*\(?([A-J])\)?\s*(?:[).:\-]|$)", re.I),
    re.compile(r"^\s*\(?([A-J])\)?\s"),
    re.compile(r"\(([A-J])\)", re.I),
    re.compile(r"(?<![A-Za-z])([A-J])(?:[).:]|$)"),
]


def extract_letter(response: str) -> str | None:
    """Read a multiple-choice letter: 'The answer is (B).', 'B) Paris', 'B', '(c)'."""
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(response.strip())
        if m:
            return m.group(1).upper()
    return None


def mc_letter(response: str, reference: Reference) -> Grade:
    """Multiple choice: the letter the response gives equals the reference letter."""
    got = extract_letter(response)
    return _grade(got is not None and any(got == r.strip().upper() for r in _refs(reference)), got)


_PLAIN = r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(rf"(?<![\d/]){_PLAIN}/{_PLAIN}(?![\d/])|{_PLAIN}")
"""A number in a response: ``$1,234``, ``-2.5``, ``.5``, or a fraction ``3/4`` (not a date's ``3/4/2020``)."""
_NUMBER_TEXT = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    """'$1,234' -> 1234.0; '42.0' -> 42.0; '3/4' -> 0.75; None when the text is no number."""
    cleaned = text.replace("$", "").replace(",", "").strip().rstrip(".")
    numerator, slash, denominator = cleaned.partition("/")
    parts = [numerator.strip(), denominator.strip()] if slash else [cleaned]
    if not all(_NUMBER_TEXT.fullmatch(part) for part in parts):
        return None
    values = [float(part) for part in parts]
    if slash:
        return values[0] / values[1] if values[1] != 0 else None
    return values[0]


def numeric(response: str, reference: Reference) -> Grade:
    """GSM8K style: the last number in the response equals the reference number."""
    found = _NUMBER.findall(response)
    if not found:
        return _grade(False, None)
    last = found[-1].replace("$", "").replace(",", "")
    got = parse_number(last)
    for r in _refs(reference):
        want = parse_number(r)
        if got is not None and want is not None and abs(got - want) < 1e-6 * max(1.0, abs(want)):
            return _grade(True, last)
    return _grade(False, last)


def regex(pattern: str) -> Grader:
    """A grader whose extracted answer is the first group (or match) of ``pattern``, compared normalised."""
    compiled = re.compile(pattern, re.I | re.S)

    def grade(response: str, reference: Reference) -> Grade:
        m = compiled.search(response)
        if not m:
            return _grade(False, None)
        got = m.group(1) if compiled.groups else m.group(0)
        return _grade(any(normalize(got) == normalize(r) for r in _refs(reference)), got)

    return grade


def choice(response: str, reference: Reference) -> Grade:
    """Log-likelihood multiple choice: the response is the letter the scorer picked."""
    return mc_letter(response, reference)


GRADERS: dict[str, Callable[[str, Reference], Grade]] = {
    "exact": exact_match,
    "contains": contains,
    "mc_letter": mc_letter,
    "numeric": numeric,
    "choice": choice,
}


def get_grader(name: str) -> Callable[[str, Reference], Grade]:
    """Look up a grader by name; ``regex:PATTERN`` builds a regex grader.

    Raises:
        UnknownNameError: For an unknown name, with the closest match and the list.
    """
    if name.startswith("regex:"):
        try:
            return regex(name.removeprefix("regex:"))
        except re.error as e:
            raise UnknownNameError(f"Bad regex in grader {name!r}: {e}.") from None
    if name in GRADERS:
        return GRADERS[name]
    close = difflib.get_close_matches(name, list(GRADERS), n=1)
    raise UnknownNameError(
        f"Unknown grader {name!r}.{f' Did you mean {close[0]!r}?' if close else ''} "
        f"Available: {', '.join(GRADERS)}, regex:PATTERN."
    )
