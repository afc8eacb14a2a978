"""The run directory: one evaluation's config, manifest, sample files, results and lock.

    run/
      run.json          config: model, benchmark, capture spec, versions, start time
      manifest.jsonl    one line per finished sample, appended and fsynced after its file is in place
      samples/          one activation file per sample
      results.json      accuracy overall and per category, written at the end
      .lock             held (flock) while a process writes

A sample is done when its manifest line exists: its file is written under a temporary name and
renamed first, so a crash at any instant leaves every sample whole or absent. The lock is an
``flock`` that the kernel releases when its process dies, so a killed run never blocks a resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from actcap.errors import FormatError, RunError
from actcap.storage.files import atomic_write_bytes, fsync_dir, save_activations
from actcap.storage.format import FORMAT_VERSION, SUFFIX, SampleMeta

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
RESULTS = "results.json"
SAMPLES = "samples"
LOCK = ".lock"
RUN_FORMAT_VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def sample_filename(sample_id: str) -> str:
    """A file name for a sample id that stays inside ``samples/`` whatever the id holds.

    Ids made only of safe characters are kept as they are; any other id (with ``/``, ``..``, NUL,
    spaces, ...) is cleaned and suffixed with a hash of the original, so two ids never collide.
    """
    cleaned = _SAFE.sub("_", sample_id).strip("._")[:80]
    if cleaned == sample_id and cleaned:
        return cleaned + SUFFIX
    digest = hashlib.sha256(sample_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned or 'sample'}-{digest}{SUFFIX}"


@dataclass(frozen=True)
class ManifestEntry:
    """One finished sample, as listed in ``manifest.jsonl``."""

    id: str
    """The question id."""
    file: str | None
    """The activation file, relative to the run directory (None when capture was off)."""
    record: dict[str, Any]
    """The whole line: question, response, reference, correct, score, category, token counts."""

    @property
    def correct(self) -> bool | None:
        """The grade, when the sample was graded."""
        value = self.record.get("correct")
        return bool(value) if value is not None else None


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Read a manifest, tolerating a torn last line (a crash mid-append) but nothing else.

    Raises:
        FormatError: For a corrupt line that is not the last.
    """
    if not path.exists():
        return []
    entries: list[ManifestEntry] = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise ValueError("not an object with a string 'id'")
        except (ValueError, UnicodeDecodeError) as e:
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1].strip()):
                break  # torn final append: that sample is simply not done
            raise FormatError(f"{path}: line {number} is corrupt ({e}).") from e
        file = record.get("file")
        entries.append(ManifestEntry(record["id"], file if isinstance(file, str) else None, record))
    return entries


