"""The run directory: one evaluation's config, manifest, sample files, results and lock.

    run/
      run.json          config: model, benchmark, capture spec, versions, start time
      manifest.jsonl    one line per finished sample, appended and fsynced after its file is in place
      manifests/        one manifest segment per extra writer (a Ray actor), merged at the end
      samples/          one activation file per sample (layout "files")
      shards/           many samples per file, ~1 GB each (layout "shards")
      results.json      accuracy overall and per category, written at the end
      .lock             held (flock) while a process writes

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
import hashlib
import json
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from torch import Tensor

from actcap.errors import FormatError, RunError, UnknownNameError
from actcap.storage.files import (
    check_question_id,
    encode_sample,
    parse_header,
    read_header,
)
from actcap.storage.format import FORMAT_VERSION, SUFFIX, SampleMeta, ShardSlice
from actcap.storage.location import (
    PathOrUrl,
    exists,
    is_url,
    join,
    list_names,
    local_path,
    read_bytes,
    url_fs,
)
from actcap.storage.records import FinishedSample
from actcap.storage.safety import (
    NOFOLLOW,
    TEMP_PATTERN,
    RunDirs,
    UnsafePathError,
    lock_run,
    refuse_link,
    run_path,
)
from actcap.storage.shards import ShardAppender

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
MANIFESTS = "manifests"
RESULTS = "results.json"
SAMPLES = "samples"
SHARDS = "shards"
LOCK = ".lock"
WORKERS = "workers"
"""Folder of a local run where each Ray actor records who it is (host, pid, device)."""
RUN_FORMAT_VERSION = 2
"""The newest run layout this actcap reads. 1: a file per sample, one manifest. 2: shards (manifest
lines with offset and length) and manifest segments. A run records the oldest version that reads
it, so a run of one file per sample stays readable by actcap versions that know only 1."""
SHARD_BYTES = 1 << 30
"""Shards are closed and a new one begun once they reach this size (1 GiB)."""
AUTO_SHARD_SAMPLES = 10_000
"""``storage="auto"`` picks shards for runs of more questions than this."""
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_PLAIN_ID = re.compile(r"[a-z0-9_]([a-z0-9_.-]{0,78}[a-z0-9_])?")
"""Ids kept as their own file name: lowercase-safe, no leading or trailing dot or dash."""
_HASHED_STEM = re.compile(r".*-[0-9a-f]{12}")
"""The form of a cleaned id with its hash: no id is kept as a name of that form."""
_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(10)),
    *(f"lpt{i}" for i in range(10)),
}
"""Names Windows reserves whatever their suffix."""
_TEMP = re.compile(TEMP_PATTERN)
"""actcap's temporary names (:func:`actcap.storage.safety.temp_name`) in ``samples/`` and ``shards/``."""
_ROOT_TEMP = re.compile(
    TEMP_PATTERN.replace("(?P<name>.+)", r"(run\.json|results\.json|manifest\.jsonl)")
)
"""actcap's temporary names in the run folder itself (exactly; another tool's ``.x.tmp`` is kept)."""
RUN_MARKER = "actcap-run"
"""``run.json``'s ``format`` value: what makes a folder an actcap run."""
_SHARD_FILE = re.compile(r"[0-9a-f]{12}-\d{5,}\.shard")
"""The names actcap gives shards (see :func:`actcap.storage.shards.shard_name`)."""

Storage = Literal["files", "shards", "auto"]
"""One file per sample, many samples per shard, or shards above :data:`AUTO_SHARD_SAMPLES`."""


def resolve_storage(
    storage: str, n_samples: int, out: PathOrUrl | None = None
) -> Literal["files", "shards"]:
    """The layout a run gets: ``auto`` means shards at a URL or above :data:`AUTO_SHARD_SAMPLES`.

    Raises:
        RunError: For an unknown layout name.
    """
    if storage == "auto":
        big = n_samples > AUTO_SHARD_SAMPLES
        return "shards" if big or (out is not None and is_url(out)) else "files"
    if storage not in ("files", "shards"):
        raise RunError(f"Unknown storage layout {storage!r}; use files, shards or auto.")
    return storage  # type: ignore[return-value]


def new_writer_id() -> str:
    """A short id that no other writer of any run shares (names its shards and segment)."""
    return uuid.uuid4().hex[:12]


