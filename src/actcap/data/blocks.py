"""Rows in columns, and the two ways a pass regroups them: a bounded shuffle, and batches.

:class:`Block` holds rows of one or more samples as columns (``x`` per site, each label): numpy
arrays, or for ``x`` :class:`~actcap.data.filerows.FileRows` still in their file, read straight
into the batch or the shuffle buffer that takes them (so each row is copied once);
:func:`shuffled` passes rows through a buffer of at most a given number of rows, each emitted row
a random one of it; :func:`batched` regroups rows into blocks of a given size;
:func:`shuffled_list` does the bounded shuffle for whole samples. Used by
:class:`actcap.data.ActivationDataset`.
"""

from __future__ import annotations

import sys
import sysconfig
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from actcap.data.filerows import FileRows, as_array

_CHUNK = 1 << 16
"""Rows emitted at once when the shuffle buffer drains at the end of a pass."""


@dataclass(eq=False)
class Block:
    """Rows in columns: ``x`` per site ``[n, ...]`` and each label ``[n]``.

    numpy arrays, whose small copies cost less than torch's (tensors only when rows go out), or
    for ``x`` rows still in their file.
    """

    x: dict[str, np.ndarray | FileRows]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(next(iter(self.x.values())).shape[0])

    def rows(self, index: slice | np.ndarray) -> Block:
        """A slice (a view) or a selection (a copy) of the rows."""
        return Block(
            {
                s: as_array(t)[index] if isinstance(index, np.ndarray) else t[index]
                for s, t in self.x.items()
            },
            {k: v[index] for k, v in self.labels.items()},
        )


class _Buffer:
    """At most ``limit`` rows, in arrays that grow by doubling up to it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.data: Block | None = None

    def full(self) -> bool:
        return self.count >= self.limit

    def append(self, part: Block) -> None:
        n = len(part)
        if self.data is None:
            self.data = _empty_like(part, min(self.limit, max(n, 1024)))
        capacity = len(self.data)
        if self.count + n > capacity:
            grown = _empty_like(part, min(self.limit, max(2 * capacity, self.count + n)))
            _put(grown, slice(0, self.count), self.data.rows(slice(0, self.count)))
            self.data = grown
        _put(self.data, slice(self.count, self.count + n), part)
        self.count += n

    def swap(self, slots: np.ndarray, part: Block) -> Block:
        """The rows at ``slots`` (copied out), replaced by ``part``."""
        assert self.data is not None
        out = self.data.rows(slots)
        _put(self.data, slots, part)
        return out

    def drain(self, rng: np.random.Generator) -> Iterator[Block]:
        """Every row left, in random order."""
        if self.data is None or not self.count:
            return
        order = rng.permutation(self.count)
        for start in range(0, self.count, _CHUNK):
            yield self.data.rows(order[start : start + _CHUNK])


def _empty_like(block: Block, n: int) -> Block:
    return Block(
        {s: np.empty((n, *t.shape[1:]), dtype=t.dtype) for s, t in block.x.items()},
        {k: np.empty(n, dtype=v.dtype) for k, v in block.labels.items()},
    )


def _put(into: Block, slots: slice | np.ndarray, part: Block) -> None:
    """Copy ``part``'s rows to rows ``slots`` of ``into`` (arrays only).

    Rows still in their file are read straight there when ``slots`` is a slice.
    """
    for s, t in into.x.items():
        assert isinstance(t, np.ndarray)
        rows = part.x[s]
        if isinstance(rows, FileRows) and isinstance(slots, slice):
            rows.read_into(t[slots])
        else:
            t[slots] = as_array(rows)
    for k, v in into.labels.items():
        v[slots] = part.labels[k]


def shuffled(blocks: Iterator[Block], limit: int, rng: np.random.Generator) -> Iterator[Block]:
    """Rows through a buffer of at most ``limit`` rows, each emitted row a random one of it."""
    buffer = _Buffer(limit)
    for block in blocks:
        start, n = 0, len(block)
        while start < n:
            if not buffer.full():
                take = min(limit - buffer.count, n - start)
                buffer.append(block.rows(slice(start, start + take)))
            else:
                take = min(limit, n - start)
                slots = rng.choice(limit, size=take, replace=False)
                yield buffer.swap(slots, block.rows(slice(start, start + take)))
            start += take
    yield from buffer.drain(rng)


class BatchMemory:
    """Memory for batches, used again once nothing outside holds a batch handed out earlier.

    A fresh batch of a few MB or more costs the kernel a page fault per page touched (as much as
    reading its rows, measured in ``docs/performance.md``); so the last few batches' arrays are
    kept, and one is filled again when its arrays are referenced by nothing but this pool
    (CPython's reference counts: a tensor made with ``torch.from_numpy``, a view, a slice, an
    array holding any of them all keep it). A batch the consumer still holds is never written:
    new memory is taken instead. The block taken last stays held here until the next is taken,
    so that two iterators (or threads) sharing the pool never get the same one. Off where
    reference counts do not say this (not CPython, or a free-threaded build).
    """

    def __init__(self, keep: int = 3) -> None:
        """``keep``: batches' memory kept for use again."""
        self._keep = keep
        self._blocks: list[Block] = []
        self._free = _free_counts() if _COUNTS_KNOWN else None
        self._lock = threading.Lock()
        self._last: Block | None = None

    def take(self, like: Block, n: int) -> Block:
        """A block of ``n`` rows shaped like ``like``, neither it nor its arrays held elsewhere."""
        with self._lock:
            picked = self._pick(_layout(like, n))
            self._last = picked if picked is not None else _empty_like(like, n)
            del picked
            if (
                self._free is not None
                and self._keep
                and all(b is not self._last for b in self._blocks)
            ):
                self._blocks = [*self._blocks[1 - self._keep :], self._last][-self._keep :]
            return self._last

    def _pick(self, layout: tuple[object, ...]) -> Block | None:
        free = self._free
        if free is None:
            return None
        for block in self._blocks:
            if _layout(block) == layout:
                count, most = _held(block)
                if count <= free[0] and most <= free[1]:
                    return block
        return None


