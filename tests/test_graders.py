import pytest

from actcap.bench.graders import (
    contains,
    exact_match,
    extract_letter,
    get_grader,
    mc_letter,
    numeric,
    regex,
)
from actcap.errors import UnknownNameError


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The answer is (B).", "B"),
        ("B) Paris", "B"),
        ("B", "B"),
        ("(c)", "C"),
        ("Answer: D", "D"),
        ("I think the answer is A because...", "A"),
        ("C. Pacific Ocean", "C"),
        ("the correct option is (d)", "D"),
        ("No idea at all", None),
    ],
)
def test_extract_letter(response, letter):
    assert extract_letter(response) == letter


def test_mc_letter():
    g = mc_letter("The answer is (B).", "B")
    assert g.correct and g.score == 1.0 and g.extracted == "B"
    assert not mc_letter("B) Paris", "C").correct


@pytest.mark.parametrize(
    ("response", "reference", "ok"),
    [
        ("42.0", "42", True),
        ("$1,234", "1234", True),
        ("The total is 1,234 dollars.", "1234", True),
        ("First 3, then 5, so 8", "8", True),
        ("First 3, then 5, so 8", "5", False),
        ("-7", "-7", True),
        ("0.5", ".5", True),
        ("no number", "3", False),
        ("It costs $18.", "18", True),
    ],
)
def test_numeric(response, reference, ok):
    assert numeric(response, reference).correct is ok


def test_exact_match_normalises():
    assert exact_match("The Paris.", "paris").correct
    assert not exact_match("Paris, France", "Paris").correct


def test_contains_whole_words_and_any_reference():
    assert contains("The capital of France is Paris.", "Paris").correct
    assert not contains("Parisian food", "Paris").correct
    assert contains("It is Rome", ["Paris", "Rome"]).extracted == "Rome"


def test_regex_grader():
    g = regex(r"final answer:\s*(\w+)")
    assert g("... Final answer: Paris", "paris").correct
    assert get_grader(r"regex:(\d+)")("x 12 y", "12").correct


def test_unknown_grader_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'numeric'"):
        get_grader("numerc")
    with pytest.raises(UnknownNameError, match="Bad regex"):
        get_grader("regex:(")
