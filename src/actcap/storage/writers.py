"""Choosing a run writer: a local run directory or an fsspec URL, the main writer or an extra one.

:class:`NullWriter` is the writer of a run kept in memory (no ``out``): it takes every call and
writes nothing, so the evaluation code never asks whether it has a writer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol

from actcap.errors import RunError
from actcap.storage.layout import SHARD_BYTES
from actcap.storage.location import PathOrUrl, is_url
from actcap.storage.manifest import ManifestEntry
from actcap.storage.records import FinishedSample
from actcap.storage.run import RunWriter


class SampleWriter(Protocol):
    """What the evaluation runner needs of a run writer (local or remote)."""

    root: Any
    storage: str
    writer_id: str
    done: dict[str, ManifestEntry]

    def write(self, sample: FinishedSample) -> ManifestEntry:
        """Write one sample."""
        ...

    def flush(self) -> None:
        """Make every written sample durable."""
        ...

    def merge_segments(self, order: Iterable[str] | None = None) -> int:
        """Fold extra writers' manifests into the main one."""
        ...

    def write_results(self, results: Mapping[str, Any]) -> str:
        """Write ``results.json``."""
        ...

    def write_stats(self, data: bytes) -> str:
        """Write ``stats.safetensors`` (statistics over every token)."""
        ...

    def close(self) -> None:
        """Finish writing."""
        ...


class NullWriter:
    """A run writer that writes nothing: the evaluation of a run kept in memory (no ``out``).

    It answers every :class:`SampleWriter` call: ``root`` is None, nothing is done yet, a written
    sample comes back as the manifest entry it would have had (no file), and ``results.json`` is
    not written.
    """

    root: Any = None
    storage: str = "none"
    writer_id: str = ""

    def __init__(self) -> None:
        """An empty run."""
        self.done: dict[str, ManifestEntry] = {}

    def write(self, sample: FinishedSample) -> ManifestEntry:
        """The sample's manifest entry; nothing is stored."""
        return ManifestEntry(sample.id, None, {"id": sample.id, **sample.record})

    def flush(self) -> None:
        """Nothing to make durable."""

    def merge_segments(self, order: Iterable[str] | None = None) -> int:
        """No segments: 0 lines merged."""
        return 0

    def write_results(self, results: Mapping[str, Any]) -> str:
        """Nothing is written; the empty string stands for no file."""
        return ""

    def write_stats(self, data: bytes) -> str:
        """Nothing is written; the empty string stands for no file."""
        return ""

    def close(self) -> None:
        """Nothing to close."""


def open_writer(
    out: PathOrUrl,
    config: Mapping[str, Any],
    *,
    resume: bool = False,
    storage: Literal["files", "shards"] = "files",
    shard_bytes: int = SHARD_BYTES,
) -> SampleWriter:
    """The main writer of a run: a local directory (locked) or an fsspec URL (shards only).

    Raises:
        RunError: For one-file-per-sample storage at a URL, or what the writer raises.
    """
    if is_url(out):
        if storage != "shards":
            raise RunError(
                f"{os.fspath(out)}: a URL takes sharded storage only (objects cannot be renamed "
                "or appended to); pass --storage shards."
            )
        from actcap.storage.remote import RemoteRunWriter

        return RemoteRunWriter.open(os.fspath(out), config, resume=resume, shard_bytes=shard_bytes)
    return RunWriter.open(out, config, resume=resume, storage=storage, shard_bytes=shard_bytes)


def attach_writer(
    out: PathOrUrl,
    writer_id: str,
    *,
    storage: Literal["files", "shards"] = "files",
    shard_bytes: int = SHARD_BYTES,
) -> SampleWriter:
    """An extra writer (a Ray actor) of a run whose main writer is open elsewhere."""
    if is_url(out):
        from actcap.storage.remote import RemoteRunWriter

        return RemoteRunWriter.attach(os.fspath(out), writer_id, shard_bytes=shard_bytes)
    return RunWriter.attach(out, writer_id, storage=storage, shard_bytes=shard_bytes)