_COUNTS_KNOWN = sys.implementation.name == "cpython" and not sysconfig.get_config_var(
    "Py_GIL_DISABLED"
)


def _held(block: Block) -> tuple[int, int]:
    """The reference counts of a block and of its most referenced array, as seen from here."""
    return sys.getrefcount(block), max(
        sys.getrefcount(a) for a in (*block.x.values(), *block.labels.values())
    )


def _free_counts() -> tuple[int, int]:
    """What :func:`_held` says of a free block in :class:`BatchMemory`'s list.

    Free: nothing else holds it nor its arrays. Measured the way ``take`` measures, since the
    interpreter decides how many references its own calls take.
    """
    blocks = [Block({"x": np.empty((1, 1))}, {"y": np.empty(1)})]
    for block in blocks:
        return _held(block)
    raise AssertionError("unreachable")


def _layout(block: Block, n: int | None = None) -> tuple[object, ...]:
    """What a block's memory must match to be used for another: rows, and each column's form."""
    return (
        len(block) if n is None else n,
        tuple((s, t.shape[1:], t.dtype) for s, t in block.x.items()),
        tuple((k, v.dtype) for k, v in block.labels.items()),
    )


def batched(
    blocks: Iterator[Block], size: int, memory: BatchMemory | None = None
) -> Iterator[Block]:
    """The same rows, regrouped into blocks of ``size`` rows (the last may be smaller).

    Each batch is a block its rows are copied into once (read there, for rows still in their
    file), from ``memory`` when given (see :class:`BatchMemory`); the last one is a view of the
    first rows of one. A batch of more than :data:`_FIRST_ROWS` rows starts smaller and doubles
    as rows come, until the first full batch (a run smaller than ``size`` never asks for it).
    """
    out: Block | None = None
    filled = capacity = 0
    whole = size <= _FIRST_ROWS  # whether a batch is made at its full size at once
    for block in blocks:
        start, n = 0, len(block)
        while start < n:
            if out is None:
                capacity = size if whole else min(size, max(n - start, _FIRST_ROWS))
                out = _new(block, capacity, memory if capacity == size else None)
            elif filled == capacity:
                capacity = min(size, 2 * capacity)
                grown = _new(block, capacity, memory if capacity == size else None)
                _put(grown, slice(0, filled), out.rows(slice(0, filled)))
                out = grown
            take = min(capacity - filled, n - start)
            _put(out, slice(filled, filled + take), block.rows(slice(start, start + take)))
            filled += take
            start += take
            if filled == size:
                yield out
                out, filled, whole = None, 0, True
    if out is not None and filled:
        yield out.rows(slice(0, filled))


_FIRST_ROWS = 1 << 16
"""Rows a batch larger than this starts with (see :func:`batched`)."""


def _new(like: Block, n: int, memory: BatchMemory | None) -> Block:
    return memory.take(like, n) if memory is not None else _empty_like(like, n)


def shuffled_list(items: Iterator[Any], limit: int, rng: np.random.Generator) -> Iterator[Any]:
    """:func:`shuffled` for whole samples (rows of different lengths)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < limit:
            buffer.append(item)
            continue
        slot = int(rng.integers(limit))
        buffer[slot], item = item, buffer[slot]
        yield item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]
