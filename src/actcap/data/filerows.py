"""Rows of a tensor still in its file, read with one ``preadv`` straight to where they go.

A pass that regroups rows (:func:`actcap.data.blocks.batched`, the shuffle buffer) would otherwise
read a sample into an array of its own and copy it again into a batch: two copies, plus the cost
of the sample's fresh memory. :class:`FileRows` stands for a tensor's rows (its file, byte offset,
dtype and shape, after the header was checked) and reads any run of them into the memory given,
a batch's rows for instance: the kernel's copy out of the page cache is the only one.

The file stays open (:class:`OpenFile`) while any :class:`FileRows` of it is alive, so a file
replaced by an atomic rename meanwhile is still read whole, as it was when its header was checked.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from actcap.errors import FormatError


class OpenFile:
    """A read-only file descriptor, closed when the last holder lets go of it (or on :meth:`close`)."""

    __slots__ = ("fd", "label")

    def __init__(self, fd: int, label: str) -> None:
        """``fd``: an open descriptor, now owned; ``label``: the file's name, for errors."""
        self.fd = fd
        self.label = label

    def size(self) -> int:
        """The file's size in bytes."""
        return os.fstat(self.fd).st_size

    def read(self, start: int, n: int) -> bytes:
        """``n`` bytes from ``start`` (fewer at the end of the file)."""
        return os.pread(self.fd, n, start)

    def read_into(self, out: memoryview, start: int) -> None:
        """Fill ``out`` (bytes) from byte ``start`` of the file.

        Raises:
            FormatError: When the file ends first (it was cut short since its header was read).
        """
        done, n = 0, len(out)
        while done < n:
            if _PREADV:
                got = os.preadv(self.fd, [out[done:]], start + done)
            else:  # pragma: no cover - platforms without preadv
                chunk = os.pread(self.fd, n - done, start + done)
                out[done : done + len(chunk)] = chunk
                got = len(chunk)
            if got <= 0:
                raise FormatError(
                    f"{self.label}: ends at byte {start + done}, before the rows its header "
                    "names (the file was cut short while it was read)."
                )
            done += got

    def close(self, _close: Any = os.close) -> None:
        """Close the descriptor now (idempotent; ``os.close`` bound early, for interpreter exit)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _close(fd)

    def __del__(self) -> None:
        self.close()


_PREADV = hasattr(os, "preadv")


class FileRows:
    """A C-ordered tensor's rows in a file, read on demand (see the module docstring).

    Offers what a pass uses of an array: ``shape``, ``ndim``, ``dtype`` (the dtype delivered),
    ``len``, a row slice, ``reshape`` (the same bytes) and ``astype`` (converted when read).
    """

    __slots__ = ("file", "offset", "stored", "shape", "dtype")

    def __init__(
        self,
        file: OpenFile,
        offset: int,
        stored: np.dtype[Any],
        shape: tuple[int, ...],
        dtype: np.dtype[Any] | None = None,
    ) -> None:
        """``offset``: the byte where row 0 starts; ``stored``: the dtype in the file."""
        self.file = file
        self.offset = offset
        self.stored = np.dtype(stored)
        self.shape = tuple(shape)
        self.dtype = self.stored if dtype is None else np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.stored.itemsize

    def __getitem__(self, index: slice) -> FileRows:
        """Rows ``start:stop`` (no step) as :class:`FileRows` of the same file."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("FileRows take a row slice without step; read them first (numpy())")
        start, stop, _ = index.indices(self.shape[0])
        stop = max(start, stop)
        return FileRows(
            self.file,
            self.offset + start * self._row_bytes(),
            self.stored,
            (stop - start, *self.shape[1:]),
            self.dtype,
        )

    def reshape(self, *shape: int) -> FileRows:
        """The same bytes in another shape (one ``-1`` allowed)."""
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        total = math.prod(self.shape)
        known = math.prod(d for d in dims if d != -1)
        dims = tuple(total // known if d == -1 and known else d for d in dims)
        if math.prod(dims) != total:
            raise ValueError(f"cannot reshape rows of shape {self.shape} into {dims}")
        return FileRows(self.file, self.offset, self.stored, dims, self.dtype)

    def astype(self, dtype: Any) -> FileRows:
        """The same rows, delivered as ``dtype`` (converted when read)."""
        return FileRows(self.file, self.offset, self.stored, self.shape, np.dtype(dtype))

    def read_into(self, out: np.ndarray) -> None:
        """Read the rows into ``out`` (a C-contiguous array of this shape, any float dtype).

        Raises:
            FormatError: When the file was cut short since its header was read.
        """
        if out.shape != self.shape:
            raise ValueError(f"rows of shape {self.shape} do not fit {out.shape}")
        if not out.size:
            return
        if out.dtype == self.stored and out.flags.c_contiguous:
            self.file.read_into(_bytes_of(out), self.offset)
            return
        scratch = np.empty(self.shape, self.stored)
        self.file.read_into(_bytes_of(scratch), self.offset)
        out[...] = scratch

    def numpy(self) -> np.ndarray:
        """The rows as a new, writable array of ``dtype``."""
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out


def _bytes_of(a: np.ndarray) -> memoryview:
    """A C-contiguous array's memory as bytes, to read into."""
    return a.reshape(-1).view(np.uint8).data


def as_array(rows: np.ndarray | FileRows) -> np.ndarray:
    """Rows as an array: read, if still in their file (a new array); else as they are."""
    return rows.numpy() if isinstance(rows, FileRows) else rows