def sample_filename(sample_id: str) -> str:
    """A file name for a sample id, inside ``samples/``, distinct for distinct ids.

    Ids of lowercase letters, digits, ``_``, ``.`` and ``-`` are kept as they are. Any other id
    (upper case, ``/``, ``..``, NUL, spaces, ...) is cleaned, lowercased and suffixed with a hash
    of the original; no kept id has that suffixed form. So two ids never share a name, also on a
    case-insensitive file system (macOS, Windows, SMB). Readers use the name in the manifest,
    so runs written under an earlier rule stay readable.
    """
    if (
        _PLAIN_ID.fullmatch(sample_id)
        and not _HASHED_STEM.fullmatch(sample_id)
        and sample_id.split(".")[0] not in _RESERVED
    ):
        return sample_id + SUFFIX
    cleaned = _SAFE.sub("_", sample_id).strip("._-").lower()[:80]
    digest = hashlib.sha256(sample_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned or 'sample'}-{digest}{SUFFIX}"


def _is_sample_name(name: str) -> bool:
    """Whether a name in ``samples/`` is one actcap may have given a sample file."""
    return name.endswith(SUFFIX) and not name.startswith(".")


def _refuse_links(root: Path) -> None:
    """Refuse a run folder where any of actcap's own names (or a manifest segment) is a link."""
    for name in (LOCK, RUN_FILE, MANIFEST, RESULTS, SAMPLES, SHARDS, MANIFESTS, WORKERS):
        refuse_link(root / name)
    if (root / MANIFESTS).is_dir():
        for p in (root / MANIFESTS).iterdir():
            refuse_link(p)


def is_run_record(data: bytes) -> bool:
    """Whether bytes are an actcap ``run.json``: the only mark that makes a folder an actcap run.

    Its ``format`` is :data:`RUN_MARKER`; a run written before that mark existed must have an
    integer ``run_format_version``, a ``format_version`` and ``versions.actcap``. A folder
    whose ``run.json`` merely has a ``format_version`` key is another tool's, and is never
    written into nor cleaned up.
    """
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    if not isinstance(record, dict):
        return False
    if record.get("format") == RUN_MARKER:
        return True
    version = record.get("run_format_version")
    versions = record.get("versions")
    return (
        isinstance(version, int)
        and not isinstance(version, bool)
        and "format_version" in record
        and isinstance(versions, dict)
        and isinstance(versions.get("actcap"), str)
    )


def check_out_folder(root: PathOrUrl) -> None:
    """Refuse to write into an existing folder that is neither empty nor an actcap run.

    A folder holding only actcap's lock or temporary files (a crash before its ``run.json``
    was written) counts as empty.

    Raises:
        RunError: When the folder holds anything else and no actcap ``run.json``.
    """
    text = os.fspath(root)
    if not is_url(text) and not local_path(text).is_dir():
        return  # created by the writer (a file in its way fails there, naming the path)
    try:
        names = [n for n in list_names(text, "") if n != LOCK and not _ROOT_TEMP.fullmatch(n)]
    except OSError as e:
        raise RunError(f"{text}: cannot read the run directory ({e.strerror or e}).") from e
    if not names:
        return
    run_file = join(text, RUN_FILE)
    if RUN_FILE in names and not (not is_url(text) and local_path(run_file).is_symlink()):
        with contextlib.suppress(FormatError):
            if is_run_record(read_bytes(run_file)):
                return
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise RunError(
        f"{text}: this folder is not empty ({shown}) and is not an actcap run (no actcap "
        f"{RUN_FILE}); actcap writes only into a new or empty folder or its own run, and "
        "deletes nothing here. Choose another --out."
    )


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


def damaged_samples(root: PathOrUrl, entries: Iterable[ManifestEntry]) -> dict[str, str]:
    """Finished samples whose activations are not there whole: sample id to why.

    A file must exist and its safetensors header parse, with every tensor inside the file, and
    name the sample's id (``extra.question_id``) where it names one; a shard range must lie
    inside its shard and (locally) its header parse and name the id likewise. At a URL only the
    shards' sizes are checked (one request per shard, not one per sample).
    """
    text = os.fspath(root)
    real_root = None if is_url(text) else os.path.realpath(local_path(text))
    bad: dict[str, str] = {}
    slices: dict[str, list[tuple[ManifestEntry, ShardSlice]]] = {}
    for e in entries:
        try:
            source = e.source(text, real_root)
            if isinstance(source, Path):
                check_question_id(read_header(source), e.id, str(source))
            elif isinstance(source, ShardSlice):
                slices.setdefault(source.shard, []).append((e, source))
        except FormatError as err:
            bad[e.id] = str(err)
    for shard, items in slices.items():
        bad.update(_damaged_in_shard(shard, items))
    return bad


