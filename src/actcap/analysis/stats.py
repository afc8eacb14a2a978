"""Statistics of stored activations: per file and site, and streamed over a whole directory."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from actcap.data.samples import Skipped, iter_site_arrays, list_samples
from actcap.errors import FormatError, TokenPositionError
from actcap.storage.format import SampleSource
from actcap.storage.names import site_sort_key
from actcap.storage.reader import ActivationFile


@dataclass(frozen=True)
class SiteStats:
    """Summary numbers of one site's activations."""

    site: str
    """Site name."""
    shape: tuple[int, ...]
    """Shape in the file (one sample) or ``(n_values,)`` aggregated."""
    mean: float
    """Mean of all values."""
    std: float
    """Standard deviation of all values."""
    min: float
    """Smallest value."""
    max: float
    """Largest value."""
    mean_norm: float
    """Mean L2 norm of one token's vector."""
    frac_zero: float
    """Share of values exactly zero."""
    count: int = 0
    """Values seen."""


def as_tokens(t: Tensor) -> Tensor:
    """``(tokens, hidden)`` view of a stored tensor (a reduced ``(hidden,)`` counts as one token)."""
    t = t.float()
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def tensor_stats(site: str, t: Tensor) -> SiteStats:
    """The statistics of one tensor."""
    x = as_tokens(t)
    return SiteStats(
        site=site,
        shape=tuple(t.shape),
        mean=float(x.mean()),
        std=float(x.std(unbiased=False)),
        min=float(x.min()),
        max=float(x.max()),
        mean_norm=float(x.norm(dim=-1).mean()),
        frac_zero=float((x == 0).float().mean()),
        count=x.numel(),
    )


def check_has_values(f: ActivationFile, site: str) -> tuple[int, ...]:
    """A site's shape, from the header; a site with no values cannot be summarised or compared.

    Raises:
        FormatError: When the site holds no values (a zero in its shape).
        UnknownNameError: When the file has no such site.
    """
    shape = f.shape(site)
    if math.prod(shape) == 0:
        raise FormatError(
            f"{f.label}: site {site!r} holds no values (shape {list(shape)}); nothing to analyse."
        )
    return shape


def site_values(f: ActivationFile, site: str) -> Tensor:
    """One site's tensor, refused when it holds no values (see :func:`check_has_values`)."""
    check_has_values(f, site)
    return f.get(site)


def file_stats(
    path: SampleSource, sites: list[str] | None = None, tokens: slice | None = None
) -> list[SiteStats]:
    """Per-site statistics of one activation file, reading one site at a time.

    Args:
        path: The file.
        sites: Only these sites (all by default).
        tokens: A token range (``slice(-5, None)`` for the last five); all by default.

    Raises:
        FormatError: When the file is unreadable or a site holds no values.
        ActcapError: When ``tokens`` selects no token.
    """
    out = []
    with ActivationFile(path) as f:
        for site in sites if sites is not None else f.sites:
            t = site_values(f, site)
            if tokens is not None and t.dim() > 1:
                n = t.shape[0]
                t = t[tokens]
                if t.numel() == 0:
                    raise TokenPositionError(
                        f"{f.label}: the token range {tokens.start}:{tokens.stop} selects no "
                        f"token of site {site!r}, which holds {n}."
                    )
            out.append(tensor_stats(site, t))
    return out


@dataclass
class _Running:
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    norm_sum: float = 0.0
    tokens: int = 0
    zeros: int = 0

    @classmethod
    def of(cls, t: Tensor) -> _Running:
        running = cls()
        running.add(t)
        return running

    def add(self, t: Tensor) -> None:
        x = as_tokens(t).double()
        self.n += x.numel()
        self.total += float(x.sum())
        self.total_sq += float((x * x).sum())
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.norm_sum += float(x.norm(dim=-1).sum())
        self.tokens += x.shape[0]
        self.zeros += int((x == 0).sum())

    def merge(self, other: _Running) -> None:
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq
        self.lo = min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)
        self.norm_sum += other.norm_sum
        self.tokens += other.tokens
        self.zeros += other.zeros

    def finish(self, site: str) -> SiteStats:
        mean = self.total / self.n
        var = max(self.total_sq / self.n - mean * mean, 0.0)
        return SiteStats(
            site,
            (self.n,),
            mean,
            math.sqrt(var),
            self.lo,
            self.hi,
            self.norm_sum / self.tokens,
            self.zeros / self.n,
            self.n,
        )


@dataclass
class DirectorySummary:
    """A directory's activations summarised, with grades when it is a run."""

    n_files: int
    """Files read."""
    skipped: Skipped
    """Files that could not be read, with why."""
    sites: list[SiteStats]
    """Per-site statistics over all files."""
    n_graded: int = 0
    """Samples with a grade."""
    n_correct: int = 0
    """Correct samples."""
    by_correct: dict[str, list[SiteStats]] = field(default_factory=dict)
    """Per-site statistics of the correct (``"correct"``) and incorrect (``"incorrect"``) samples."""

    @property
    def accuracy(self) -> float | None:
        """Accuracy of the graded samples."""
        return self.n_correct / self.n_graded if self.n_graded else None


def directory_summary(
    directory: str | os.PathLike[str], sites: list[str] | None = None
) -> DirectorySummary:
    """Summarise every activation file of a run or folder, one file and one site at a time.

    Memory stays bounded by the sites of one file, whatever the number of files (a sample in a
    local shard is one read of an open shard). A file that cannot be read whole (corrupt, or a
    site without values) is skipped and counted, and none of its sites enters the summary.
    """
    samples = list_samples(directory)
    skipped = Skipped.of(samples)
    overall: dict[str, _Running] = {}
    split: dict[str, dict[str, _Running]] = {"correct": {}, "incorrect": {}}
    n_files = n_graded = n_correct = 0
    for ref, names, arrays in iter_site_arrays(samples, skipped, sites):
        wanted = [s for s in (sites or names) if s in arrays]
        empty = next((s for s in wanted if arrays[s].size == 0), None)
        if empty is not None:  # a site without values: skip the whole file
            skipped.add(
                ref.path,
                f"{ref.path}: site {empty!r} holds no values (shape "
                f"{list(arrays[empty].shape)}); nothing to analyse.",
            )
            continue
        part = {
            site: _Running.of(torch.from_numpy(np.array(arrays[site], dtype=np.float64)))
            for site in wanted
        }
        for site, running in part.items():
            overall.setdefault(site, _Running()).merge(running)
            if ref.correct is not None:
                label = "correct" if ref.correct else "incorrect"
                split[label].setdefault(site, _Running()).merge(running)
        n_files += 1
        if ref.correct is not None:
            n_graded += 1
            n_correct += ref.correct
    order = sorted(overall, key=site_sort_key)
    return DirectorySummary(
        n_files,
        skipped,
        [overall[s].finish(s) for s in order],
        n_graded,
        n_correct,
        {k: [v[s].finish(s) for s in order if s in v] for k, v in split.items() if v},
    )
