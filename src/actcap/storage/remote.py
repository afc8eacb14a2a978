"""Writing a run to an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...): shards only.

Object stores have no append, no rename and no lock, so the unit of durability is a shard: a
writer streams samples into one object and, once that object is complete (its write closed),
writes a manifest segment object listing the samples in it. A sample is done when it is listed;
a crash loses at most the open shard, whose samples a resume answers again. Each writer has its
own id, so writers never write the same object; readers take the union of all manifests.

There is no lock on a URL: run one driver per output URL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from actcap.errors import RunError
from actcap.storage.encode import encode_sample
from actcap.storage.format import SampleMeta
from actcap.storage.layout import (
    MANIFEST,
    MANIFESTS,
    PREFIXES,
    RESULTS,
    RUN_FILE,
    SHARD_BYTES,
    SHARDS,
    check_out_folder,
    new_writer_id,
)
from actcap.storage.location import join, url_fs
from actcap.storage.manifest import (
    ManifestEntry,
    manifest_bytes,
    manifest_line,
    manifest_names,
    merged_manifest,
    read_all_manifests,
)
from actcap.storage.prefixes import split_shared_prefix
from actcap.storage.reader import prefix_fault
from actcap.storage.records import FinishedSample
from actcap.storage.repair import damaged_samples, warn_redone
from actcap.storage.runconfig import check_run_config
from actcap.storage.shards import shard_name


class RemoteRunWriter:
    """Writes a run at an fsspec URL, one shard object and one manifest segment at a time."""

    def __init__(
        self, url: str, *, writer_id: str | None = None, shard_bytes: int = SHARD_BYTES
    ) -> None:
        """Use :meth:`open` (the driver) or :meth:`attach` (an extra writer)."""
        self.root = url.rstrip("/")
        self.storage = "shards"
        self.writer_id = writer_id or new_writer_id()
        self.shard_bytes = shard_bytes
        self._fs, self._path = url_fs(self.root)
        self.done: dict[str, ManifestEntry] = {e.id: e for e in read_all_manifests(self.root)}
        self._sequence = -1
        self._file: Any = None
        self._size = 0
        self._pending: list[dict[str, Any]] = []
        self._segments = 0
        self._prefixes: set[str] = set()

    @classmethod
    def open(
        cls,
        url: str,
        config: Mapping[str, Any],
        *,
        resume: bool = False,
        shard_bytes: int = SHARD_BYTES,
    ) -> RemoteRunWriter:
        """Create or resume a run at ``url`` (see :meth:`actcap.storage.run.RunWriter.open`).

        Raises:
            RunError: When the URL holds another run, or has samples and ``resume`` is False.
        """
        root = url.rstrip("/")
        fs, path = url_fs(root)
        check_out_folder(root)
        entries = read_all_manifests(root)
        record = check_run_config(root, config, resume, bool(entries))
        try:
            fs.makedirs(path, exist_ok=True)
            if record is not None:
                fs.pipe_file(f"{path}/{RUN_FILE}", record)
        except OSError as e:
            raise RunError(f"{root}: cannot write ({e}).") from e
        writer = cls(root, shard_bytes=shard_bytes)
        if resume and entries:
            writer._drop_damaged(entries)
        return writer

    @classmethod
    def attach(cls, url: str, writer_id: str, *, shard_bytes: int = SHARD_BYTES) -> RemoteRunWriter:
        """An extra writer (a Ray actor) of a run the driver opened."""
        return cls(url, writer_id=writer_id, shard_bytes=shard_bytes)

    def is_done(self, sample_id: str) -> bool:
        """Whether the sample is listed in a manifest (or waits in this writer's open shard)."""
        return sample_id in self.done or any(p["id"] == sample_id for p in self._pending)

    def write_sample(
        self,
        sample_id: str,
        record: Mapping[str, Any],
        activations: Mapping[str, Tensor] | None = None,
        meta: SampleMeta | None = None,
        *,
        input_ids: Tensor | None = None,
        output_ids: Tensor | None = None,
    ) -> ManifestEntry:
        """Shorthand for :meth:`write` of a :class:`FinishedSample` built from the arguments."""
        return self.write(
            FinishedSample(sample_id, record, activations, meta, input_ids, output_ids)
        )

    def write(self, sample: FinishedSample) -> ManifestEntry:
        """Add a sample to the open shard; it is done once the shard is sealed (:meth:`flush`).

        Raises:
            RunError: When the sample is already done or the object cannot be written.
        """
        if self.is_done(sample.id):
            raise RunError(f"{self.root}: sample {sample.id!r} is already in the manifest.")
        sample, prefix = split_shared_prefix(sample)
        sample_id, record = sample.id, sample.record
        activations, meta = sample.activations, sample.meta
        input_ids, output_ids = sample.input_ids, sample.output_ids
        rel: str | None = None
        where: dict[str, int] = {}
        try:
            if prefix is not None and prefix.key not in self._prefixes:
                # An object appears whole when its write completes: durable before the sample,
                # which is listed only when its shard is sealed, later still.
                if prefix_fault(self.root, prefix.key) is not None:
                    parts = encode_sample(
                        prefix.key, prefix.activations, prefix.meta, input_ids=prefix.input_ids
                    )
                    self._fs.makedirs(f"{self._path}/{PREFIXES}", exist_ok=True)
                    self._fs.pipe_file(
                        f"{self._path}/{PREFIXES}/{prefix.filename}", b"".join(parts)
                    )
                self._prefixes.add(prefix.key)
            if activations is not None and meta is not None:
                parts = encode_sample(
                    sample_id, activations, meta, input_ids=input_ids, output_ids=output_ids
                )
                if self._file is None:
                    self._sequence += 1
                    self._fs.makedirs(f"{self._path}/{SHARDS}", exist_ok=True)
                    name = shard_name(self.writer_id, self._sequence)
                    self._file = self._fs.open(f"{self._path}/{SHARDS}/{name}", "wb")
                    self._size = 0
                rel = f"{SHARDS}/{shard_name(self.writer_id, self._sequence)}"
                length = sum(p.nbytes for p in parts)
                where = {"offset": self._size, "length": length}
                for part in parts:
                    self._file.write(part)
                self._size += length
        except OSError as e:
            raise RunError(f"{self.root}: cannot write sample {sample_id!r} ({e}).") from e
        line = manifest_line(sample_id, rel, where, record)
        self._pending.append(line)
        if self._file is None or self._size >= self.shard_bytes:
            self.flush()
        return ManifestEntry(sample_id, rel, line)

    def flush(self) -> None:
        """Seal the open shard: complete its object, then list its samples in a new segment.

        Raises:
            RunError: When an object cannot be written (the shard's samples are then not done).
        """
        if not self._pending:
            return
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._segments += 1
            segment = f"{self._path}/{MANIFESTS}/{self.writer_id}-{self._segments:05d}.jsonl"
            self._fs.makedirs(f"{self._path}/{MANIFESTS}", exist_ok=True)
            self._fs.pipe_file(segment, manifest_bytes(self._pending))
        except OSError as e:
            raise RunError(f"{self.root}: cannot seal a shard ({e}).") from e
        for p in self._pending:
            self.done[p["id"]] = ManifestEntry(p["id"], p["file"], p)
        self._pending = []

    def merge_segments(self, order: Iterable[str] | None = None) -> int:
        """Fold the segments into ``manifest.jsonl`` (written whole), then remove them."""
        self.flush()
        return self._rewrite_manifest(order)

    def _rewrite_manifest(self, order: Iterable[str] | None, exclude: Iterable[str] = ()) -> int:
        """Write ``manifest.jsonl`` whole (without ``exclude``), then remove the segments."""
        segments = [n for n in manifest_names(self.root) if n != MANIFEST]
        ordered, data = merged_manifest(self.root, order, exclude)
        try:
            self._fs.pipe_file(f"{self._path}/{MANIFEST}", data)
            for name in segments:
                self._fs.rm(f"{self._path}/{name}")
        except OSError as e:
            raise RunError(f"{self.root}: cannot merge the manifests ({e}).") from e
        self.done = {e.id: e for e in ordered}
        return len(ordered)

    def _drop_damaged(self, entries: list[ManifestEntry]) -> None:
        """Unlist finished samples whose shard is missing or cut short, so they are redone."""
        bad = damaged_samples(self.root, entries)
        if bad:
            warn_redone(self.root, bad)
            self._rewrite_manifest(None, bad)

    def write_results(self, results: Mapping[str, Any]) -> str:
        """Write ``results.json``."""
        target = join(self.root, RESULTS)
        self._fs.pipe_file(
            f"{self._path}/{RESULTS}", json.dumps(results, indent=2, ensure_ascii=False).encode()
        )
        return target

    def write_stats(self, data: bytes) -> str:
        """Write ``stats.safetensors`` (statistics over every token)."""
        from actcap.storage.stats_file import STATS_FILE

        self._fs.pipe_file(f"{self._path}/{STATS_FILE}", data)
        return join(self.root, STATS_FILE)

    def close(self) -> None:
        """Seal the open shard."""
        self.flush()

    def abandon(self) -> None:
        """Drop the open shard without sealing it (what a crash does; tests use it)."""
        if self._file is not None:
            self._file = None
        self._pending = []

    def __enter__(self) -> RemoteRunWriter:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Seal the open shard."""
        self.close()