def _damaged_in_shard(shard: str, items: list[tuple[ManifestEntry, ShardSlice]]) -> dict[str, str]:
    """The samples of one shard whose byte range is missing, cut short or not safetensors."""
    fd = -1
    try:
        if is_url(shard):
            fs, path = url_fs(shard)
            size = int(fs.size(path))
        else:
            fd = os.open(local_path(shard), os.O_RDONLY | NOFOLLOW)
            size = os.fstat(fd).st_size
    except OSError as err:
        return {e.id: f"{shard}: cannot read the shard ({err})." for e, _ in items}
    bad: dict[str, str] = {}
    try:
        for e, part in items:
            end = part.offset + part.length
            if end > size:
                bad[e.id] = f"{part}: the shard has {size} bytes, the sample ends at {end}."
            elif fd >= 0:
                try:
                    header = parse_header(_reader_at(fd, part.offset), part.length, str(part))
                    check_question_id(header, e.id, str(part))
                except FormatError as err:
                    bad[e.id] = str(err)
    finally:
        if fd >= 0:
            os.close(fd)
    return bad


def _reader_at(fd: int, base: int) -> Callable[[int, int], bytes]:
    """``read(start, n)`` over a file's bytes from ``base`` on."""
    return lambda start, n: os.pread(fd, n, base + start)


def _cut_torn_line(dirs: RunDirs, folder: str, name: str) -> None:
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


def drop_damaged(dirs: RunDirs, entries: list[ManifestEntry]) -> list[ManifestEntry]:
    """Check every finished sample of a run being resumed; unlist those to redo.

    The manifest is rewritten whole without them (and any segments folded into it) and renamed
    into place, so readers, which keep the first line of an id, see only the redone sample.

    Returns:
        The entries still finished.
    """
    bad = damaged_samples(dirs.root, entries)
    if not bad:
        return entries
    warn_redone(dirs.root, bad)
    ordered, data = merged_manifest(dirs.root, None, exclude=bad)
    _replace_manifest(dirs, data)
    return ordered


def warn_redone(root: PathOrUrl, bad: Mapping[str, str]) -> None:
    """Warn that damaged finished samples will be answered again, with the first reasons."""
    shown = "; ".join(f"{i}: {why}" for i, why in list(bad.items())[:3])
    more = " ..." if len(bad) > 3 else ""
    warnings.warn(
        f"{os.fspath(root)}: {len(bad)} finished sample(s) missing or damaged, answered again: "
        f"{shown}{more}",
        stacklevel=4,
    )


def _replace_manifest(dirs: RunDirs, data: bytes) -> None:
    """Write ``manifest.jsonl`` whole, renamed into place, then remove the segments it holds."""
    segments = [n for n in dirs.listdir(MANIFESTS) if n.endswith(".jsonl")]
    dirs.write_atomic("", MANIFEST, [data])
    for name in segments:
        dirs.unlink(MANIFESTS, name)
    if segments:
        dirs.fsync(MANIFESTS)


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
        _refuse_links(path)
        check_out_folder(path)
        dir_fd, lock_fd = lock_run(path, LOCK)
        dirs = RunDirs(path, dir_fd)
        try:
            _refuse_links(path)  # again, now that no other actcap process writes here
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
        _refuse_links(path)
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
        for folder, ours in ((SAMPLES, _is_sample_name), (SHARDS, _SHARD_FILE.fullmatch)):
            for name in dirs.listdir(folder):
                leftover = _TEMP.fullmatch(name) or (
                    ours(name) and f"{folder}/{name}" not in listed
                )
                if leftover and dirs.is_file(folder, name):
                    dirs.unlink(folder, name)
                    removed.append(dirs.path(folder, name))
        for name in dirs.listdir(""):
            if _ROOT_TEMP.fullmatch(name) and dirs.is_file("", name):
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
        sample_id, record = sample.id, sample.record
        activations, meta = sample.activations, sample.meta
        input_ids, output_ids = sample.input_ids, sample.output_ids
        if sample_id in self.done:
            raise RunError(f"{self.root}: sample {sample_id!r} is already in the manifest.")
        rel: str | None = None
        where: dict[str, int] = {}
        try:
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
        _cut_torn_line(self.dirs, folder, name)
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
        _replace_manifest(self.dirs, data)
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
        _replace_manifest(self.dirs, manifest_bytes(lines))
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


