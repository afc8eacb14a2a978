"""One vector per sample and site: the building block of similarity matrices, probes and PCA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from actcap.analysis.sources import SampleRef, Skipped, iter_open, list_samples
from actcap.errors import ActcapError, UnknownNameError
from actcap.storage.files import site_sort_key

Reduce = Literal["last", "mean"]


def reduce_tokens(t: Tensor, how: Reduce = "last") -> Tensor:
    """``(tokens, hidden)`` to ``(hidden,)``; a stored ``(hidden,)`` vector is returned as it is."""
    t = t.float()
    if t.dim() == 1:
        return t
    return t[-1] if how == "last" else t.mean(dim=0)


@dataclass
class SampleVectors:
    """Vectors of several sites for the samples of a directory, aligned row by row."""

    samples: list[SampleRef]
    """The samples read, in order (rows)."""
    vectors: dict[str, np.ndarray]
    """Site to ``(samples, hidden)`` float32."""
    skipped: Skipped
    """Files that could not be read."""

    @property
    def sites(self) -> list[str]:
        """Sites, in network order."""
        return sorted(self.vectors, key=site_sort_key)


def load_vectors(
    directory: str | os.PathLike[str],
    sites: list[str] | None = None,
    how: Reduce = "last",
) -> SampleVectors:
    """Read one vector per sample for each site, one file at a time.

    Only the reduced vectors are held, so memory grows with samples x sites x hidden, never with
    tokens. Samples missing one of the sites are skipped and reported.

    Raises:
        UnknownNameError: When none of the requested sites is in the files.
    """
    refs = list_samples(directory)
    skipped = Skipped()
    rows: dict[str, list[np.ndarray]] = {}
    kept: list[SampleRef] = []
    wanted: list[str] | None = sites
    for ref, f in iter_open(refs, skipped):
        if wanted is None:
            wanted = f.sites
        missing = [s for s in wanted if s not in f.sites]
        if missing:
            skipped.add(ref.path, f"no site {missing[0]!r}")
            continue
        try:
            vecs = {s: reduce_tokens(f.get(s), how).numpy() for s in wanted}
        except ActcapError as e:
            skipped.add(ref.path, str(e))
            continue
        for s, v in vecs.items():
            rows.setdefault(s, []).append(v)
        kept.append(ref)
    if not kept:
        raise UnknownNameError(
            f"{directory}: no readable sample holds the sites {wanted}. "
            f"{len(skipped)} file(s) skipped."
            + (f" First: {skipped.files[0][1]}" if skipped.files else "")
        )
    return SampleVectors(
        kept, {s: np.stack(v).astype(np.float32) for s, v in rows.items()}, skipped
    )


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``x``."""
    t = torch.from_numpy(x).float()
    t = torch.nn.functional.normalize(t, dim=1)
    return (t @ t.T).numpy()
