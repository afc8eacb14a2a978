"""Writing a run directory: :class:`RunWriter`, its lock, samples, manifest and results.

A sample is done when its manifest line exists: its file is written under a temporary name and
renamed first (or its bytes are appended to a shard and fsynced), so a crash at any instant leaves
every sample whole or absent. The manifest lines are the index: for a shard they carry the shard,
offset and length of the sample's bytes. The lock is an ``flock`` on the run directory itself
(and on ``.lock``, which also names the holder's pid), which the kernel releases when its process
dies, so a killed run never blocks a resume, and deleting ``.lock`` lets no second writer in.
Extra writers (Ray actors, each with its own id) write their own segment under ``manifests/`` and
their own shards; readers take the union of all manifests, first line per id wins, so a sample
written twice (a retried batch) counts once.

Safety: actcap writes only into a new or empty folder or one of its own runs; it never writes
through a symbolic link inside a run, removes only its own leftovers, and reads only files inside
the run (a manifest path that is absolute, climbs out with ``..`` or leads out through a link is
corrupt). A resume checks that every finished sample's file or shard range is there and whole,
and that every option that changes an answer, a grade or an activation matches ``run.json``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from torch import Tensor

from actcap.errors import RunError
from actcap.storage.encode import encode_sample
from actcap.storage.format import SampleMeta
from actcap.storage.layout import (
    LOCK,
    MANIFEST,
    MANIFESTS,
    PREFIXES,
    RESULTS,
    ROOT_TEMP_NAME,
    RUN_FILE,
    SAMPLES,
    SHARD_BYTES,
    SHARD_FILE,
    SHARDS,
    TEMP_NAME,
    check_out_folder,
    is_run_record,
    is_sample_name,
    new_writer_id,
    refuse_run_links,
    sample_filename,
)
from actcap.storage.location import local_path
from actcap.storage.manifest import (
    ManifestEntry,
    cut_torn_line,
    manifest_bytes,
    manifest_line,
    manifest_names,
    merged_manifest,
    read_all_manifests,
    replace_manifest,
)
from actcap.storage.prefixes import SharedPrefix, split_shared_prefix
from actcap.storage.reader import prefix_fault
from actcap.storage.records import FinishedSample
from actcap.storage.repair import drop_damaged
from actcap.storage.runconfig import check_run_config
from actcap.storage.safety import RunDirs, lock_run, refuse_link
from actcap.storage.shards import ShardAppender


class RunWriter:
    """Writes one run directory; the main writer holds its lock from :meth:`open` to :meth:`close`.

    Example:
        >>> with RunWriter.open("runs/x", config, resume=False) as run:
        ...     run.write_sample("q1", record, acts, meta)
    """

    def __init__(
        self,
        dirs: RunDirs,
        lock_fd: int,
        *,
        storage: Literal["files", "shards"] = "files",
        shard_bytes: int = SHARD_BYTES,
        writer_id: str | None = None,
    ) -> None:
        """Use :meth:`open` (the run's main writer) or :meth:`attach` (an extra writer).

        The writer owns ``dirs`` (and its run folder's descriptor) from here on.
        """
        root = dirs.root
        self.root = root
        self.dirs = dirs
        self._lock_fd = lock_fd
        self.storage: str = storage
        self.writer_id = writer_id or new_writer_id()
        self.manifest_name = MANIFEST if lock_fd >= 0 else f"{MANIFESTS}/{self.writer_id}.jsonl"
        # An extra writer's segment is created with its first sample, so a worker that writes
        # nothing (one still starting when the run ends) leaves no file behind after the merge.
        self._manifest: BinaryIO | None = self._open_manifest() if lock_fd >= 0 else None
        self.done: dict[str, ManifestEntry] = {e.id: e for e in read_all_manifests(root)}
        self._shards = ShardAppender(dirs, self.writer_id, shard_bytes)
        self._prefixes: set[str] = set()
        """Shared prefixes known whole in this session (written, or found and checked)."""

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        config: Mapping[str, Any],
        *,
        resume: bool = False,
        storage: Literal["files", "shards"] = "files",
        shard_bytes: int = SHARD_BYTES,
    ) -> RunWriter:
        """Create or resume a run directory and take its lock.

        Args:
            root: The run directory.
            config: What this run does (model, benchmark, capture, ...), stored in ``run.json``.
                A resumed run must have the same ``model``, ``benchmark`` and ``capture``.
            resume: Continue a run that has finished samples.
            storage: One file per sample, or shards of about ``shard_bytes`` each. A resumed
                run may change it: every manifest line says where its sample is.
            shard_bytes: Size at which a shard is closed and the next begun.

        Raises:
            RunError: When another process holds the lock, the directory holds another run or
                something that is not a run, it has samples and ``resume`` is False, an option
                differs from the resumed run's, or a name of the run is a symbolic link.
        """
        path = local_path(root)
        refuse_link(path)  # before anything is created in its target
        refuse_run_links(path)
        check_out_folder(path)
        dir_fd, lock_fd = lock_run(path, LOCK)
        dirs = RunDirs(path, dir_fd)
        try:
            refuse_run_links(path)  # again, now that no other actcap process writes here
            entries = read_all_manifests(path)
            record = check_run_config(path, config, resume, bool(entries))
            if record is not None:
                dirs.write_atomic("", RUN_FILE, [record])
            if resume and entries:
                drop_damaged(dirs, entries)
            writer = cls(dirs, lock_fd, storage=storage, shard_bytes=shard_bytes)
        except BaseException:
            dirs.close()
            os.close(lock_fd)  # releases the flocks
            os.close(dir_fd)
            raise
        try:
            writer.cleanup_leftovers()
        except BaseException:
            writer.close()
            raise
        return writer

    @classmethod
    def attach(
        cls,
        root: str | os.PathLike[str],
        writer_id: str,
        *,
        storage: Literal["files", "shards"] = "files",
        shard_bytes: int = SHARD_BYTES,
    ) -> RunWriter:
        """An extra writer of a run whose main writer (holding the lock) is open elsewhere.

        It appends to its own segment ``manifests/<writer_id>.jsonl`` and its own shards, so
        extra writers never share a file; the main writer merges the segments at the end.

        Raises:
            RunError: When the run directory does not exist or cannot be written.
        """
        path = local_path(root)
        if not (path / RUN_FILE).is_file():
            raise RunError(f"{path}: not a run directory (no {RUN_FILE}); open it first.")
        refuse_run_links(path)
        try:
            dirs = RunDirs.open(path)
        except OSError as e:
            raise RunError(f"{path}: cannot write the run directory ({e.strerror or e}).") from e
        try:
            return cls(dirs, -1, storage=storage, shard_bytes=shard_bytes, writer_id=writer_id)
        except BaseException as e:
            dirs.close()
            os.close(dirs.root_fd)
            if isinstance(e, OSError) and not isinstance(e, RunError):
                raise RunError(
                    f"{path}: cannot write the run directory ({e.strerror or e})."
                ) from e
            raise

    def cleanup_leftovers(self) -> list[Path]:
        """Remove actcap's own leftovers of a crash, and nothing else.

        Its temporary files (names of exactly actcap's temporary form), and sample files or
        shards that no manifest names, are removed; nothing is removed unless the folder's
        ``run.json`` marks it an actcap run, and no link is followed (names are listed and
        removed through the writer's folder descriptors).

        Only the main writer calls this, when no extra writer is running.

        Raises:
            RunError: When ``samples/`` or ``shards/`` is a symbolic link.
        """
        dirs = self.dirs
        record = dirs.read("", RUN_FILE)
        if record is None or not is_run_record(record):
            return []  # not an actcap run: delete nothing
        removed = []
        listed = {e.file for e in self.done.values() if e.file}
        folders: tuple[tuple[str, Callable[[str], object]], ...] = (
            (SAMPLES, is_sample_name),
            (SHARDS, SHARD_FILE.fullmatch),
            (PREFIXES, lambda name: False),  # kept: a later sample or resume may use it
        )
        for folder, ours in folders:
            for name in dirs.listdir(folder):
                leftover = TEMP_NAME.fullmatch(name) or (
                    ours(name) and f"{folder}/{name}" not in listed
                )
                if leftover and dirs.is_file(folder, name):
                    dirs.unlink(folder, name)
                    removed.append(dirs.path(folder, name))
        for name in dirs.listdir(""):
            if ROOT_TEMP_NAME.fullmatch(name) and dirs.is_file("", name):
                dirs.unlink("", name)
                removed.append(dirs.path("", name))
        return removed

    def is_done(self, sample_id: str) -> bool:
        """Whether the sample already has a manifest line."""
        return sample_id in self.done

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
        """Write a sample's activations (a file, or bytes in a shard), then its manifest line.

        Raises:
            RunError: When the sample is already done, or the disk is full or unwritable.
        """
        if sample.id in self.done:
            raise RunError(f"{self.root}: sample {sample.id!r} is already in the manifest.")
        sample, prefix = split_shared_prefix(sample)
        sample_id, record = sample.id, sample.record
        activations, meta = sample.activations, sample.meta
        input_ids, output_ids = sample.input_ids, sample.output_ids
        rel: str | None = None
        where: dict[str, int] = {}
        try:
            if prefix is not None:
                self._store_prefix(prefix)  # durable before any sample that leans on it
            if activations is not None and meta is not None:
                if self.storage == "shards":
                    parts = encode_sample(
                        sample_id, activations, meta, input_ids=input_ids, output_ids=output_ids
                    )
                    name, offset, length = self._shards.append(parts)
                    rel, where = f"{SHARDS}/{name}", {"offset": offset, "length": length}
                else:
                    name = sample_filename(sample_id)
                    rel = f"{SAMPLES}/{name}"
                    parts = encode_sample(
                        str(self.root / rel),
                        activations,
                        meta,
                        input_ids=input_ids,
                        output_ids=output_ids,
                    )
                    self.dirs.write_atomic(SAMPLES, name, parts)
            line = manifest_line(sample_id, rel, where, record)
            data = (json.dumps(line, ensure_ascii=False, default=str) + "\n").encode()
            if self._manifest is None:
                self._manifest = self._open_manifest()
            self._manifest.write(data)
            self._manifest.flush()
            os.fsync(self._manifest.fileno())
        except OSError as e:
            self._repair_manifest()
            raise RunError(
                f"{self.root}: cannot write sample {sample_id!r} ({e.strerror or e}). Finished samples "
                "are safe; free space or fix permissions, then rerun with --resume."
            ) from e
        entry = ManifestEntry(sample_id, rel, line)
        self.done[sample_id] = entry
        return entry

    def _open_manifest(self) -> BinaryIO:
        """Open this writer's manifest for appending, after cutting a torn last line.

        Raises:
            RunError: When the manifest (or its folder) is a link, or it has other hard links.
        """
        folder, _, name = self.manifest_name.rpartition("/")
        cut_torn_line(self.dirs, folder, name)
        try:
            fd = self.dirs.create(folder, name, append=True)
            new = True
        except FileExistsError:
            fd = self.dirs.open_existing(folder, name, os.O_WRONLY | os.O_APPEND)
            new = False
        except OSError as e:
            if e.errno == errno.ELOOP:
                refuse_link(self.dirs.path(folder, name))
            raise
        handle = os.fdopen(fd, "ab")  # closed in close()
        if new:
            self.dirs.fsync(folder)  # the new file's name is durable too
        return handle

    def _repair_manifest(self) -> None:
        """After a failed append, cut any partial line so the manifest stays whole."""
        if self._manifest is not None:
            with contextlib.suppress(OSError):
                self._manifest.close()
        self._manifest = None
        with contextlib.suppress(OSError):
            self._manifest = self._open_manifest()

    def flush(self) -> None:
        """Nothing to do: every sample is durable once written (object-store writers differ)."""

    def merge_segments(self, order: Iterable[str] | None = None) -> int:
        """Fold every writer's segment into ``manifest.jsonl``, one line per id, and remove them.

        Call this on the main writer once the extra writers are done. The merged manifest is
        written whole and renamed into place before any segment is removed, so a crash at any
        point leaves every sample listed (at worst twice, which readers fold into one).

        Args:
            order: Sample ids in the order the manifest should list them; others follow.

        Returns:
            The number of samples in the merged manifest.
        """
        if self._lock_fd < 0:
            raise RunError(f"{self.root}: only the run's main writer merges manifests.")
        segments = [n for n in manifest_names(self.root) if n != MANIFEST]
        ordered, data = merged_manifest(self.root, order)
        if not segments:
            return len(ordered)
        if self._manifest is not None:
            with contextlib.suppress(OSError):
                self._manifest.close()
        replace_manifest(self.dirs, data)
        self._manifest = self._open_manifest()
        self.done = {e.id: e for e in ordered}
        return len(ordered)

    def rewrite_manifest(self, lines: Sequence[Mapping[str, Any]]) -> None:
        """Replace ``manifest.jsonl`` with ``lines`` (the same samples, records updated).

        For records completed after the samples were written (lm-eval's metrics): the manifest
        is written whole and renamed into place through the run's folder descriptors.
        """
        if self._lock_fd < 0:
            raise RunError(f"{self.root}: only the run's main writer rewrites the manifest.")
        if self._manifest is not None:
            with contextlib.suppress(OSError):
                self._manifest.close()
        replace_manifest(self.dirs, manifest_bytes(lines))
        self._manifest = self._open_manifest()
        self.done = {
            str(r["id"]): ManifestEntry(
                str(r["id"]), r.get("file") if isinstance(r.get("file"), str) else None, dict(r)
            )
            for r in lines
        }

    def write_results(self, results: Mapping[str, Any]) -> str:
        """Write ``results.json`` atomically."""
        path = self.root / RESULTS
        refuse_link(path)
        self.dirs.write_atomic(
            "", RESULTS, [json.dumps(results, indent=2, ensure_ascii=False).encode()]
        )
        return str(path)

    def _store_prefix(self, prefix: SharedPrefix) -> None:
        """Write a shared prefix once per run: kept when a whole one is there, else (re)written.

        Writers of one run (Ray workers) that meet a new prefix at once may each write it; the
        last rename wins, and its rows equal the others' up to floating-point noise.
        """
        if prefix.key in self._prefixes:
            return
        if prefix_fault(self.root, prefix.key) is not None:  # missing, or damaged: redo it
            parts = encode_sample(
                str(self.dirs.path(PREFIXES, prefix.filename)),
                prefix.activations,
                prefix.meta,
                input_ids=prefix.input_ids,
            )
            self.dirs.write_atomic(PREFIXES, prefix.filename, parts)
        self._prefixes.add(prefix.key)

    def write_stats(self, data: bytes) -> str:
        """Write ``stats.safetensors`` (statistics over every token) atomically."""
        from actcap.storage.stats_file import STATS_FILE

        path = self.root / STATS_FILE
        refuse_link(path)
        self.dirs.write_atomic("", STATS_FILE, [data])
        return str(path)

    def close(self) -> None:
        """Close the manifest and shards, and release the lock."""
        if self._manifest is not None:
            with contextlib.suppress(OSError):
                self._manifest.close()
        self._manifest = None
        self._shards.close()
        if self.dirs.root_fd < 0:
            return
        self.dirs.fsync(SAMPLES)
        self.dirs.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases its flock
            self._lock_fd = -1
        os.close(self.dirs.root_fd)  # and the directory's
        self.dirs.root_fd = -1

    def __enter__(self) -> RunWriter:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Release the lock."""
        self.close()
