"""Per-layer linear probes: where in the network is a label (e.g. "the answer is right") decodable?"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from actcap.analysis.vectors import Reduce, SampleVectors, load_vectors
from actcap.errors import ActcapError, require


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


def target_values(vectors: SampleVectors, target: str) -> list[Any]:
    """The label of each sample: a manifest field (``correct``, ``category``, ...) or a metadata field."""
    labels = []
    for s in vectors.samples:
        value = s.record.get(target)
        if value is None:
            from actcap.storage.files import ActivationFile

            with ActivationFile(s.path) as f:
                value = f.meta.extra.get(target)
        labels.append(value)
    return labels


def probe_layers(
    directory: str | os.PathLike[str],
    target: str = "correct",
    sites: list[str] | None = None,
    how: Reduce = "last",
    folds: int = 5,
    seed: int = 0,
    vectors: SampleVectors | None = None,
) -> list[ProbeResult]:
    """Fit a logistic-regression probe per site, k-fold cross-validated, against the majority baseline.

    Args:
        directory: A run directory (labels from its manifest) or folder of files (labels from metadata).
        target: ``correct``, ``category`` or any manifest / metadata field.
        sites: Sites to probe (all by default).
        how: ``last`` token (default) or ``mean`` over tokens.
        folds: Cross-validation folds (stratified).
        seed: Shuffling seed.
        vectors: Pre-loaded vectors (saves a read when plotting too).

    Raises:
        MissingDependencyError: Without scikit-learn.
        ActcapError: Too few samples, or one class only.
    """
    require("sklearn", "probe", "Probing")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    vecs = vectors or load_vectors(directory, sites, how)
    labels = target_values(vecs, target)
    keep = [i for i, v in enumerate(labels) if v is not None and v != ""]
    y = np.array([str(labels[i]) for i in keep])
    counts = Counter(y.tolist())
    if len(counts) < 2:
        raise ActcapError(
            f"{directory}: target {target!r} has {'one class only' if counts else 'no values'} ({dict(counts)}); a probe needs at least two."
        )
    smallest = min(counts.values())
    if len(keep) < 2 * 2 or smallest < 2:
        raise ActcapError(
            f"{directory}: too few samples for a probe on {target!r}: {dict(counts)}. Each class needs at least 2; run more questions."
        )
    k = min(folds, smallest)
    baseline = max(counts.values()) / len(y)
    results = []
    for site in vecs.sites:
        x = vecs.vectors[site][keep]
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        scores = cross_val_score(clf, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
        results.append(
            ProbeResult(site, float(scores.mean()), float(scores.std()), baseline, len(y), k)
        )
    return results
