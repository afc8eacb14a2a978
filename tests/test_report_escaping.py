"""The HTML report escapes every value that comes from a run, and survives odd results.json values.

A run's manifest, results and config are data anyone can edit (or craft): none of it may become
markup or script in the reader's browser. The browser itself checks the same page in
``tests/test_report_browser.py``; here the page is parsed with the standard library.
"""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from actcap.analysis import build_report
from actcap.cli.main import cli
from actcap.storage import RunWriter, SampleMeta

SITE = "<img src=x onerror=window.pwned=7> $\\nope$"
"""A hostile site name; the ``$...$`` would also break matplotlib's mathtext."""
HOSTILE = {
    "id": "<svg onload=window.pwned=5>",
    "question": "<script>window.pwned=1</script>",
    "response": '<img src=x onerror="window.pwned=2">',
    "reference": "<iframe src=javascript:window.pwned=9></iframe>",
    "category": "</td><script>window.pwned=4</script>",
}
CORRECT = ["x' onmouseover='window.pwned=3' data-x='", 'x" onmouseover=alert(1) "']
"""``correct`` values that broke out of the row's attribute (single- and double-quoted)."""
CONFIG = {
    "model": "</pre><script>window.pwned=6</script>",
    "benchmark": "<img src=x onerror=window.pwned=8>",
    "capture": {"note": "'\"><script>alert(1)</script>"},
}
RESULTS = {
    "accuracy": "<img src=x onerror=window.pwned=13>",  # not a number: shown as unknown
    "n": "<b>8</b>",
    "n_correct": "<script>window.pwned=10</script>",
    "per_category": {
        "<script>window.pwned=11</script>": {"accuracy": 0.5, "n": "<i onclick=alert(1)>2</i>"},
        "plain": "<script>window.pwned=12</script>",
    },
}


def hostile_run(root: Path) -> Path:
    """A run whose every text field is an attempt at markup or script (8 samples, 4 sites)."""
    gen = torch.Generator().manual_seed(0)
    with RunWriter.open(root, CONFIG) as run:
        for i in range(8):
            record = {
                "question": HOSTILE["question"],
                "response": HOSTILE["response"],
                "reference": HOSTILE["reference"],
                "category": HOSTILE["category"] if i % 2 else "plain",
                "correct": CORRECT[i] if i < 2 else i % 2 == 0,
            }
            acts = {
                "embeddings": torch.randn(3, 8, generator=gen),
                "layer_0": torch.randn(3, 8, generator=gen),
                "layer_1": torch.randn(3, 8, generator=gen),
                SITE: torch.randn(3, 8, generator=gen),
            }
            sample_id = HOSTILE["id"] if i == 0 else f"s{i}"
            run.write_sample(sample_id, record, acts, SampleMeta("p"), input_ids=torch.arange(3))
        run.write_results(RESULTS)
    return root


class _Page(HTMLParser):
    """The elements, attributes and text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend((tag, k, v) for k, v in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def test_run_values_are_text_never_markup(tmp_path):
    run = hostile_run(tmp_path / "run")
    page = parse(build_report(run, tmp_path / "report.html"))
    assert page.tags.count("script") == 1  # the report's own
    assert not {"svg", "iframe", "i"} & set(page.tags)
    images = [v for tag, k, v in page.attrs if tag == "img" and k == "src"]
    assert images and all(v and v.startswith("data:image/png;base64,") for v in images)
    assert not [(t, k) for t, k, _ in page.attrs if k.startswith("on")]
    rows = [v for t, k, v in page.attrs if t == "tr" and k == "data-correct"]
    assert rows[:2] == ["unknown", "unknown"] and set(rows[2:]) == {"true", "false"}
    text = "".join(page.text)
    for value in [*HOSTILE.values(), *CORRECT, CONFIG["model"], SITE]:
        assert value in text, value  # shown literally
    assert "window.pwned=11" in text and "<b>8</b>" in text


@pytest.mark.parametrize("accuracy", ["high", None, [0.5], float("nan")])
def test_a_non_number_accuracy_is_shown_as_unknown(tmp_path, accuracy):
    run = hostile_run(tmp_path / "run")
    results = {**RESULTS, "accuracy": accuracy}
    (run / "results.json").write_text(json.dumps(results))
    r = CliRunner().invoke(cli, ["report", str(run), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert "id='accuracy'>unknown</span>" in page and "not a number" in page


def test_results_that_are_not_an_object(tmp_path):
    """Either a page with the accuracy unknown, or a one-line error naming results.json."""
    run = hostile_run(tmp_path / "run")
    (run / "results.json").write_text("[1, 2]")
    r = CliRunner().invoke(cli, ["report", str(run), "-o", str(tmp_path / "r.html")])
    if r.exit_code == 0:
        assert "accuracy unknown" in (tmp_path / "r.html").read_text()
    else:
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        assert r.output.startswith("Error: ") and "results.json" in r.output
        assert len(r.output.strip().splitlines()) == 1


HOSTILE_CHECKS = [
    {"nonfinite": {"values": 1, "sites": 5}},
    {"nonfinite": {"values": "<b>x</b>", "sites": "layer_0"}},
    {"nonfinite": [1, 2]},
    {"nonfinite": "all"},
    {"nonfinite": {"values": 10**400, "sites": {"a": 1}}},
    {"verification": {"passed": True, "sites": 5, "n_checked": [1], "tolerance": "x"}},
    {"verification": {"passed": False, "sites": {"a": {"max_rel": 10**400}}, "problems": 3}},
    {"verification": {"passed": "yes", "sites": {"a": [1], "b": {"max_rel": "big"}}}},
    {"verification": {"passed": True, "sites": {"a": {"max_rel": 1}, "b": {"max_rel": 0.5}}}},
    {"verification": [1], "per_category": 5},
    {"per_category": {"a": [1], "b": {"accuracy": 10**400, "n": {"x": 1}}}},
    {"accuracy": 10**400, "n": None},
    {"accuracy": [[[[1]]]] * 100},
]
"""results.json's optional fields in shapes actcap never writes (one crashed the report)."""


@pytest.mark.parametrize("results", HOSTILE_CHECKS)
def test_unexpected_shapes_of_optional_results_show_as_unknown(results):
    from actcap.analysis.report import _checks_html, _results_html

    page = "".join([*_results_html(results), *_checks_html(results)])
    assert "<b>" not in page  # still escaped
    if isinstance(results.get("nonfinite"), dict):
        assert "id='nonfinite'" in page and "inf/nan" in page
    elif "nonfinite" in results:
        assert "unknown" in page
    if results.get("accuracy", 0) != 0:
        assert "id='accuracy'>unknown</span>" in page and len(page) < 2_000


def test_report_on_a_nonfinite_field_of_odd_shape(tmp_path):
    """The reviewer's case: ``"nonfinite": {"values": 1, "sites": 5}`` was a TypeError traceback."""
    run = hostile_run(tmp_path / "run")
    results = {**RESULTS, "accuracy": 0.5, "nonfinite": {"values": 1, "sites": 5}}
    (run / "results.json").write_text(json.dumps(results))
    r = CliRunner().invoke(cli, ["report", str(run), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert "1 activation values were stored as inf/nan" in page and "sites: unknown" in page
