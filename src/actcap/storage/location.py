"""Where a run lives: a local folder, written with POSIX durability, or an fsspec URL.

Local paths (and ``file://`` URLs, which are turned into paths) get the full guarantees: atomic
renames, ``fsync`` and an ``flock``. Any other URL (``s3://``, ``gs://``, ``memory://``, ...) is
read and written through fsspec, where each object is written whole and becomes visible when its
write completes; see :mod:`actcap.storage.remote`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from actcap.errors import FormatError

PathOrUrl = str | os.PathLike[str]


def is_url(location: PathOrUrl) -> bool:
    """Whether ``location`` is an fsspec URL other than ``file://``."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: PathOrUrl) -> Path:
    """The local path of a path or ``file://`` URL."""
    return Path(_local_text(location))


def _local_text(location: PathOrUrl) -> str:
    """:func:`local_path` as a string (no ``Path`` made: the per-sample read path uses it)."""
    text = os.fspath(location)
    return text[len("file://") :] if text.startswith("file://") else text


def url_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for a URL.

    Raises:
        FormatError: When fsspec does not know the URL's protocol (its package is missing).
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise FormatError(
            f"{url}: cannot open this URL ({e}). Install the fsspec backend for its protocol "
            "(e.g. s3fs for s3://, gcsfs for gs://)."
        ) from e
    return fs, str(path)


def join(location: str, *parts: str) -> str:
    """Join a URL or path with relative parts using ``/``."""
    return "/".join([location.rstrip("/"), *parts])


def open_fd(path: PathOrUrl, flags: int = 0) -> int:
    """A read-only descriptor of a local regular file (never a FIFO or device, which could block).

    Raises:
        FormatError: When ``path`` is not a regular file.
        OSError: When it cannot be opened.
    """
    fd = os.open(_local_text(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{os.fspath(path)}: not a regular file; not read.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: PathOrUrl) -> BinaryIO:
    """A local regular file opened for reading in binary (see :func:`open_fd`)."""
    return os.fdopen(open_fd(path), "rb")


def read_range(location: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a local file or a URL.

    Raises:
        FormatError: When the file cannot be read.
    """
    try:
        if is_url(location):
            fs, path = url_fs(location)
            return bytes(fs.cat_file(path, start=start, end=end))
        with open_regular(location) as f:
            f.seek(start)
            return f.read(end - start)
    except (OSError, ValueError) as e:
        raise FormatError(f"{location}: cannot read bytes {start}-{end} ({e}).") from e


def exists(location: str) -> bool:
    """Whether a local file or URL exists."""
    if is_url(location):
        fs, path = url_fs(location)
        return bool(fs.exists(path))
    return local_path(location).exists()


def read_bytes(location: str) -> bytes:
    """A whole local file or object.

    Raises:
        FormatError: When it cannot be read.
    """
    try:
        if is_url(location):
            fs, path = url_fs(location)
            return bytes(fs.cat_file(path))
        return local_path(location).read_bytes()
    except (OSError, ValueError) as e:
        raise FormatError(f"{location}: cannot read ({e}).") from e


def list_names(location: str, suffix: str) -> list[str]:
    """Names (not paths) in a folder ending in ``suffix``, sorted; empty when it does not exist."""
    if is_url(location):
        fs, path = url_fs(location)
        if not fs.exists(path):
            return []
        return sorted(
            os.path.basename(p.rstrip("/"))
            for p in fs.ls(path, detail=False)
            if str(p).endswith(suffix)
        )
    folder = local_path(location)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(suffix))
