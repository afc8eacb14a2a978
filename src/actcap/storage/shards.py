"""Shards: many samples per file, for runs too large for one file per sample.

A shard is the safetensors bytes of one sample after another, nothing between them; the run's
manifest line of a sample gives its shard, offset and length, which makes the manifest the index.
So ``f.seek(offset); safetensors.torch.load(f.read(length))`` reads a sample without actcap.

Each writer appends only to shards named by its own id, so writers never share a file. A sample's
bytes are appended and fsynced before its manifest line is written; a crash can leave bytes at
the end of a shard that no manifest line names, which readers never reach (they read by offset).
A new shard begins once the current one reaches its size limit (1 GiB by default).
"""

from __future__ import annotations

import contextlib
import errno
import os

from actcap.errors import WriteError
from actcap.storage.format import SHARD_SUFFIX
from actcap.storage.layout import SHARDS
from actcap.storage.safety import RunDirs


def shard_name(writer_id: str, sequence: int) -> str:
    """The file name of a writer's ``sequence``-th shard."""
    return f"{writer_id}-{sequence:05d}{SHARD_SUFFIX}"


class ShardAppender:
    """Appends samples' bytes to a writer's own shards in a run's ``shards/``, durably."""

    def __init__(self, dirs: RunDirs, writer_id: str, max_bytes: int) -> None:
        """Write into ``shards/`` of the run ``dirs`` opened, in shards named after ``writer_id``.

        Args:
            dirs: The run's folders (shards are created relative to them, never through a link).
            writer_id: This writer's id; no other writer may use it.
            max_bytes: A new shard begins once the current one is at least this large.
        """
        self.dirs = dirs
        self.folder = dirs.path(SHARDS)
        self.writer_id = writer_id
        self.max_bytes = max_bytes
        self._sequence = -1
        self._fd = -1
        self._size = 0

    def _roll(self) -> None:
        """Close the current shard and create the next (never inside a linked-out folder).

        Raises:
            RunError: When ``shards/`` is a symbolic link.
        """
        self.close()
        self._sequence += 1
        # 0666 less the umask, as any new file; exclusive, so never through an existing link.
        self._fd = self.dirs.create(SHARDS, shard_name(self.writer_id, self._sequence), append=True)
        self._size = 0
        self.dirs.fsync(SHARDS)

    def append(self, parts: list[memoryview]) -> tuple[str, int, int]:
        """Append one sample's bytes (given in parts) and fsync them.

        Returns:
            ``(shard file name, offset, length)``.

        Raises:
            WriteError: When the disk is full or the shard cannot be written; the shard is cut
                back to its previous end, so it holds only whole samples.
        """
        if self._fd < 0 or (self._size >= self.max_bytes and self._size > 0):
            self._roll()
        offset = self._size
        name = shard_name(self.writer_id, self._sequence)
        length = sum(p.nbytes for p in parts)
        try:
            for part in parts:
                view = part.cast("B")
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            os.fsync(self._fd)
        except OSError as e:
            # If this fails too, the manifest never names these bytes: readers never reach them.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
            what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise WriteError(f"{self.folder / name}: cannot append a sample ({what}).") from e
        self._size += length
        return name, offset, length

    def close(self) -> None:
        """Close the current shard."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
