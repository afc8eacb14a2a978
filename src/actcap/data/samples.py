"""The samples of a run (joined with grades) or of any folder of files, as analysis and export read them.

Everything is read lazily through :mod:`actcap.storage`, one file at a time; unreadable or foreign
files are reported and skipped, never fatal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actcap.data.reader import ShardFiles, read_arrays
from actcap.errors import FormatError, NoActivationsError
from actcap.storage.format import SUFFIX, ShardSlice
from actcap.storage.layout import RUN_FILE
from actcap.storage.location import is_url
from actcap.storage.reader import ActivationFile
from actcap.storage.runinfo import RunInfo, open_run


@dataclass(frozen=True)
class SampleRef:
    """One sample to analyse: its file and what the manifest says of it."""

    id: str
    """Question id (or file stem)."""
    path: Path | ShardSlice
    """Its activation file, or its slice of a shard."""
    record: dict[str, Any] = field(default_factory=dict)
    """Its manifest line (empty for a loose folder of files)."""

    @property
    def correct(self) -> bool | None:
        """The grade, when known."""
        value = self.record.get("correct")
        return None if value is None else bool(value)


class SampleList(list[SampleRef]):
    """The samples of a run or folder, and the manifest lines skipped as corrupt on the way."""

    def __init__(self, refs: Sequence[SampleRef], corrupt: Sequence[tuple[str, str]] = ()) -> None:
        """``corrupt``: ``(sample id, why)`` of manifest lines whose activations cannot be read."""
        super().__init__(refs)
        self.corrupt = list(corrupt)


@dataclass
class Skipped:
    """Files that could not be read, with why."""

    files: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` pairs."""

    @classmethod
    def of(cls, samples: Sequence[SampleRef]) -> Skipped:
        """A count that starts with the corrupt manifest lines :func:`list_samples` left out."""
        return cls(list(getattr(samples, "corrupt", [])))

    def add(self, path: Path | ShardSlice, reason: str) -> None:
        """Record one skipped file."""
        self.files.append((str(path), reason))

    def __len__(self) -> int:
        """How many files were skipped."""
        return len(self.files)


def list_samples(directory: str | os.PathLike[str]) -> SampleList:
    """The samples of a run (in manifest order, with records) or of a folder of files.

    A run may be local or at an fsspec URL, in either layout (a file per sample, or shards).

    Raises:
        FormatError: When the path is no folder.
        NoActivationsError: When there is no activation file to read: a run made with
            ``--no-capture``, a run with no finished sample, or a folder without ``.safetensors``.
    """
    if is_run(directory):
        return run_samples(open_run(directory), directory)
    root = Path(directory)
    if not root.is_dir():
        raise FormatError(f"{root}: not a folder.")
    files = sorted(p for p in root.rglob(f"*{SUFFIX}") if not p.name.startswith("."))
    if not files:
        raise NoActivationsError(
            f"{root}: no activation files (*{SUFFIX}) in this folder; give a run directory or a "
            "folder of files written by actcap."
        )
    return SampleList([SampleRef(p.stem, p) for p in files])


def is_run(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` is a run (a URL, or a folder with ``run.json``), not loose files."""
    return is_url(directory) or (Path(directory) / RUN_FILE).is_file()


def run_samples(info: RunInfo, directory: str | os.PathLike[str]) -> SampleList:
    """The samples of an opened run that have activations, in manifest order.

    Raises:
        NoActivationsError: When none has (see :func:`list_samples`).
    """
    refs = [SampleRef(e.id, p, e.record) for e, p in info.sample_paths()]
    if not refs:
        raise NoActivationsError(_no_activations(directory, info))
    return SampleList(refs, info.corrupt)


def _no_activations(directory: str | os.PathLike[str], info: RunInfo) -> str:
    """Why a run has no activations to read, in one line."""
    where = os.fspath(directory)
    corrupt: list[tuple[str, str]] = getattr(info, "corrupt", [])
    if corrupt:
        return (
            f"{where}: no sample's activations can be read: {len(corrupt):,} manifest line(s) are "
            f"corrupt (first: {corrupt[0][1]})."
        )
    if not info.entries:
        return f"{where}: this run has no finished sample yet; nothing to analyse."
    return (
        f"{where}: this run has no activations: its {len(info.entries):,} sample(s) were "
        "answered with --no-capture. Run `actcap eval` again without --no-capture to analyse "
        "activations (its accuracy is in results.json)."
    )


def iter_open(
    samples: list[SampleRef], skipped: Skipped
) -> Iterator[tuple[SampleRef, ActivationFile]]:
    """Open each sample's file in turn, recording and skipping the ones that fail."""
    for ref in samples:
        try:
            f = ActivationFile(ref.path)
        except FormatError as e:
            skipped.add(ref.path, str(e))
            continue
        try:
            yield ref, f
        finally:
            f.close()


def iter_site_arrays(
    samples: list[SampleRef], skipped: Skipped, sites: Sequence[str] | None = None
) -> Iterator[tuple[SampleRef, list[str], dict[str, np.ndarray]]]:
    """Each readable sample with its sites (all of them) and the arrays of the ``sites`` asked for.

    The fast path of a whole-run pass: a sample in a local shard costs one or two reads of an
    open shard, with the same checks as :class:`ActivationFile`; other samples are read through
    it. Arrays may be read-only and of any float dtype (convert before keeping them). A site
    asked for but not in a sample is simply absent from its arrays; ``sites=None`` reads all.
    Unreadable samples are recorded in ``skipped``.
    """
    files = ShardFiles()
    try:
        for ref in samples:
            try:
                got = read_arrays(ref.path, sites, files)
            except FormatError as e:
                skipped.add(ref.path, str(e))
                continue
            except OSError as e:
                skipped.add(ref.path, f"{ref.path}: cannot read ({e.strerror or e}).")
                continue
            yield ref, *got
    finally:
        files.close()
