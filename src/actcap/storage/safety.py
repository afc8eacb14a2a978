"""Safety of a run directory: no writes through links, no reads outside the run, one writer.

- :func:`refuse_link`: actcap never writes through a symbolic link inside a run.
- :func:`run_path`: a path from a manifest must stay inside its run: no absolute path, no
  ``..``, no symbolic link leading out. Every reader goes through it (via
  :meth:`actcap.storage.run.ManifestEntry.source`).
- :func:`lock_run`: an ``flock`` on the run directory itself and on its lock file; the kernel
  releases both when the process dies, and deleting the lock file lets no second writer in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from actcap.errors import FormatError, RunError
from actcap.storage.location import PathOrUrl, is_url, join, local_path

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""``open`` flag that fails on a symbolic link (where the platform has it)."""


def refuse_link(path: Path) -> None:
    """Refuse to write at ``path`` when it is a symbolic link.

    Raises:
        RunError: Naming the link.
    """
    if path.is_symlink():
        raise RunError(
            f"{path}: is a symbolic link; actcap never writes through a link inside a run. "
            "Remove the link, or choose another --out."
        )


class UnsafePathError(FormatError):
    """A manifest path that would lead out of its run (absolute, ``..``, or a link out)."""


def run_path(root: PathOrUrl, rel: str, real_root: str | None = None) -> str:
    """Where a path from a manifest lies, checked to stay inside the run.

    Args:
        root: The run (a local path or a URL).
        rel: The path as the manifest gives it, relative to the run.
        real_root: ``os.path.realpath(root)``, when the caller has it already (local runs).

    Returns:
        The location: a local path or a URL.

    Raises:
        UnsafePathError: When ``rel`` is absolute, has an empty, ``.`` or ``..`` part, a
            backslash or NUL, or (locally) leads out of the run through a symbolic link.
    """
    text = os.fspath(root)
    parts = rel.split("/")
    if rel.startswith("/") or rel[1:3] == ":\\" or rel[1:3] == ":/":
        raise UnsafePathError(f"{rel!r} is an absolute path")
    if "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(
            f"{rel!r} is not a plain path inside the run (empty, '.' or '..' parts)"
        )
    if is_url(text):
        return join(text, rel)
    real_root = real_root or os.path.realpath(local_path(text))
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real, real_root]) != real_root:
        # the target is not named: messages reach actcap view's clients, and where a link
        # leads outside the run is none of theirs (``ls -l`` shows it to the run's owner)
        raise UnsafePathError(f"{rel!r} leads out of the run through a symbolic link")
    return str(local_path(text) / rel)


def lock_run(path: Path, lock_name: str) -> tuple[int, int]:
    """Lock a run directory: an ``flock`` on the directory itself, then on its lock file.

    The directory lock cannot be lifted by deleting a file; the lock file ``lock_name`` names the
    holder's pid and keeps out actcap versions that lock only it. Where directories cannot be
    locked (some network file systems), the lock file alone remains.

    Returns:
        The directory's and ``lock_name``'s descriptors (the directory's is -1 when unlockable).

    Raises:
        RunError: When another process holds the run, or it cannot be created or written.
    """
    dir_fd = lock_fd = -1
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
            dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            if not _try_flock(dir_fd):
                _refuse_held(path, lock_name)
            lock_fd = os.open(path / lock_name, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o666)
        except PermissionError as e:
            raise RunError(
                f"{path}: cannot write the run directory ({e.strerror}). Choose another --out or fix its permissions."
            ) from e
        except OSError as e:
            if e.errno == errno.ELOOP:
                refuse_link(path / lock_name)
            raise RunError(f"{path}: cannot create the run directory ({e.strerror or e}).") from e
        if not _try_flock(lock_fd, required=True):
            _refuse_held(path, lock_name)
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        for fd in (lock_fd, dir_fd):
            if fd >= 0:
                os.close(fd)  # releases its flock
        raise
    return dir_fd, lock_fd


def _try_flock(fd: int, required: bool = False) -> bool:
    """Take an exclusive ``flock`` without waiting: False when another process holds it.

    An ``flock`` the file system does not support counts as taken unless ``required``.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        if required:
            raise
    return True


def _refuse_held(path: Path, lock_name: str) -> None:
    """Raise the error for a run another process writes, with the pid its lock file names."""
    holder = "unknown"
    with contextlib.suppress(OSError):
        fd = os.open(path / lock_name, os.O_RDONLY | NOFOLLOW)
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or holder
        finally:
            os.close(fd)
    raise RunError(
        f"{path}: another actcap process (pid {holder}) is writing this run. Wait for it to "
        "finish, or choose another --out."
    )
