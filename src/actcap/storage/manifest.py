"""The manifest: one JSON line per finished sample, the run's index.

A sample is done when its line exists. Extra writers (Ray actors) append to their own segment
``manifests/<writer id>.jsonl``; readers take the union of all manifests, first line per id wins,
so a sample written twice (a retried batch) counts once. A torn last line (a crash mid-append) is
dropped by readers and cut by the next writer. Merging rewrites ``manifest.jsonl`` whole and
renames it into place before any segment is removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actcap.errors import FormatError
from actcap.storage.format import ShardSlice
from actcap.storage.layout import MANIFEST, MANIFESTS
from actcap.storage.location import PathOrUrl, exists, join, list_names, read_bytes
from actcap.storage.safety import RunDirs, UnsafePathError, run_path


@dataclass(frozen=True)
class ManifestEntry:
    """One finished sample, as listed in ``manifest.jsonl``."""

    id: str
    """The question id."""
    file: str | None
    """The activation file, relative to the run directory (None when capture was off)."""
    record: dict[str, Any]
    """The whole line: question, response, reference, correct, score, category, token counts."""

    def source(self, root: PathOrUrl, real_root: str | None = None) -> Path | ShardSlice | None:
        """Where the sample's activations are: a file, a slice of a shard, or nowhere.

        Args:
            root: The run directory or URL.
            real_root: ``os.path.realpath(root)`` when the caller has it (saves a lookup).

        Raises:
            FormatError: When the manifest line is corrupt: its path leads out of the run (an
                absolute path, ``..``, a link out), or its offset or length is no count.
        """
        if self.file is None:
            return None
        try:
            location = run_path(root, self.file, real_root)
        except UnsafePathError as e:
            raise UnsafePathError(
                f"{os.fspath(root)}: the manifest line of sample {self.id!r} is corrupt: its file "
                f"{e}. actcap reads only files inside the run; this sample is skipped."
            ) from None
        offset, length = self.record.get("offset"), self.record.get("length")
        if offset is None and length is None:
            return Path(location)
        if not (
            isinstance(offset, int)
            and isinstance(length, int)
            and not isinstance(offset, bool)  # true is an int in Python, and no byte count
            and not isinstance(length, bool)
            and offset >= 0
            and length >= 0
        ):
            raise FormatError(
                f"{os.fspath(root)}: the manifest line of sample {self.id!r} is corrupt: offset "
                f"{offset!r} and length {length!r} are not byte counts."
            )
        return ShardSlice(location, offset, length)

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
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, label: str) -> list[ManifestEntry]:
    """Parse manifest bytes; a torn last line (a crash mid-append) is dropped.

    Raises:
        FormatError: For a corrupt line that is not the last.
    """
    entries: list[ManifestEntry] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise ValueError("not an object with a string 'id'")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # Recursion: nested too deep
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1].strip()):
                break  # torn final append: that sample is simply not done
            raise FormatError(f"{label}: line {number} is corrupt ({e}).") from e
        file = record.get("file")
        entries.append(ManifestEntry(record["id"], file if isinstance(file, str) else None, record))
    return entries


def manifest_names(root: PathOrUrl) -> list[str]:
    """Every manifest of a run, relative to it: ``manifest.jsonl``, then the segments by name."""
    text = os.fspath(root)
    return [MANIFEST] + [f"{MANIFESTS}/{n}" for n in list_names(join(text, MANIFESTS), ".jsonl")]


def read_all_manifests(root: PathOrUrl) -> list[ManifestEntry]:
    """The union of a run's manifests; the first line of each id wins (later ones are retries).

    Raises:
        FormatError: For a corrupt line that is not the last of its manifest.
    """
    text = os.fspath(root)
    seen: dict[str, ManifestEntry] = {}
    for name in manifest_names(text):
        location = join(text, name)
        if not exists(location):
            continue
        for e in parse_manifest(read_bytes(location), location):
            seen.setdefault(e.id, e)
    return list(seen.values())


def manifest_line(
    sample_id: str, file: str | None, where: Mapping[str, int], record: Mapping[str, Any]
) -> dict[str, Any]:
    """A manifest line: id, file, offset and length (in a shard), then the rest of the record."""
    reserved = ("id", "file", "offset", "length")
    return {
        "id": sample_id,
        "file": file,
        **where,
        **{k: v for k, v in record.items() if k not in reserved},
    }


def merged_manifest(
    root: PathOrUrl, order: Iterable[str] | None, exclude: Iterable[str] = ()
) -> tuple[list[ManifestEntry], bytes]:
    """All of a run's manifests as one: one line per id, those in ``order`` first, and its bytes.

    Ids in ``exclude`` (samples to redo) are left out.
    """
    dropped = set(exclude)
    entries = [e for e in read_all_manifests(root) if e.id not in dropped]
    by_id = {e.id: e for e in entries}
    ordered = [by_id.pop(i) for i in order or () if i in by_id]
    ordered += [e for e in entries if e.id in by_id]
    return ordered, manifest_bytes(e.record for e in ordered)


def manifest_bytes(records: Iterable[Mapping[str, Any]]) -> bytes:
    """Manifest lines of records: one JSON object a line, as every writer appends them."""
    return b"".join(
        (json.dumps(dict(r), ensure_ascii=False, default=str) + "\n").encode() for r in records
    )


class DoneIndex:
    """The ids finished by any writer of a local run, kept current by reading only new bytes.

    A Ray actor calls :meth:`refresh` before each batch, so a batch retried after another actor
    died skips the samples that actor finished.
    """

    def __init__(self, root: Path) -> None:
        """Index ``root``'s manifests (read on the first :meth:`refresh`)."""
        self.root = root
        self.ids: set[str] = set()
        self._offsets: dict[str, int] = {}

    def refresh(self) -> set[str]:
        """Read what was appended to any manifest since the last call; return all done ids."""
        for name in manifest_names(self.root):
            path = self.root / name
            start = self._offsets.get(name, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except FileNotFoundError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line still being appended waits
            self.ids.update(e.id for e in parse_manifest(complete, str(path)))
            self._offsets[name] = start + len(complete)
        return self.ids


def cut_torn_line(dirs: RunDirs, folder: str, name: str) -> None:
    """Remove a final line without its newline (an append cut short by a crash or a full disk).

    Raises:
        RunError: When the manifest is a link or has other hard links.
    """
    try:
        fd = dirs.open_existing(folder, name, os.O_RDWR)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


def replace_manifest(dirs: RunDirs, data: bytes) -> None:
    """Write ``manifest.jsonl`` whole, renamed into place, then remove the segments it holds."""
    segments = [n for n in dirs.listdir(MANIFESTS) if n.endswith(".jsonl")]
    dirs.write_atomic("", MANIFEST, [data])
    for name in segments:
        dirs.unlink(MANIFESTS, name)
    if segments:
        dirs.fsync(MANIFESTS)
