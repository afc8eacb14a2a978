"""Comparisons: two files site by site, all samples of a run for one site, correct against incorrect."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from actcap.analysis.stats import site_values
from actcap.analysis.vectors import (
    Reduce,
    SampleVectors,
    cosine_matrix,
    load_vectors,
    reduce_tokens,
    spread,
)
from actcap.errors import IncompatibleInputsError, NotEnoughSamplesError
from actcap.storage.format import SampleSource
from actcap.storage.names import site_sort_key
from actcap.storage.reader import ActivationFile


@dataclass(frozen=True)
class SiteComparison:
    """Cosine similarities of one site between two files."""

    site: str
    """Site name."""
    last_token: float
    """Cosine of the last tokens' vectors."""
    mean_tokens: float
    """Cosine of the mean vectors over tokens."""
    per_token: list[float] | None
    """Token by token, when both files hold the same tokens (``None`` otherwise)."""


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1))


def compare_files(a: SampleSource, b: SampleSource) -> list[SiteComparison]:
    """Per-site cosine similarity between two activation files (the sites they share).

    Raises:
        FormatError: When a file is unreadable or a shared site holds no values.
        ActcapError: When the files share no site.
    """
    out = []
    with ActivationFile(a) as fa, ActivationFile(b) as fb:
        same_tokens = (
            "input_ids" in fa.names
            and "input_ids" in fb.names
            and torch.equal(fa.get("input_ids"), fb.get("input_ids"))
        )
        for site in sorted(set(fa.sites) & set(fb.sites), key=site_sort_key):
            x, y = site_values(fa, site), site_values(fb, site)
            per_token = None
            if same_tokens and x.dim() == 2 and x.shape == y.shape:
                per_token = torch.nn.functional.cosine_similarity(
                    x.float(), y.float(), dim=-1
                ).tolist()
            out.append(
                SiteComparison(
                    site,
                    _cos(reduce_tokens(x, "last"), reduce_tokens(y, "last")),
                    _cos(reduce_tokens(x, "mean"), reduce_tokens(y, "mean")),
                    per_token,
                )
            )
    if not out:
        raise IncompatibleInputsError(
            f"{a} and {b} share no site to compare; compare two files captured at the same sites."
        )
    return out


@dataclass(frozen=True)
class SimilarityMatrix:
    """Cosine similarity between every pair of samples for one site."""

    site: str
    """Site name."""
    ids: list[str]
    """Sample ids (rows and columns)."""
    matrix: np.ndarray
    """``(samples, samples)``."""
    correct: list[bool | None]
    """Each sample's grade."""
    total: int = 0
    """Samples available: more than ``ids`` when the matrix was made of a subsample."""


SIMILARITY_SAMPLES = 500
"""Samples in a similarity matrix by default: spread evenly over the run (500 x 500 is 1 MB)."""


def similarity_matrix(
    directory: str | os.PathLike[str],
    site: str,
    how: Reduce = "last",
    vectors: SampleVectors | None = None,
    max_samples: int = SIMILARITY_SAMPLES,
) -> SimilarityMatrix:
    """The cross-sample cosine similarity of one site's (last-token or mean) vectors.

    Of at most ``max_samples`` samples, spread evenly over the run (deterministic); ``total``
    says how many there were.
    """
    vecs = vectors or load_vectors(directory, [site], how)
    sub = vecs.subset(spread(len(vecs.samples), max_samples), [site])
    return SimilarityMatrix(
        site,
        [s.id for s in sub.samples],
        cosine_matrix(sub.vectors[site]),
        [s.correct for s in sub.samples],
        len(vecs.samples),
    )


@dataclass(frozen=True)
class MeanDifference:
    """Difference of mean activations, correct minus incorrect, for one site."""

    site: str
    """Site name."""
    norm: float
    """L2 norm of the difference."""
    n_correct: int
    """Correct samples."""
    n_incorrect: int
    """Incorrect samples."""


def mean_difference_by_layer(
    directory: str | os.PathLike[str], how: Reduce = "last", vectors: SampleVectors | None = None
) -> list[MeanDifference]:
    """Norm of mean(correct) - mean(incorrect) per site (graded samples only).

    Raises:
        NotEnoughSamplesError: When the run lacks correct or incorrect samples.
    """
    vecs = vectors or load_vectors(directory, None, how)
    grades = np.array([s.correct for s in vecs.samples], dtype=object)
    good, bad = grades == True, grades == False  # noqa: E712 - object array, None stays out
    if not good.any() or not bad.any():
        raise NotEnoughSamplesError(
            f"{directory}: needs both correct and incorrect graded samples (has {int(good.sum())} correct, {int(bad.sum())} incorrect)."
        )
    return [
        MeanDifference(
            site,
            float(
                np.linalg.norm(vecs.vectors[site][good].mean(0) - vecs.vectors[site][bad].mean(0))
            ),
            int(good.sum()),
            int(bad.sum()),
        )
        for site in vecs.sites
    ]
