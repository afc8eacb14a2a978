"""Two runs on the same questions: answers side by side, and per-layer cosine of their activations."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from actcap.errors import ActcapError
from actcap.view.aggregate import evenly
from actcap.view.runs import MAX_PAGE, BadRequest, RunView, text_of
from actcap.view.sample import cosine_by_layer, finite

AGREEMENTS = ("all", "differ", "agree", "both_right", "both_wrong", "only_a", "only_b")
"""Filters of the two-run table."""
COSINE_SAMPLES = 100
"""Shared questions averaged for the runs' mean per-layer cosine."""


def _kind(a: bool | None, b: bool | None) -> str:
    if a is None or b is None:
        return "ungraded"
    if a and b:
        return "both_right"
    if not a and not b:
        return "both_wrong"
    return "only_a" if a else "only_b"


class RunPair:
    """Two opened runs joined on their question ids (in the first run's order)."""

    def __init__(self, a: RunView, b: RunView) -> None:
        """Join the runs' manifests (no activation is read)."""
        self.a, self.b = a, b
        self.ids = [e.id for e in a.entries if e.id in b.index]
        self.kinds = {i: _kind(a.entry(i).correct, b.entry(i).correct) for i in self.ids}
        self._lock = threading.Lock()
        self._mean: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """How many questions the runs share, and how their grades agree."""
        counts = {k: 0 for k in ("both_right", "both_wrong", "only_a", "only_b", "ungraded")}
        for k in self.kinds.values():
            counts[k] += 1
        return {
            "a": self.a.label,
            "b": self.b.label,
            "shared": len(self.ids),
            "only_in_a": len(self.a.entries) - len(self.ids),
            "only_in_b": len(self.b.entries) - len(self.ids),
            "counts": counts,
        }

    def page(self, agreement: str, text: str, offset: int, limit: int) -> dict[str, Any]:
        """One page of shared questions with both answers.

        Raises:
            BadRequest: For an unknown agreement filter.
        """
        if agreement not in AGREEMENTS:
            raise BadRequest(
                f"agreement {agreement!r} is unknown; use one of {', '.join(AGREEMENTS)}."
            )
        needle = text.lower()
        rows = [i for i in self.ids if self._selects(i, agreement, needle)]
        offset, limit = max(0, offset), max(1, min(limit, MAX_PAGE))
        return {
            "total": len(self.ids),
            "matched": len(rows),
            "offset": offset,
            "limit": limit,
            "rows": [self._row(i) for i in rows[offset : offset + limit]],
        }

    def _selects(self, sample_id: str, agreement: str, needle: str) -> bool:
        kind = self.kinds[sample_id]
        if agreement == "differ" and kind not in ("only_a", "only_b"):
            return False
        if agreement == "agree" and kind not in ("both_right", "both_wrong"):
            return False
        if agreement not in ("all", "differ", "agree") and kind != agreement:
            return False
        if needle:
            ra, rb = self.a.entry(sample_id).record, self.b.entry(sample_id).record
            texts = (sample_id, ra.get("question"), ra.get("response"), rb.get("response"))
            return any(needle in text_of(t).lower() for t in texts)
        return True

    def _row(self, sample_id: str) -> dict[str, Any]:
        ra, rb = RunView.row(self.a.entry(sample_id)), RunView.row(self.b.entry(sample_id))
        return {
            "id": sample_id,
            "question": ra["question"],
            "reference": ra["reference"],
            "a": {k: ra[k] for k in ("response", "correct", "captured")},
            "b": {k: rb[k] for k in ("response", "correct", "captured")},
        }

    def question(self, sample_id: str) -> dict[str, Any]:
        """One shared question: both records, and the per-layer cosine of its two samples.

        Raises:
            UnknownNameError: When either run lacks the question.
        """
        ea, eb = self.a.entry(sample_id), self.b.entry(sample_id)
        out: dict[str, Any] = {
            "id": sample_id,
            "a": {k: v for k, v in ea.record.items() if k not in ("file", "offset", "length")},
            "b": {k: v for k, v in eb.record.items() if k not in ("file", "offset", "length")},
        }
        try:
            out["cosine"] = cosine_by_layer(self.a.source(sample_id), self.b.source(sample_id))
        except ActcapError as e:
            out["cosine_message"] = str(e)
        return out

    def mean_cosine(self) -> dict[str, Any]:
        """Per layer, the mean cosine of the two runs' samples over up to 100 shared questions."""
        with self._lock:
            if self._mean is None:
                self._mean = self._compute_mean()
            return self._mean

    def _compute_mean(self) -> dict[str, Any]:
        captured = [i for i in self.ids if self.a.entry(i).file and self.b.entry(i).file]
        picked = [captured[j] for j in evenly(len(captured), COSINE_SAMPLES)]
        sites: list[str] | None = None
        last: list[list[float | None]] = []
        mean: list[list[float | None]] = []
        for sample_id in picked:
            try:
                c = cosine_by_layer(self.a.source(sample_id), self.b.source(sample_id))
            except ActcapError as e:
                return {"available": False, "message": str(e)}
            if sites is None:
                sites = c["sites"]
            if c["sites"] != sites:
                continue
            last.append(c["last"])
            mean.append(c["mean"])
        if sites is None:
            return {"available": False, "message": "the runs share no question with activations."}

        def average(rows: list[list[float | None]]) -> list[float | None]:
            x = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
            ok = np.isfinite(x)
            count, total = ok.sum(axis=0), np.where(ok, x, 0.0).sum(axis=0)
            return finite(t / c if c else math.nan for t, c in zip(total, count, strict=True))

        return {
            "available": True,
            "sites": sites,
            "last": average(last),
            "mean": average(mean),
            "n": len(last),
        }
