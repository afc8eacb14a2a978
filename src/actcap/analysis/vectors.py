"""One vector per sample and site: the building block of similarity matrices, probes and PCA.

Vectors are read in one pass over the run, one file at a time. Up to :data:`MEMORY_BUDGET` bytes
of them stay in memory; a larger set (a run of 100,000 samples with every layer of a big model)
is appended, site by site, to files in a temporary folder and read back one site at a time, so
memory holds about one site's vectors whatever the size of the run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from torch import Tensor

from actcap.data import ActivationDataset
from actcap.data.samples import (
    SampleList,
    SampleRef,
    Skipped,
    is_run,
    iter_site_arrays,
    list_samples,
)
from actcap.errors import ActcapError, AnalysisError, FormatError, UnknownNameError
from actcap.storage.names import site_sort_key

Reduce = Literal["last", "mean"]

MEMORY_BUDGET = 256 << 20
"""Bytes of vectors :func:`load_vectors` keeps in memory before spilling them to a temporary folder."""


def reduce_tokens(t: Tensor, how: Reduce = "last") -> Tensor:
    """``(tokens, hidden)`` to ``(hidden,)``; a stored ``(hidden,)`` vector is returned as it is."""
    t = t.float()
    if t.dim() == 1:
        return t
    return t[-1] if how == "last" else t.mean(dim=0)


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included (all when ``n <= k``).

    The deterministic subsample behind every capped picture: the same run gives the same rows.
    """
    if k <= 0:
        return []
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return np.linspace(0, n - 1, k).round().astype(int).tolist()  # type: ignore[no-any-return]


class _SpilledSites(Mapping[str, np.ndarray]):
    """Site to ``(samples, hidden)`` vectors kept in files; each access reads that site alone."""

    def __init__(self, folder: Path, files: dict[str, Path]) -> None:
        self.folder = folder
        self._files = files
        # the files go when the vectors do (garbage collected, or at exit)
        weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        self._widths: dict[str, int] = {}

    def set_width(self, site: str, width: int) -> None:
        self._widths[site] = width

    def __getitem__(self, site: str) -> np.ndarray:
        data = np.fromfile(self._files[site], dtype=np.float32)
        return data.reshape(-1, self._widths[site])

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class _Columns:
    """Rows of vectors per site: in preallocated arrays within the budget, else in files."""

    def __init__(self, capacity: int, widths: dict[str, int], budget: int) -> None:
        self.widths = widths
        self.count = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._handles: dict[str, BinaryIO] = {}
        self._spilled: _SpilledSites | None = None
        if capacity * sum(widths.values()) * 4 <= budget:
            self._arrays = {s: np.empty((capacity, w), np.float32) for s, w in widths.items()}
            return
        folder = Path(tempfile.mkdtemp(prefix="actcap-vectors-"))
        files = {s: folder / f"{i}.f32" for i, s in enumerate(widths)}
        self._spilled = _SpilledSites(folder, files)
        self._handles = {s: open(p, "wb") for s, p in files.items()}  # noqa: SIM115 - closed in finish()

    def add(self, row: Mapping[str, np.ndarray]) -> None:
        if self._spilled is None:
            for s, v in row.items():
                self._arrays[s][self.count] = v
        else:
            for s, v in row.items():
                self._handles[s].write(v.tobytes())
        self.count += 1

    def finish(self) -> Mapping[str, np.ndarray]:
        if self._spilled is None:
            return {s: a[: self.count] for s, a in self._arrays.items()}
        for s, h in self._handles.items():
            h.close()
            self._spilled.set_width(s, self.widths[s])
        return self._spilled


@dataclass
class SampleVectors:
    """Vectors of several sites for the samples of a directory, aligned row by row."""

    samples: list[SampleRef]
    """The samples read, in order (rows)."""
    vectors: Mapping[str, np.ndarray]
    """Site to ``(samples, hidden)`` float32. Spilled to disk for large runs: read each site once
    (``x = vectors[site]``) and keep it while using it, rather than indexing the mapping often."""
    skipped: Skipped
    """Files that could not be read."""
    mean_norms: dict[str, float] = field(default_factory=dict)
    """Mean L2 norm of one token's vector per site, over every token read (not only the reduced)."""

    @property
    def sites(self) -> list[str]:
        """Sites, in network order."""
        return sorted(self.vectors, key=site_sort_key)

    def subset(self, rows: Sequence[int], sites: Sequence[str] | None = None) -> SampleVectors:
        """The given rows (and sites), in memory."""
        index = np.asarray(rows, dtype=np.int64)
        return SampleVectors(
            [self.samples[i] for i in rows],
            {s: self.vectors[s][index] for s in (sites if sites is not None else self.sites)},
            self.skipped,
            self.mean_norms,
        )


def _reduce_row(
    label: str, arrays: Mapping[str, np.ndarray], how: Reduce
) -> dict[str, tuple[np.ndarray, float, int]]:
    """Each site's reduced float32 vector, with the sum of its tokens' L2 norms and their count.

    Raises:
        FormatError: When a site holds no values.
    """
    out = {}
    for s, a in arrays.items():
        if a.ndim == 0 or a.size == 0:
            raise FormatError(f"{label}: site {s!r} is empty (shape {list(a.shape)}).")
        x = a.reshape(-1, a.shape[-1])
        x64 = x.astype(np.float64)
        norms = float(np.sqrt(np.einsum("ij,ij->i", x64, x64)).sum())
        vec = x[-1] if how == "last" else x.mean(axis=0, dtype=np.float64)
        out[s] = (vec.astype(np.float32), norms, x.shape[0])
    return out


