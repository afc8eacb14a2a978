"""Reading a run back: :func:`open_run` gives its config, finished samples and results.

Readers never take the run's lock, so they never block a writer.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actcap.errors import FormatError, UnknownNameError
from actcap.storage.format import ShardSlice
from actcap.storage.layout import RESULTS, RUN_FILE, RUN_FORMAT_VERSION
from actcap.storage.location import PathOrUrl, exists, is_url, join, local_path, read_bytes
from actcap.storage.manifest import ManifestEntry, read_all_manifests


@dataclass(frozen=True)
class RunInfo:
    """A run directory as read back: config, finished samples, results."""

    root: Path | str
    """The directory: a path, or an fsspec URL."""
    config: dict[str, Any]
    """``run.json``."""
    entries: list[ManifestEntry]
    """Finished samples, in the order they were written (one per id, over all manifests)."""
    results: dict[str, Any] | None
    """``results.json`` when the run finished."""
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    """``(sample id, why)`` of the manifest lines :meth:`sample_paths` skipped (filled as it goes)."""

    def sample_paths(self) -> Iterator[tuple[ManifestEntry, Path | ShardSlice]]:
        """Each finished sample with where its activations are (a file or a slice of a shard).

        A sample whose manifest line is corrupt (its path leads out of the run, its offset is
        no count) is skipped with a warning, and listed in :attr:`corrupt`.
        """
        real_root = None if is_url(self.root) else os.path.realpath(self.root)
        for e in self.entries:
            try:
                source = e.source(self.root, real_root)
            except FormatError as err:
                self.corrupt.append((e.id, str(err)))
                warnings.warn(str(err), stacklevel=2)
                continue
            if source is not None:
                yield e, source

    def find(self, sample_id: str) -> ManifestEntry:
        """The manifest entry of one sample.

        Raises:
            UnknownNameError: When the run has no such sample.
        """
        for e in self.entries:
            if e.id == sample_id:
                return e
        shown = ", ".join(e.id for e in self.entries[:5])
        raise UnknownNameError(
            f"{self.root}: no sample {sample_id!r} in this run ({len(self.entries)} samples: {shown}, ...)."
        )


def open_run(root: PathOrUrl) -> RunInfo:
    """Read a run directory or URL (without taking its lock: readers never block writers).

    Raises:
        FormatError: When the directory is no run, or its records are unreadable or newer.
    """
    text = os.fspath(root)
    run_file = join(text, RUN_FILE)
    if not exists(run_file) or (not is_url(text) and not local_path(run_file).is_file()):
        raise FormatError(f"{text}: not a run directory (no {RUN_FILE}).")
    try:
        config = json.loads(read_bytes(run_file))
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise FormatError(f"{run_file}: unreadable ({e}).") from e
    if not isinstance(config, dict):
        raise FormatError(f"{run_file}: not a run record (a JSON object); the run is damaged.")
    version = config.get("run_format_version", 1)
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
        raise FormatError(
            f"{run_file}: run_format_version {version!r} is newer than supported ({RUN_FORMAT_VERSION}); upgrade actcap."
        )
    results = None
    results_file = join(text, RESULTS)
    if exists(results_file):
        try:
            results = json.loads(read_bytes(results_file))
        except (ValueError, RecursionError) as e:
            raise FormatError(f"{results_file}: unreadable ({e}).") from e
        if not isinstance(results, dict):
            raise FormatError(
                f"{results_file}: not a JSON object; the run's results are unreadable."
            )
    path: Path | str = text if is_url(text) else local_path(text)
    return RunInfo(path, config, read_all_manifests(text), results)
