"""Rows in columns, and the two ways a pass regroups them: a bounded shuffle, and batches.

:class:`Block` holds rows of one or more samples as numpy columns (``x`` per site, each label);
:func:`shuffled` passes rows through a buffer of at most a given number of rows, each emitted row
a random one of it; :func:`batched` regroups rows into blocks of a given size;
:func:`shuffled_list` does the bounded shuffle for whole samples. Used by
:class:`actcap.data.ActivationDataset`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_CHUNK = 1 << 16
"""Rows emitted at once when the shuffle buffer drains at the end of a pass."""


@dataclass
class Block:
    """Rows in columns: ``x`` per site ``[n, ...]`` and each label ``[n]``.

    numpy arrays, whose small copies cost less than torch's; tensors only when rows go out.
    """

    x: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(next(iter(self.x.values())).shape[0])

    def rows(self, index: slice | np.ndarray) -> Block:
        """A slice (a view) or a selection (a copy) of the rows."""
        return Block(
            {s: t[index] for s, t in self.x.items()}, {k: v[index] for k, v in self.labels.items()}
        )

    @staticmethod
    def cat(blocks: Sequence[Block]) -> Block:
        """The rows of several blocks, in order."""
        first = blocks[0]
        return Block(
            {s: np.concatenate([b.x[s] for b in blocks]) for s in first.x},
            {k: np.concatenate([b.labels[k] for b in blocks]) for k in first.labels},
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
            _put(grown, np.arange(self.count), self.data.rows(slice(0, self.count)))
            self.data = grown
        _put(self.data, np.arange(self.count, self.count + n), part)
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


def _put(into: Block, slots: np.ndarray, part: Block) -> None:
    for s, t in into.x.items():
        t[slots] = part.x[s]
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


def batched(blocks: Iterator[Block], size: int) -> Iterator[Block]:
    """The same rows, regrouped into blocks of ``size`` rows (the last may be smaller)."""
    pending: list[Block] = []
    count = 0
    for block in blocks:
        pending.append(block)
        count += len(block)
        if count < size:
            continue
        joined = Block.cat(pending)
        cut = (count // size) * size
        for start in range(0, cut, size):
            yield joined.rows(slice(start, start + size))
        pending = [joined.rows(slice(cut, count))] if cut < count else []
        count -= cut
    if count:
        yield Block.cat(pending)


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
