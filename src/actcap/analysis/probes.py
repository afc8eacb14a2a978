"""Per-layer linear probes: where in the network is a label (e.g. "the answer is right") decodable?"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from actcap.analysis.vectors import Reduce, SampleVectors, load_vectors, spread
from actcap.errors import NotEnoughSamplesError, UnknownNameError, require
from actcap.storage.reader import ActivationFile

PROBE_SAMPLES = 20_000
"""Samples a probe trains and tests on by default: a stratified subsample of larger runs."""


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated accuracy of a logistic-regression probe on one site."""

    site: str
    """Site name."""
    accuracy: float
    """Mean accuracy over the folds."""
    std: float
    """Its standard deviation over the folds."""
    baseline: float
    """Majority-class accuracy (what a constant guess scores)."""
    n: int
    """Samples used."""
    folds: int
    """Cross-validation folds."""
    labelled: int = 0
    """Samples with a label in a kept class (more than ``n`` when subsampled)."""
    left_out: tuple[tuple[str, int], ...] = ()
    """Classes left out for having fewer than two samples, with their counts."""


def target_values(vectors: SampleVectors, target: str) -> list[Any]:
    """The label of each sample: a manifest field (``correct``, ``category``, ...) or a metadata field."""
    labels = []
    for s in vectors.samples:
        value = s.record.get(target)
        if value is None:
            with ActivationFile(s.path) as f:
                value = f.meta.extra.get(target)
        labels.append(value)
    return labels


def stratified_rows(y: np.ndarray, k: int) -> np.ndarray:
    """At most ``k`` positions of ``y``, each class in its share (at least two), spread evenly.

    Deterministic: the same labels give the same rows.
    """
    if len(y) <= k:
        return np.arange(len(y))
    chosen: list[int] = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        quota = max(2, round(k * len(members) / len(y)))
        chosen.extend(members[spread(len(members), quota)])
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _labels(
    vecs: SampleVectors, directory: str | os.PathLike[str], target: str
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Rows with a label in a class of at least two samples, their labels, and the classes left out.

    Raises:
        NotEnoughSamplesError: When fewer than two classes remain.
    """
    labels = target_values(vecs, target)
    keep = [i for i, v in enumerate(labels) if v is not None and v != ""]
    y = np.array([str(labels[i]) for i in keep])
    counts = Counter(y.tolist())
    if len(counts) < 2:
        raise NotEnoughSamplesError(
            f"{directory}: target {target!r} has {'one class only' if counts else 'no values'} "
            f"({dict(counts)}); a probe needs at least two."
        )
    left_out = {c: n for c, n in counts.items() if n < 2}
    kept_classes = [c for c in counts if c not in left_out]
    if len(kept_classes) < 2:
        raise NotEnoughSamplesError(
            f"{directory}: too few samples for a probe on {target!r}: {dict(counts)}. Each class "
            "needs at least 2; run more questions."
        )
    mask = np.isin(y, kept_classes)
    return np.asarray(keep, dtype=np.int64)[mask], y[mask], left_out


def probe_layers(
    directory: str | os.PathLike[str],
    target: str = "correct",
    sites: list[str] | None = None,
    how: Reduce = "last",
    folds: int = 5,
    seed: int = 0,
    vectors: SampleVectors | None = None,
    max_samples: int | None = PROBE_SAMPLES,
) -> list[ProbeResult]:
    """Fit a logistic-regression probe per site, k-fold cross-validated, against the majority baseline.

    Classes with a single sample (a category of one question) are left out, and said so in
    :attr:`ProbeResult.left_out`. Sites are probed one at a time, so memory holds one site's
    vectors (see :func:`load_vectors`).

    Args:
        directory: A run directory (labels from its manifest) or folder of files (labels from metadata).
        target: ``correct``, ``category`` or any manifest / metadata field.
        sites: Sites to probe (all by default).
        how: ``last`` token (default) or ``mean`` over tokens.
        folds: Cross-validation folds (stratified).
        seed: Shuffling seed.
        vectors: Pre-loaded vectors (saves a read when plotting too).
        max_samples: Probe a stratified subsample of at most this many samples (spread evenly
            over the run in each class); ``None`` for every sample.

    Raises:
        MissingDependencyError: Without scikit-learn.
        NoActivationsError: When the run has no activations.
        ActcapError: Too few samples, or one class only.
    """
    require("sklearn", "probe", "Probing")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    vecs = vectors or load_vectors(directory, sites, how, dataset=True)
    rows, y, left_out = _labels(vecs, directory, target)
    labelled = len(y)
    if max_samples is not None:
        chosen = stratified_rows(y, max_samples)
        rows, y = rows[chosen], y[chosen]
    counts = Counter(y.tolist())
    k = min(folds, min(counts.values()))
    baseline = max(counts.values()) / len(y)
    probed = vecs.sites if sites is None else [s for s in vecs.sites if s in sites]
    if not probed:
        raise UnknownNameError(
            f"{directory}: none of the sites {sites} is in the run. Sites: {', '.join(vecs.sites)}."
        )
    results = []
    for site in probed:
        x = vecs.vectors[site][rows]
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        scores = cross_val_score(clf, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
        results.append(
            ProbeResult(
                site,
                float(scores.mean()),
                float(scores.std()),
                baseline,
                len(y),
                k,
                labelled,
                tuple(sorted(left_out.items())),
            )
        )
    return results
