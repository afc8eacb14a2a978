"""Safety of a run directory: no writes through links, no reads outside the run, one writer.

- :func:`refuse_link`: actcap never writes through a symbolic link inside a run.
- :func:`run_path`: a path from a manifest must stay inside its run: no absolute path, no
  ``..``, no symbolic link leading out. Every reader goes through it (via
  :meth:`actcap.storage.run.ManifestEntry.source`).
- :func:`lock_run`: an ``flock`` on the run directory itself and on its lock file; the kernel
  releases both when the process dies, and deleting the lock file lets no second writer in.
- :class:`RunDirs`: a writer's descriptors of its run folder and of ``samples/``, ``shards/`` and
  ``manifests/``, opened once without following links; every file is created, renamed, synced
  and removed relative to them, so a folder swapped for a link, or the run moved, mid-run never
  sends a write anywhere else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from actcap.errors import FormatError, RunError
from actcap.storage.location import PathOrUrl, is_url, join, local_path

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""``open`` flag that fails on a symbolic link (where the platform has it)."""
DIRECTORY = getattr(os, "O_DIRECTORY", 0)
"""``open`` flag that fails on anything but a directory."""


def _link_error(path: Path) -> RunError:
    return RunError(
        f"{path}: is a symbolic link; actcap never writes through a link inside a run. "
        "Remove the link, or choose another --out."
    )


def refuse_hard_link(fd: int, path: Path) -> None:
    """Refuse to write into an open file that has other names (a hard link elsewhere).

    Raises:
        RunError: Naming the file.
    """
    if os.fstat(fd).st_nlink > 1:
        raise RunError(
            f"{path}: has other hard links; actcap never writes into a file shared with another "
            "name. Remove it (or the other links), or choose another --out."
        )


