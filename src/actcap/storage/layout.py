"""The run directory's names: its files and folders, sample file names, and what marks a run.

    run/
      run.json          config: model, benchmark, capture spec, versions, start time
      manifest.jsonl    one line per finished sample, appended and fsynced after its file is in place
      manifests/        one manifest segment per extra writer (a Ray actor), merged at the end
      samples/          one activation file per sample (layout "files")
      shards/           many samples per file, ~1 GB each (layout "shards")
      results.json      accuracy overall and per category, written at the end
      .lock             held (flock) while a process writes

Also here: which layout a run gets (:func:`resolve_storage`), a writer's id, and the check that
actcap writes only into a new or empty folder or one of its own runs (:func:`check_out_folder`).
The whole format is described in ``docs/format.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Literal

from actcap.errors import FormatError, RunError
from actcap.storage.format import SUFFIX
from actcap.storage.location import PathOrUrl, is_url, join, list_names, local_path, read_bytes
from actcap.storage.safety import TEMP_PATTERN, refuse_link

RUN_FILE = "run.json"

MANIFEST = "manifest.jsonl"

MANIFESTS = "manifests"

RESULTS = "results.json"

SAMPLES = "samples"

SHARDS = "shards"
PREFIXES = "prefixes"
"""Shared prompt prefixes, one file each (see :mod:`actcap.storage.prefixes`)."""

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

TEMP_NAME = re.compile(TEMP_PATTERN)
"""actcap's temporary names (:func:`actcap.storage.safety.temp_name`) in ``samples/`` and ``shards/``."""

ROOT_TEMP_NAME = re.compile(
    TEMP_PATTERN.replace("(?P<name>.+)", r"(run\.json|results\.json|manifest\.jsonl)")
)
"""actcap's temporary names in the run folder itself (exactly; another tool's ``.x.tmp`` is kept)."""

RUN_MARKER = "actcap-run"
"""``run.json``'s ``format`` value: what makes a folder an actcap run."""

SHARD_FILE = re.compile(r"[0-9a-f]{12}-\d{5,}\.shard")
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


def is_sample_name(name: str) -> bool:
    """Whether a name in ``samples/`` is one actcap may have given a sample file."""
    return name.endswith(SUFFIX) and not name.startswith(".")


def refuse_run_links(root: Path) -> None:
    """Refuse a run folder where any of actcap's own names (or a manifest segment) is a link."""
    for name in (LOCK, RUN_FILE, MANIFEST, RESULTS, SAMPLES, SHARDS, MANIFESTS, WORKERS, PREFIXES):
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
        names = [n for n in list_names(text, "") if n != LOCK and not ROOT_TEMP_NAME.fullmatch(n)]
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
