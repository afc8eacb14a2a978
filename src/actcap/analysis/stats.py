"""Statistics of stored activations: per file and site, and streamed over a whole directory."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from torch import Tensor

from actcap.analysis.sources import Skipped, iter_open, list_samples
from actcap.errors import ActcapError
from actcap.storage.files import ActivationFile, site_sort_key
from actcap.storage.format import SampleSource


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


def file_stats(
    path: SampleSource, sites: list[str] | None = None, tokens: slice | None = None
) -> list[SiteStats]:
    """Per-site statistics of one activation file, reading one site at a time.

    Args:
        path: The file.
        sites: Only these sites (all by default).
        tokens: A token range (``slice(-5, None)`` for the last five); all by default.
    """
    out = []
    with ActivationFile(path) as f:
        for site, t in f.iter_sites(sites):
            if tokens is not None and t.dim() > 1:
                t = t[tokens]
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

    Memory stays bounded by one site of one file, whatever the number of files.
    """
    samples = list_samples(directory)
    skipped = Skipped()
    overall: dict[str, _Running] = {}
    split: dict[str, dict[str, _Running]] = {"correct": {}, "incorrect": {}}
    n_files = n_graded = n_correct = 0
    for ref, f in iter_open(samples, skipped):
        try:
            wanted = [s for s in (sites or f.sites) if s in f.sites]
            for site, t in f.iter_sites(wanted):
                overall.setdefault(site, _Running()).add(t)
                if ref.correct is not None:
                    split["correct" if ref.correct else "incorrect"].setdefault(
                        site, _Running()
                    ).add(t)
        except ActcapError as e:  # a corrupt data region: skip the file, keep going
            skipped.add(ref.path, str(e))
            continue
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