def _cut_torn_line(path: Path) -> None:
    """Remove a final line without its newline (an append cut short by a crash or a full disk)."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


class RunWriter:
    """Writes one run directory; holds its lock from :meth:`open` to :meth:`close`.

    Example:
        >>> with RunWriter.open("runs/x", config, resume=False) as run:
        ...     run.write_sample("q1", acts, meta, record)
    """

    def __init__(self, root: Path, lock_fd: int) -> None:
        """Use :meth:`open`."""
        self.root = root
        self._lock_fd = lock_fd
        _cut_torn_line(root / MANIFEST)
        self._manifest = open(root / MANIFEST, "ab")  # noqa: SIM115 - closed in close()
        self.done: dict[str, ManifestEntry] = {e.id: e for e in read_manifest(root / MANIFEST)}

    @classmethod
    def open(
        cls, root: str | os.PathLike[str], config: Mapping[str, Any], *, resume: bool = False
    ) -> RunWriter:
        """Create or resume a run directory and take its lock.

        Args:
            root: The run directory.
            config: What this run does (model, benchmark, capture, ...), stored in ``run.json``.
                A resumed run must have the same ``model``, ``benchmark`` and ``capture``.
            resume: Continue a run that has finished samples.

        Raises:
            RunError: When another process holds the lock, the directory holds another run, or
                it has samples and ``resume`` is False.
        """
        path = Path(root)
        try:
            (path / SAMPLES).mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as e:
            raise RunError(
                f"{path}: cannot write the run directory ({e.strerror}). Choose another --out or fix its permissions."
            ) from e
        except OSError as e:
            raise RunError(f"{path}: cannot create the run directory ({e.strerror or e}).") from e
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(lock_fd)
            raise RunError(
                f"{path}: another actcap process (pid {holder}) is writing this run. Wait for it to "
                "finish, or choose another --out."
            ) from None
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
            cls._check_config(path, config, resume)
            writer = cls(path, lock_fd)
        except BaseException:
            os.close(lock_fd)  # releases the flock
            raise
        writer.cleanup_leftovers()
        return writer

    @staticmethod
    def _check_config(path: Path, config: Mapping[str, Any], resume: bool) -> None:
        run_file = path / RUN_FILE
        has_samples = bool(read_manifest(path / MANIFEST))
        if run_file.exists():
            try:
                old = json.loads(run_file.read_text())
            except (OSError, ValueError) as e:
                raise RunError(f"{run_file}: unreadable ({e}); choose another --out.") from e
            if has_samples and not resume:
                raise RunError(
                    f"{path}: this run already has finished samples. Pass --resume to continue it, "
                    "or choose another --out."
                )
            for key in ("model", "benchmark", "capture"):
                if resume and has_samples and old.get(key) != config.get(key):
                    raise RunError(
                        f"{path}: cannot resume: {key} differs from the run's "
                        f"({old.get(key)!r} != {config.get(key)!r}). Use the same options, or another --out."
                    )
            if resume and has_samples:
                return  # keep the original run.json (its start time, its versions)
        record = {
            "run_format_version": RUN_FORMAT_VERSION,
            "format_version": FORMAT_VERSION,
            **config,
        }
        atomic_write_bytes(
            run_file, json.dumps(record, indent=2, ensure_ascii=False, default=str).encode()
        )

    def cleanup_leftovers(self) -> list[Path]:
        """Remove temporary files and sample files without a manifest line (a crash's leftovers)."""
        removed = []
        listed = {e.file for e in self.done.values() if e.file}
        for p in (self.root / SAMPLES).iterdir():
            rel = f"{SAMPLES}/{p.name}"
            if p.name.endswith(".tmp") or (p.suffix == SUFFIX and rel not in listed):
                p.unlink(missing_ok=True)
                removed.append(p)
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
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
        """Write a sample's activation file (if any), then append its manifest line.

        Raises:
            RunError: When the sample is already done, or the disk is full or unwritable.
        """
        if sample_id in self.done:
            raise RunError(f"{self.root}: sample {sample_id!r} is already in the manifest.")
        rel: str | None = None
        try:
            if activations is not None and meta is not None:
                rel = f"{SAMPLES}/{sample_filename(sample_id)}"
                save_activations(
                    self.root / rel, activations, meta, input_ids=input_ids, output_ids=output_ids
                )
            line = {
                "id": sample_id,
                "file": rel,
                **{k: v for k, v in record.items() if k not in ("id", "file")},
            }
            data = (json.dumps(line, ensure_ascii=False, default=str) + "\n").encode()
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

    def _repair_manifest(self) -> None:
        """After a failed append, cut any partial line so the manifest stays whole."""
        with contextlib.suppress(OSError):
            self._manifest.close()
        path = self.root / MANIFEST
        with contextlib.suppress(OSError):
            _cut_torn_line(path)
        self._manifest = open(path, "ab")  # noqa: SIM115

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """Write ``results.json`` atomically."""
        path = self.root / RESULTS
        atomic_write_bytes(path, json.dumps(results, indent=2, ensure_ascii=False).encode())
        return path

    def close(self) -> None:
        """Close the manifest and release the lock."""
        with contextlib.suppress(OSError):
            self._manifest.close()
        fsync_dir(self.root / SAMPLES)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> RunWriter:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Release the lock."""
        self.close()


@dataclass(frozen=True)
class RunInfo:
    """A run directory as read back: config, finished samples, results."""

    root: Path
    """The directory."""
    config: dict[str, Any]
    """``run.json``."""
    entries: list[ManifestEntry]
    """Finished samples, in the order they were written."""
    results: dict[str, Any] | None
    """``results.json`` when the run finished."""

    def sample_paths(self) -> Iterator[tuple[ManifestEntry, Path]]:
        """Each finished sample with its activation file."""
        for e in self.entries:
            if e.file:
                yield e, self.root / e.file


def open_run(root: str | os.PathLike[str]) -> RunInfo:
    """Read a run directory (without taking its lock: readers never block writers).

    Raises:
        FormatError: When the directory is no run, or its records are unreadable or newer.
    """
    path = Path(root)
    run_file = path / RUN_FILE
    if not run_file.is_file():
        raise FormatError(f"{path}: not a run directory (no {RUN_FILE}).")
    try:
        config = json.loads(run_file.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{run_file}: unreadable ({e}).") from e
    version = config.get("run_format_version", 1)
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
        raise FormatError(
            f"{run_file}: run_format_version {version!r} is newer than supported ({RUN_FORMAT_VERSION}); upgrade actcap."
        )
    results = None
    if (path / RESULTS).is_file():
        try:
            results = json.loads((path / RESULTS).read_text())
        except ValueError as e:
            raise FormatError(f"{path / RESULTS}: unreadable ({e}).") from e
    return RunInfo(path, config, read_manifest(path / MANIFEST), results)