def open_dir(path: Path, parent_fd: int | None = None, name: str | None = None) -> int:
    """Open a folder without following a link: ``path``, or ``name`` relative to ``parent_fd``.

    Raises:
        RunError: When it is a symbolic link or not a folder.
        OSError: When it cannot be opened otherwise (missing, no permission).
    """
    flags = os.O_RDONLY | DIRECTORY | NOFOLLOW
    try:
        if parent_fd is None:
            return os.open(path, flags)
        return os.open(name or path.name, flags, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            if os.path.islink(path):
                raise _link_error(path) from None
            raise RunError(f"{path}: is not a folder; choose another --out.") from None
        raise


def temp_name(name: str) -> str:
    """A temporary name for ``name`` (hidden, random, ``.tmp``; see :data:`TEMP_PATTERN`)."""
    return f".{name}.{secrets.token_hex(4)}.tmp"


TEMP_PATTERN = r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp"
"""The exact form of :func:`temp_name`: only names of this form are cleaned up as actcap's."""


def write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write every byte of ``parts`` to ``fd``, one part after another."""
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            view = view[os.write(fd, view) :]


class RunDirs:
    """A writer's descriptors of its run folder and sub-folders; every write goes through them.

    The run folder is opened once, without following a link; ``samples/``, ``shards/`` and
    ``manifests/`` are opened (created when missing) relative to it, also without following a
    link, and kept. Files are created exclusively with ``O_NOFOLLOW``, renamed, synced, listed
    and removed relative to these descriptors, so swapping a folder for a link or moving the
    run mid-run redirects nothing.
    """

    def __init__(self, root: Path, root_fd: int) -> None:
        """Use the open folder ``root_fd`` (``root`` names it in messages); closed by :meth:`close`."""
        self.root = root
        self.root_fd = root_fd
        self._fds: dict[str, int] = {}

    @classmethod
    def open(cls, root: Path) -> RunDirs:
        """Open an existing run folder.

        Raises:
            RunError: When it is a link or no folder.
            OSError: When it cannot be opened.
        """
        return cls(root, open_dir(root))

    def path(self, folder: str, name: str = "") -> Path:
        """The path of a name, for messages."""
        where = self.root / folder if folder else self.root
        return where / name if name else where

    def fd(self, folder: str, create: bool = True) -> int:
        """The descriptor of ``folder`` ("" is the run folder), opened once; -1 when missing.

        Raises:
            RunError: When it is a symbolic link or no folder.
        """
        if not folder:
            return self.root_fd
        if folder not in self._fds:
            if create:
                try:
                    os.mkdir(folder, 0o777, dir_fd=self.root_fd)
                except FileExistsError:
                    pass
                else:
                    os.fsync(self.root_fd)
            try:
                self._fds[folder] = open_dir(self.path(folder), self.root_fd, folder)
            except FileNotFoundError:
                if create:
                    raise
                return -1
        return self._fds[folder]

    def create(self, folder: str, name: str, append: bool = False) -> int:
        """Create a new file exclusively (never through a link), mode 0666 less the umask."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | (os.O_APPEND if append else 0)
        return os.open(name, flags, 0o666, dir_fd=self.fd(folder))

    def open_existing(self, folder: str, name: str, flags: int) -> int:
        """Open a file to write in place (append, truncate), refusing a link or a hard link.

        Raises:
            RunError: When it is a symbolic link or has other hard links.
            OSError: When it cannot be opened.
        """
        try:
            fd = os.open(name, flags | NOFOLLOW, 0o666, dir_fd=self.fd(folder))
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _link_error(self.path(folder, name)) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RunError(f"{self.path(folder, name)}: is not a regular file; remove it.")
            refuse_hard_link(fd, self.path(folder, name))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write_atomic(self, folder: str, name: str, parts: Sequence[bytes | memoryview]) -> None:
        """Write a file whole: a temporary name, fsync, rename over ``name``, fsync the folder.

        A crash or an error leaves the old file (or none), never a partial one.

        Raises:
            OSError: When it cannot be written (the temporary file is removed).
        """
        dir_fd = self.fd(folder)
        for _ in range(100):
            tmp = temp_name(name)
            try:
                fd = self.create(folder, tmp)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{self.path(folder)}: cannot find a free temporary name.")
        try:
            try:
                write_all(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        self.fsync(folder)

    def is_file(self, folder: str, name: str) -> bool:
        """Whether ``name`` is a regular file (not a link) in ``folder``."""
        dir_fd = self.fd(folder, create=False)
        if dir_fd < 0:
            return False
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode)

    def read(self, folder: str, name: str) -> bytes | None:
        """A regular file's bytes (never through a link); None when missing or no file."""
        dir_fd = self.fd(folder, create=False)
        if dir_fd < 0:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | NOFOLLOW, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)

    def listdir(self, folder: str) -> list[str]:
        """The names in ``folder`` (none when it is missing)."""
        dir_fd = self.fd(folder, create=False)
        return os.listdir(dir_fd) if dir_fd >= 0 else []

    def unlink(self, folder: str, name: str) -> None:
        """Remove a name from ``folder`` (a missing one is fine)."""
        dir_fd = self.fd(folder, create=False)
        if dir_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)

    def fsync(self, folder: str) -> None:
        """Make renames and removals in ``folder`` durable (when this writer opened it)."""
        dir_fd = self._fds.get(folder, -1) if folder else self.root_fd
        if dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(dir_fd)

    def close(self) -> None:
        """Close the sub-folders' descriptors (the run folder's belongs to the caller)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def refuse_link(path: Path) -> None:
    """Refuse to write at ``path`` when it is a symbolic link.

    Raises:
        RunError: Naming the link.
    """
    if path.is_symlink():
        raise _link_error(path)


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

    The directory is opened without following a link (``path`` as a link is refused before
    anything is created in its target); its descriptor serves the writer's :class:`RunDirs`.

    Returns:
        The directory's and ``lock_name``'s descriptors.

    Raises:
        RunError: When another process holds the run, ``path`` or the lock file is a link (or
            the lock file a hard link), or it cannot be created or written.
    """
    dir_fd = lock_fd = -1
    try:
        try:
            if path.is_symlink():  # before creating anything inside its target
                raise _link_error(path)
            path.mkdir(parents=True, exist_ok=True)
            dir_fd = open_dir(path)
            if not _try_flock(dir_fd):
                _refuse_held(path, lock_name)
            lock_fd = os.open(lock_name, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o666, dir_fd=dir_fd)
            refuse_hard_link(lock_fd, path / lock_name)
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
