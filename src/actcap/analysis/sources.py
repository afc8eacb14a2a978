"""Where analysis reads from: one file, a run directory (joined with grades) or any folder of files.

Everything is read lazily through :mod:`actcap.storage`, one file at a time; unreadable or foreign
files are reported and skipped, never fatal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actcap.errors import FormatError
from actcap.storage.files import ActivationFile
from actcap.storage.format import SUFFIX, ShardSlice
from actcap.storage.location import exists, is_url, join
from actcap.storage.run import RUN_FILE, open_run


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


@dataclass
class Skipped:
    """Files that could not be read, with why."""

    files: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` pairs."""

    def add(self, path: Path | ShardSlice, reason: str) -> None:
        """Record one skipped file."""
        self.files.append((str(path), reason))

    def __len__(self) -> int:
        """How many files were skipped."""
        return len(self.files)


def list_samples(directory: str | os.PathLike[str]) -> list[SampleRef]:
    """The samples of a run (in manifest order, with records) or of a folder of files.

    A run may be local or at an fsspec URL, in either layout (a file per sample, or shards).

    Raises:
        FormatError: When the path is no folder.
    """
    if is_url(directory):
        info = open_run(directory)
        return [SampleRef(e.id, p, e.record) for e, p in info.sample_paths()]
    root = Path(directory)
    if not root.is_dir():
        raise FormatError(f"{root}: not a folder.")
    if (root / RUN_FILE).is_file():
        info = open_run(root)
        return [SampleRef(e.id, p, e.record) for e, p in info.sample_paths()]
    files = sorted(p for p in root.rglob(f"*{SUFFIX}") if not p.name.startswith("."))
    return [SampleRef(p.stem, p) for p in files]


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


def run_config(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run.json`` and ``results.json`` of a run directory, or None for a loose folder."""
    root: str | Path = os.fspath(directory) if is_url(directory) else Path(directory)
    if not exists(join(os.fspath(root), RUN_FILE)):
        return None
    info = open_run(root)
    return {"config": info.config, "results": info.results}
