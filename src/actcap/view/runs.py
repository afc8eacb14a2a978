"""One run as the viewer sees it: its summary and its question table, filtered, sorted and paged.

The manifest entries stay in memory (one small line per question); activations never do: a sample
is opened only when a request asks for it (:meth:`RunView.source`), through the manifest's checked
path. Sample ids are looked up in the manifest, never used as paths.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actcap.errors import ActcapError, NoActivationsError, UnknownNameError
from actcap.storage import ManifestEntry, RunInfo, open_run

MAX_PAGE = 200
"""The most rows one page of the question table holds."""
TEXT_CELL = 300
"""Characters of a question or answer shown in a table cell (the question view shows them whole)."""
SORT_FIELDS = ("order", "id", "category", "correct", "score", "question", "response", "reference")
"""Columns the question table sorts by (``order``: as the manifest lists them)."""
GRADES = ("all", "right", "wrong", "ungraded")
_CACHED_QUERIES = 16


class BadRequest(ActcapError):
    """A request the viewer cannot answer as asked (an unknown parameter value)."""


@dataclass(frozen=True)
class Query:
    """What the question table shows: a filter and an order."""

    grade: str = "all"
    """``all``, ``right``, ``wrong`` or ``ungraded``."""
    category: str = ""
    """Only this category (empty: all)."""
    text: str = ""
    """Only questions whose id, question, answer or reference contain this (case-insensitive)."""
    sort: str = "order"
    """One of :data:`SORT_FIELDS`."""
    descending: bool = False
    """Largest first."""

    def check(self) -> None:
        """Refuse an unknown grade or sort column.

        Raises:
            BadRequest: Naming the value and the choices.
        """
        if self.grade not in GRADES:
            raise BadRequest(f"grade {self.grade!r} is unknown; use one of {', '.join(GRADES)}.")
        if self.sort not in SORT_FIELDS:
            raise BadRequest(f"sort {self.sort!r} is unknown; use one of {', '.join(SORT_FIELDS)}.")


def _sort_key(value: Any) -> tuple[int, float, str]:
    """A key that orders numbers, then text, then missing values, without comparing across types."""
    if isinstance(value, bool):
        return (0, float(value), "")
    if isinstance(value, int | float):
        return (0, float(value), "")
    if value is None or value == "":
        return (2, 0.0, "")
    return (1, 0.0, str(value).lower())


def text_of(value: Any) -> str:
    """A record value as text (a reference may be a number or a list)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(text_of(v) for v in value)
    return str(value)


def _short(value: Any, n: int = TEXT_CELL) -> str:
    text = text_of(value)
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _grade_of(entry: ManifestEntry) -> str:
    correct = entry.correct
    return "ungraded" if correct is None else ("right" if correct else "wrong")


def accuracy_of(entries: Sequence[ManifestEntry]) -> dict[str, Any]:
    """Accuracy overall and per category, from the manifest's grades."""
    graded = [e for e in entries if e.correct is not None]
    per: dict[str, list[int]] = {}
    for e in graded:
        counts = per.setdefault(text_of(e.record.get("category")) or "(none)", [0, 0])
        counts[0] += 1
        counts[1] += int(bool(e.correct))
    right = sum(int(bool(e.correct)) for e in graded)
    return {
        "accuracy": right / len(graded) if graded else None,
        "n": len(graded),
        "n_correct": right,
        "per_category": {
            c: {"accuracy": r / n, "n": n, "n_correct": r} for c, (n, r) in sorted(per.items())
        },
    }