def load_vectors(
    directory: str | os.PathLike[str],
    sites: list[str] | None = None,
    how: Reduce = "last",
    *,
    samples: list[SampleRef] | None = None,
    budget: int = MEMORY_BUDGET,
    dataset: bool = False,
) -> SampleVectors:
    """Read one vector per sample for each site, in one pass over the run.

    Memory holds the reduced vectors up to ``budget`` bytes (never the tokens); beyond it the
    vectors go to a temporary folder and each site is read back on its own. Samples missing one
    of the sites, or whose vectors differ in width from the first sample's, are skipped and
    reported.

    Args:
        directory: A run directory (or URL) or a folder of activation files.
        sites: Sites to read (those of the first readable sample by default).
        how: The ``last`` token's vector, or the ``mean`` over tokens.
        samples: The samples to read (all of ``directory`` by default).
        budget: Bytes of vectors kept in memory before spilling to disk.
        dataset: Read a run (not a folder of files, nor given ``samples``) through
            :class:`~actcap.data.ActivationDataset` (``rows="samples"``), as ``actcap probe``
            does: the same vectors, samples and skips.

    Raises:
        NoActivationsError: When the run has no activations.
        UnknownNameError: When none of the requested sites is in the files (with ``dataset``,
            when any is not in the run).
    """
    ds = None
    if dataset and samples is None and is_run(directory):
        ds = ActivationDataset(
            directory, sites=sites, rows="samples", labels=["sample_index"], warn_skipped=False
        )
        samples = SampleList([SampleRef(i, p, r) for i, r, p in ds.samples], ds.corrupt)
    refs = samples if samples is not None else list_samples(directory)
    skipped = Skipped.of(refs)
    kept: list[SampleRef] = []
    wanted: list[str] | None = sites
    columns: _Columns | None = None
    norm_sum: dict[str, float] = {}
    tokens: dict[str, int] = {}
    source = (
        iter_site_arrays(refs, skipped, sites) if ds is None else _dataset_arrays(ds, refs, skipped)
    )
    for ref, names, arrays in source:
        if wanted is None:
            wanted = names
        missing = [s for s in wanted if s not in arrays]
        if missing:
            skipped.add(ref.path, f"no site {missing[0]!r}")
            continue
        try:
            row = _reduce_row(str(ref.path), {s: arrays[s] for s in wanted}, how)
        except ActcapError as e:
            skipped.add(ref.path, str(e))
            continue
        if columns is None:
            columns = _Columns(len(refs), {s: v.shape[0] for s, (v, _, _) in row.items()}, budget)
        odd = next((s for s, (v, _, _) in row.items() if v.shape[0] != columns.widths[s]), None)
        if odd is not None:
            skipped.add(
                ref.path,
                f"site {odd!r} has {row[odd][0].shape[0]} values per token, the first sample's "
                f"{columns.widths[odd]}",
            )
            continue
        columns.add({s: v for s, (v, _, _) in row.items()})
        for s, (_, norm, count) in row.items():
            norm_sum[s] = norm_sum.get(s, 0.0) + norm
            tokens[s] = tokens.get(s, 0) + count
        kept.append(ref)
    if columns is None:
        raise UnknownNameError(
            f"{directory}: no readable sample holds the sites {wanted}. "
            f"{len(skipped)} file(s) skipped."
            + (f" First: {skipped.files[0][1]}" if skipped.files else "")
        )
    return SampleVectors(
        kept, columns.finish(), skipped, {s: norm_sum[s] / tokens[s] for s in norm_sum}
    )


def _dataset_arrays(
    ds: ActivationDataset, refs: Sequence[SampleRef], skipped: Skipped
) -> Iterator[tuple[SampleRef, list[str], dict[str, np.ndarray]]]:
    """What :func:`iter_site_arrays` gives, read through an :class:`ActivationDataset` of samples."""
    where = {ref.id: ref.path for ref in refs}
    noted = 0

    def note() -> None:
        nonlocal noted
        for sid, why in ds.skipped[noted:]:
            skipped.add(where[sid], why)
        noted = len(ds.skipped)

    for row in ds:
        note()
        x = row["x"]
        tensors = x.items() if isinstance(x, dict) else [(ds.sites[0], x)]
        yield refs[row["sample_index"]], ds.sites, {s: t.numpy() for s, t in tensors}
    note()


MAX_COSINE_ROWS = 20_000
"""Rows :func:`cosine_matrix` accepts: 20,000 rows make a 1.6 GB matrix."""


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``x``.

    Raises:
        AnalysisError: For more than :data:`MAX_COSINE_ROWS` rows (subsample them with :func:`spread`).
    """
    if len(x) > MAX_COSINE_ROWS:
        raise AnalysisError(
            f"a similarity matrix of {len(x):,} samples needs {len(x) ** 2 * 4 / 1e9:.1f} GB; "
            f"pass at most {MAX_COSINE_ROWS:,} rows (SampleVectors.subset with spread())."
        )
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    t = torch.nn.functional.normalize(t, dim=1)
    return (t @ t.T).numpy()
