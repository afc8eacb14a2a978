"""Run-wide statistics over a bounded sample of a run: directions, averages, probes, similarity.

A run of 100,000 questions is not read whole: :func:`bounded_sample` picks at most ``n`` captured
questions, spread evenly over the run within each grade, and their last-token vectors are read
once (through :func:`actcap.analysis.load_vectors`) and kept for the server's life.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from actcap.analysis import SampleRef, SampleVectors, load_vectors, probe_layers, similarity_matrix
from actcap.errors import ActcapError, FormatError, NoActivationsError, NotEnoughSamplesError
from actcap.storage import ActivationFile, ManifestEntry
from actcap.view.runs import RunView
from actcap.view.sample import check_site, finite, layer_sites

DEFAULT_SAMPLES = 300
"""Questions read for run-wide statistics, unless ``--max-samples`` says otherwise."""
SIMILARITY_MAX = 200
"""Questions in a similarity matrix (200 x 200 cells)."""
PROBE_TARGETS = ("correct", "category")


def evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included (all when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [0][:k]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def bounded_sample(entries: Sequence[ManifestEntry], n: int) -> list[ManifestEntry]:
    """At most about ``n`` captured entries: each grade in its share (at least 10), spread evenly.

    Deterministic, in manifest order.
    """
    groups: dict[bool | None, list[int]] = {}
    for i, e in enumerate(entries):
        if e.file:
            groups.setdefault(e.correct, []).append(i)
    total = sum(len(g) for g in groups.values())
    chosen: list[int] = []
    for members in groups.values():
        quota = max(min(10, len(members)), round(n * len(members) / max(total, 1)))
        chosen += [members[j] for j in evenly(len(members), quota)]
    return [entries[i] for i in sorted(chosen)]


class RunStats:
    """The bounded sample of one run and what is computed from it, computed once and cached.

    Each statistic has its own lock, so a slow one (probes) does not hold up the others.
    """

    def __init__(self, view: RunView, max_samples: int = DEFAULT_SAMPLES) -> None:
        """Nothing is read until a statistic is asked for."""
        self.view = view
        self.max_samples = max_samples
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, ...], threading.Lock] = {}
        self._cache: dict[tuple[str, ...], Any] = {}

    def _cached(self, key: tuple[str, ...], compute: Callable[[], Any]) -> Any:
        """``compute()``, once per key (an error is raised again on the next call, not kept)."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]

    def vectors(self) -> SampleVectors:
        """Last-token vectors of every residual site for the bounded sample (read once).

        Raises:
            NoActivationsError: When the run has no readable activations.
        """
        return self._cached(("vectors",), self._read_vectors)  # type: ignore[no-any-return]

    def _read_vectors(self) -> SampleVectors:
        refs = []
        for e in bounded_sample(self.view.entries, self.max_samples):
            try:
                refs.append(SampleRef(e.id, self.view.source(e.id), e.record))
            except FormatError:
                continue  # a corrupt manifest line: left out, as every reader does
        if not refs:
            raise NoActivationsError(f"{self.view.label}: no question has readable activations.")
        with ActivationFile(refs[0].path) as f:
            sites = layer_sites(f.sites)
        return load_vectors(self.view.root, sites, "last", samples=refs)

    def _grades(self) -> np.ndarray:
        return np.array([s.correct for s in self.vectors().samples], dtype=object)

    def direction(self, site: str) -> np.ndarray:
        """The unit difference of means, right minus wrong answers, of one site's last tokens.

        Raises:
            UnknownNameError: For a site not in the run.
            ActcapError: When the sample lacks right or wrong answers.
        """

        def compute() -> np.ndarray:
            vecs = self.vectors()
            check_site(site, vecs.sites)
            grades = self._grades()
            right, wrong = grades == True, grades == False  # noqa: E712 - None stays out
            if not right.any() or not wrong.any():
                raise NotEnoughSamplesError(
                    f"{self.view.label}: a direction needs right and wrong answers; the "
                    f"{len(grades)} questions read have {int(right.sum())} right and "
                    f"{int(wrong.sum())} wrong."
                )
            x = np.asarray(vecs.vectors[site], dtype=np.float64)
            diff = x[right].mean(0) - x[wrong].mean(0)
            norm = float(np.linalg.norm(diff))
            unit: np.ndarray = (diff / norm if norm > 0 else diff).astype(np.float32)
            return unit

        return self._cached(("direction", site), compute)  # type: ignore[no-any-return]

    def profile(self, stat: str, site: str | None) -> dict[str, Any]:
        """Per layer, the average last-token statistic over the sample: all, right, wrong.

        Args:
            stat: ``norm`` or ``proj`` (projection on :meth:`direction` of ``site``).
            site: The direction's site, for ``proj``.
        """

        def compute() -> dict[str, Any]:
            vecs = self.vectors()
            d = self.direction(site) if stat == "proj" and site else None
            grades = self._grades()
            out: dict[str, list[float | None]] = {"mean": [], "right": [], "wrong": []}
            for s in vecs.sites:
                x = np.asarray(vecs.vectors[s], dtype=np.float64)
                if d is not None and x.shape[1] != d.shape[0]:
                    for k in out:
                        out[k].append(None)
                    continue
                v = np.linalg.norm(x, axis=1) if d is None else x @ d
                for k, mask in (
                    ("mean", np.ones(len(v), bool)),
                    ("right", grades == True),  # noqa: E712
                    ("wrong", grades == False),  # noqa: E712
                ):
                    out[k] += finite([float(v[mask].mean())]) if mask.any() else [None]
            return {"sites": vecs.sites, "n": len(vecs.samples), **out}

        return self._cached(("profile", stat, site or ""), compute)  # type: ignore[no-any-return]

    def probe(self, target: str) -> dict[str, Any]:
        """Probe accuracy by layer on the sample (``available: False`` with why, when it cannot)."""

        def compute() -> dict[str, Any]:
            try:
                results = probe_layers(self.view.root, target=target, vectors=self.vectors())
            except ActcapError as e:
                return {"available": False, "message": str(e)}
            return {
                "available": True,
                "target": target,
                "sites": [r.site for r in results],
                "accuracy": finite(r.accuracy for r in results),
                "std": finite(r.std for r in results),
                "baseline": finite(r.baseline for r in results),
                "n": results[0].n if results else 0,
                "folds": results[0].folds if results else 0,
                "total": len(self.view.entries),
            }

        return self._cached(("probe", target), compute)  # type: ignore[no-any-return]

    def similarity(self, site: str) -> dict[str, Any]:
        """Cosine similarity of last tokens at one site, right answers first.

        Of at most :data:`SIMILARITY_MAX` questions of the sample, spread evenly.
        """

        def compute() -> dict[str, Any]:
            vecs = self.vectors()
            check_site(site, vecs.sites)
            rows = evenly(len(vecs.samples), SIMILARITY_MAX)
            order = {True: 0, False: 1, None: 2}
            rows.sort(key=lambda i: order[vecs.samples[i].correct])
            m = similarity_matrix(self.view.root, site, vectors=vecs.subset(rows, [site]))
            return {
                "site": site,
                "ids": m.ids,
                "correct": m.correct,
                "matrix": [finite(r) for r in np.asarray(m.matrix, dtype=np.float64).tolist()],
                "total": len(self.view.entries),
            }

        return self._cached(("similarity", site), compute)  # type: ignore[no-any-return]