class RunView:
    """A run opened for viewing: config, results, manifest entries and an id index."""

    def __init__(self, root: str | os.PathLike[str], label: str | None = None) -> None:
        """Open a run (its manifest lines; no activation is read).

        Raises:
            FormatError: When ``root`` is no run, or its records are unreadable.
        """
        self.info: RunInfo = open_run(root)
        self.root = self.info.root
        self.label = label or os.fspath(root)
        self.entries = self.info.entries
        self.index = {e.id: i for i, e in enumerate(self.entries)}
        self._queries: OrderedDict[Query, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self._real_root = None if isinstance(self.root, str) else os.path.realpath(self.root)

    @property
    def config(self) -> dict[str, Any]:
        """``run.json``."""
        return self.info.config

    def entry(self, sample_id: str) -> ManifestEntry:
        """The manifest entry of a sample id.

        Raises:
            UnknownNameError: When the run has no such sample.
        """
        i = self.index.get(sample_id)
        if i is None:
            raise UnknownNameError(f"{self.label}: no sample {sample_id!r} in this run.")
        return self.entries[i]

    def source(self, sample_id: str) -> Any:
        """Where a sample's activations are (a file or a shard slice), checked to be in the run.

        Raises:
            UnknownNameError: When the run has no such sample.
            NoActivationsError: When the sample was answered without capture.
            FormatError: When its manifest line leads out of the run or is corrupt.
        """
        entry = self.entry(sample_id)
        where = entry.source(self.root, self._real_root)
        if where is None:
            raise NoActivationsError(
                f"{self.label}: sample {sample_id!r} has no activations (answered with --no-capture)."
            )
        return where

    def summary(self) -> dict[str, Any]:
        """What the run page shows above the table: accuracy, model, options, verification."""
        c = self.config
        results = self.info.results or {}
        score = accuracy_of(self.entries)
        if isinstance(results.get("per_category"), dict) and "accuracy" in results:
            score = score_of(results)
        categories = Counter(text_of(e.record.get("category")) for e in self.entries)
        return {
            "label": self.label,
            "root": os.fspath(self.root),
            "model": c.get("model"),
            "model_source": c.get("model_source"),
            "benchmark": c.get("benchmark"),
            "n_questions": c.get("n_questions"),
            "n_samples": len(self.entries),
            "n_captured": sum(1 for e in self.entries if e.file),
            "finished": self.info.results is not None,
            "started": c.get("started"),
            "storage": c.get("storage"),
            "capture": c.get("capture"),
            "options": c.get("options"),
            "compute": c.get("compute"),
            "versions": c.get("versions"),
            "sites": [text_of(x) for x in sites]
            if isinstance(sites := c.get("sites"), list)
            else [],
            "score": score,
            "categories": sorted(k for k in categories if k),
            "verification": verification_of(results.get("verification")),
            "wall_seconds": number_or_none(results.get("wall_seconds")),
        }

    def page(self, query: Query, offset: int, limit: int) -> dict[str, Any]:
        """One page of the question table: at most :data:`MAX_PAGE` rows, and how many match.

        Raises:
            BadRequest: For an unknown grade or sort column.
        """
        query.check()
        rows = self._matching(query)
        offset = max(0, offset)
        limit = max(1, min(limit, MAX_PAGE))
        return {
            "total": len(self.entries),
            "matched": len(rows),
            "offset": offset,
            "limit": limit,
            "rows": [self.row(self.entries[i]) for i in rows[offset : offset + limit]],
        }

    @staticmethod
    def row(e: ManifestEntry) -> dict[str, Any]:
        """One table row, its long texts shortened."""
        r = e.record
        return {
            "id": e.id,
            "category": text_of(r.get("category")),
            "question": _short(r.get("question") or r.get("prompt")),
            "response": _short(r.get("response")),
            "reference": _short(r.get("reference"), 120),
            "correct": e.correct,
            "score": r.get("score") if isinstance(r.get("score"), int | float) else None,
            "captured": bool(e.file),
        }

    def _matching(self, query: Query) -> list[int]:
        """Indices of the entries a query selects, in its order (the last few queries cached)."""
        with self._lock:
            if query in self._queries:
                self._queries.move_to_end(query)
                return self._queries[query]
        rows = [i for i, e in enumerate(self.entries) if _selects(query, e)]
        if query.sort != "order":
            field = query.sort
            key: Callable[[int], Any] = (
                (lambda i: _sort_key(self.entries[i].id))
                if field == "id"
                else (lambda i: _sort_key(self.entries[i].record.get(field)))
            )
            rows.sort(key=key, reverse=query.descending)
        elif query.descending:
            rows.reverse()
        with self._lock:
            self._queries[query] = rows
            while len(self._queries) > _CACHED_QUERIES:
                self._queries.popitem(last=False)
        return rows


def _selects(query: Query, e: ManifestEntry) -> bool:
    """Whether an entry passes a query's filters."""
    if query.grade != "all" and _grade_of(e) != query.grade:
        return False
    r = e.record
    if query.category and text_of(r.get("category")) != query.category:
        return False
    if query.text:
        needle = query.text.lower()
        fields = (e.id, r.get("question"), r.get("response"), r.get("reference"))
        return any(needle in text_of(v).lower() for v in fields)
    return True


def number_or_none(value: Any) -> float | int | None:
    """A finite number from a file, or None for anything else (text, a list, NaN, a huge int)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an int beyond a float
        return None


def count_or_none(value: Any) -> int | None:
    """A non-negative int from a file, or None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None


def score_of(results: dict[str, Any]) -> dict[str, Any]:
    """``results.json``'s accuracy, counts and per-category rows: numbers or None, never text."""
    per = results.get("per_category")
    rows = {}
    for cat, row in per.items() if isinstance(per, dict) else []:
        row = row if isinstance(row, dict) else {}
        rows[text_of(cat)] = {
            "accuracy": number_or_none(row.get("accuracy")),
            "n": count_or_none(row.get("n")),
            "n_correct": count_or_none(row.get("n_correct")),
        }
    return {
        "accuracy": number_or_none(results.get("accuracy")),
        "n": count_or_none(results.get("n")),
        "n_correct": count_or_none(results.get("n_correct")),
        "per_category": rows,
    }


def verification_of(data: Any) -> dict[str, Any] | None:
    """The verdict of ``results.json["verification"]``, in brief (None when there is none)."""
    if not isinstance(data, dict):
        return None
    problems = data.get("problems") or []
    passed = data.get("passed")
    return {
        "passed": passed if isinstance(passed, bool) else None,
        "n_checked": count_or_none(data.get("n_checked")),
        "n_samples": count_or_none(data.get("n_samples")),
        "tolerance": number_or_none(data.get("tolerance")),
        "problems": [text_of(p) for p in problems[:10]] if isinstance(problems, list) else [],
    }


def label_for(root: str | os.PathLike[str]) -> str:
    """A short name for a run: its folder's name, or the URL as given."""
    text = os.fspath(root)
    return text if "://" in text else (Path(text).resolve().name or text)