FREE_OPTIONS = frozenset(
    {"batch_size", "limit", "sort_by_length", "prefix_cache", "background_write"}
)
"""Options a resume may change: they select questions or set speed, never change an answer."""
_LABELS = {
    "model": "--model",
    "model_id": "--model (the model it resolves to)",
    "questions_digest": "the question set (the benchmark file or its --field mapping)",
    "benchmark": "--benchmark",
    "capture": "capture (--no-capture)",
    "sites": "the site list",
    "layers": "--layers",
    "kinds": "--sites",
    "token_selection": "--token-selection",
    "dtype": "--dtype",
    "capture_generated": "--capture-generated",
    "few_shot": "--few-shot",
    "mode": "--mode",
    "grader": "--grader",
    "choice_format": "--choice-format",
    "max_new_tokens": "--max-new-tokens",
    "overflow": "--overflow",
    "chat": "the chat template setting",
}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Every setting that changes an answer, grade or activation and differs between two configs.

    Each reads as ``"--few-shot differs (run: 0, now: 5)"``.

    Compared: the model (the folder or hub id it resolves to, where both record it), benchmark,
    the question set's digest (before ``--limit``), the captured sites, every capture setting and
    every option but :data:`FREE_OPTIONS`. A key missing on either side (a run written by an older actcap) is
    unknown, and accepted.
    """
    now = json.loads(json.dumps(dict(new), default=str))  # tuples as lists, as in run.json
    pairs: list[tuple[str, Any, Any]] = []
    # The resolved model (a local folder's real path), when both record it, not the typed name.
    model = "model_id" if "model_id" in old and "model_id" in now else "model"
    for key in (model, "benchmark", "questions_digest", "capture", "sites", "options"):
        if key not in old or key not in now:
            continue
        a, b = old[key], now[key]
        if key in ("capture", "options") and isinstance(a, dict) and isinstance(b, dict):
            pairs += [(k, a[k], b[k]) for k in a if k in b and k not in FREE_OPTIONS]
        else:
            pairs.append((key, a, b))
    return [f"{_LABELS.get(k, k)} differs (run: {a!r}, now: {b!r})" for k, a, b in pairs if a != b]


def check_run_config(
    root: PathOrUrl, config: Mapping[str, Any], resume: bool, has_samples: bool
) -> bytes | None:
    """Check a run's config against its ``run.json``; the new ``run.json`` to write, or None.

    Raises:
        RunError: When the run has samples and ``resume`` is False, or a resume differs in any
            setting that changes an answer, a grade or an activation (all listed at once).
    """
    text = os.fspath(root)
    run_file = join(text, RUN_FILE)
    if exists(run_file):
        try:
            old = json.loads(read_bytes(run_file))
        except (FormatError, ValueError, RecursionError) as e:
            raise RunError(f"{run_file}: unreadable ({e}); choose another --out.") from e
        if not isinstance(old, dict):
            raise RunError(
                f"{run_file}: not an actcap run record (not a JSON object); choose another --out."
            )
        if has_samples and not resume:
            raise RunError(
                f"{text}: this run already has finished samples. Pass --resume to continue it, "
                "or choose another --out."
            )
        if resume and has_samples:
            differences = config_differences(old, config)
            if differences:
                raise RunError(
                    f"{text}: cannot resume with other settings than the run's: "
                    f"{'; '.join(differences)}. Resume with the run's settings (see its "
                    f"{RUN_FILE}), or choose another --out."
                )
            return None  # keep the original run.json (its start time, its versions)
    version = 2 if config.get("storage") == "shards" else 1
    record = {
        "format": RUN_MARKER,
        "run_format_version": version,
        "format_version": FORMAT_VERSION,
        **config,
    }
    return json.dumps(record, indent=2, ensure_ascii=False, default=str).encode()


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
