"""Durable, atomic file writes: a temporary name beside the target, fsync, rename, fsync the folder.

A reader or a crash sees either the whole file or none. Temporary names are hidden
(``.<name>.<8 hex>.tmp``; see :data:`actcap.storage.safety.TEMP_PATTERN`) and never followed
through a link.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from actcap.errors import WriteError
from actcap.storage.format import SUFFIX


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _new_temp(path: Path) -> str:
    """Create an empty hidden temporary file beside ``path`` and return its name.

    It is created with mode 0666 less the umask, as any new file (``mkstemp`` would make it
    0600, and the rename would keep that), exclusively, so never through an existing link.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(f"{path.parent}: cannot find a free temporary name.")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file beside it: ``write(tmp)``, fsync, rename, fsync the folder.

    A crash or an error leaves the old file (or none), never a partial one. The file gets the
    permissions the umask gives any new file.

    Raises:
        WriteError: When ``path`` is a folder.
    """
    if path.is_dir():
        raise WriteError(
            f"{path}: is a folder; give a file name to save to (e.g. {path / 'x'}{SUFFIX})."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        mode = os.stat(tmp).st_mode & 0o777  # what the umask gave it
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW)
        try:
            if os.fstat(fd).st_mode & 0o777 != mode:
                os.fchmod(fd, mode)  # safetensors' save_file recreates the file 0600
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""

    def write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    atomic_write(path, write)
