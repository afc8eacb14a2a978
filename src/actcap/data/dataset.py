"""``ActivationDataset``: a run's activations as a PyTorch ``IterableDataset``, for probes and SAEs.

A run (a file per sample or shards, a local folder or an fsspec URL) is streamed one sample at a
time through the fast reader every whole-run pass uses (:mod:`actcap.data.reader`), so memory
holds one sample plus the shuffle buffer whatever the size of the run.

- **Rows**: ``rows="tokens"`` gives one row per stored token position (``x``: ``[hidden]``);
  ``rows="samples"`` one row per sample (``x``: ``[tokens, hidden]``, or ``[hidden]`` when the
  run stored the ``last`` or ``mean`` token). Several sites give ``x`` as a dict site -> tensor.
- **Labels** (joined from the manifest line): ``correct`` (1, 0, or **-1 when ungraded**, so that
  the default collate makes an int64 tensor), ``score`` (float, NaN when absent), ``category``
  (str, ``""`` when absent), ``question_id`` / ``id`` (the sample id), ``sample_index`` (its
  place in the manifest), and with ``rows="tokens"``: ``position`` (the token's index in the
  sample; -1 for a stored ``last``/``mean`` vector) and ``token_id`` (from the stored
  ``input_ids`` then ``output_ids``; -1 when unknown).
- **Shared prefixes**: a sample stored on its run's shared prefix gives its rows whole, the
  prefix's first, unless ``shared_prefix=False``, which leaves out the rows the prefix holds.
- **Splitting**: samples are dealt round-robin over every (rank, DataLoader worker) pair, so each
  sample is read by exactly one of them. The rank comes from ``rank=``/``world_size=``, else from
  ``torch.distributed`` when it is initialized.
- **Shuffling** (``shuffle_buffer=K > 0``): the sample order is permuted (the same permutation on
  every rank and worker, from ``seed`` and the epoch), then rows pass through a buffer of at most
  ``K`` rows: once full, each incoming row replaces a random row of the buffer, which is emitted.
  The same seed, epoch and worker count give the same order; :meth:`set_epoch` changes it.
- **Batches**: ``batch_size=B`` yields ready batches (``x``: ``[B, hidden]``, labels as tensors
  or lists of str), to use with ``DataLoader(ds, batch_size=None)``: the fast path, with no
  per-row Python work (see ``docs/performance.md``). Each row is read from its file straight
  into its batch, and the memory of a batch the consumer no longer holds is filled again (the
  dataset keeps that of its last three batches, across epochs:
  :class:`~actcap.data.blocks.BatchMemory`); a batch still held is never written to.

Samples that cannot be read (corrupt, truncated, missing a site) or whose rows of a site have
another width than the run's first sample's are skipped with a warning, as analysis does, and
listed in :attr:`ActivationDataset.skipped` (of the process that read them). A sample file is
read through the descriptor its header was checked on: one replaced meanwhile (as a resume
replaces a sample, by a rename) is read as it was; one cut short in place while its rows are read
stops the pass with a :class:`~actcap.errors.FormatError` naming it (some of its rows may be in
a batch already given out).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from actcap.data.blocks import BatchMemory, Block, batched, shuffled, shuffled_list
from actcap.data.filerows import FileRows, as_array
from actcap.data.reader import PREFIX_PART, ShardFiles, read_arrays
from actcap.errors import FormatError, NoActivationsError, UnknownNameError
from actcap.storage import ActivationFile, open_run
from actcap.storage.format import ID_TENSORS, ShardSlice
from actcap.storage.reader import prefix_fault

Rows = Literal["tokens", "samples"]
LABELS = (
    "correct",
    "score",
    "category",
    "question_id",
    "id",
    "sample_index",
    "position",
    "token_id",
)
"""Label names :class:`ActivationDataset` can join to its rows."""
TOKEN_LABELS = ("position", "token_id")
"""Labels of a token, so only with ``rows="tokens"``."""
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_NUMPY: dict[torch.dtype, Any] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UnknownNameError(f"dtype={dtype!r}: not a float dtype; use one of {', '.join(_DTYPES)}.")


class ActivationDataset(IterableDataset[dict[str, Any]]):
    """A run's activations as rows for PyTorch training (see the module docstring).

    Example:
        >>> ds = ActivationDataset("runs/x", sites=["layer_12"], shuffle_buffer=100_000,
        ...                        labels=["correct", "category"], batch_size=4096)
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)

        Without ``batch_size=``, ``DataLoader(ds, batch_size=4096)`` collates rows one by one:
        the same rows, at a quarter of the speed or less (``docs/performance.md``).
    """

    def __init__(
        self,
        run: str | os.PathLike[str],
        sites: Sequence[str] | None = None,
        rows: Rows = "tokens",
        shuffle_buffer: int = 0,
        labels: Sequence[str] = (),
        seed: int = 0,
        dtype: torch.dtype | str | None = None,
        *,
        batch_size: int | None = None,
        shared_prefix: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        warn_skipped: bool = True,
    ) -> None:
        """Open a run and check what is asked of it; activations are read when iterated.

        Args:
            run: A run directory or fsspec URL (files or shards).
            sites: Sites to read (every site of the run by default); ``x`` is a dict when
                more than one.
            rows: ``tokens`` (a row per stored token) or ``samples`` (a row per sample).
            shuffle_buffer: Rows held for shuffling (0: manifest order, no shuffling).
            labels: Labels to join to each row (see :data:`LABELS`).
            seed: Seed of the shuffling (with the epoch, see :meth:`set_epoch`).
            dtype: Dtype of ``x`` (``torch.float32`` by default; ``float16``, ``bfloat16``...).
            batch_size: Yield batches of this many rows (``rows="tokens"`` only); use with
                ``DataLoader(ds, batch_size=None)``.
            shared_prefix: ``False`` leaves out the rows each sample shares with its run's
                shared prefix (the same few-shot examples in every sample of a group), where
                the run stored one; ``position`` labels stay the sample's token indices.
            rank: This process's rank (with ``world_size``); by default ``torch.distributed``'s
                when initialized, else 0.
            world_size: Processes splitting the run.
            warn_skipped: Warn of each sample skipped as unreadable (they are listed in
                :attr:`skipped` either way).

        Raises:
            FormatError: When ``run`` is no run directory, or no manifest line of it can be used
                (each one corrupt, or leading out of the run).
            NoActivationsError: When the run has no activations (``--no-capture``, no sample yet).
            UnknownNameError: An unknown site, label, rows or dtype value (the message lists
                the valid ones), or a buffer, seed, batch size, rank or world size that is no
                whole number in range.
        """
        self.run = os.fspath(run)
        info = open_run(run)
        self._samples: list[tuple[str, dict[str, Any], Path | ShardSlice]] = [
            (e.id, e.record, path) for e, path in info.sample_paths()
        ]
        self.corrupt = list(info.corrupt)
        """``(sample id, why)`` of manifest lines left out as corrupt."""
        if not self._samples:
            if self.corrupt:
                raise FormatError(
                    f"{self.run}: no sample can be read: {len(self.corrupt):,} manifest line(s) "
                    f"are corrupt (first: {self.corrupt[0][1].rstrip('.')})."
                )
            raise NoActivationsError(_no_activations(self.run, len(info.entries)))
        if rows not in ("tokens", "samples"):
            raise UnknownNameError(f"rows={rows!r}: use 'tokens' or 'samples'.")
        _check_arguments(shuffle_buffer, seed, batch_size, rank, world_size, shared_prefix)
        if batch_size is not None and rows != "tokens":
            raise UnknownNameError(
                f"batch_size={batch_size}: only with rows='tokens' (samples differ in length; "
                "batch them with a collate_fn of your own)."
            )
        self.rows: Rows = rows
        self.run_sites, self._widths = self._first_sites()
        self.sites = self._check_sites(sites)
        self.labels = self._check_labels(labels)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.dtype = _dtype(dtype)
        self.batch_size = batch_size
        self.shared_prefix = shared_prefix
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        """``(sample id, why)`` of the samples this process skipped."""
        self.warn_skipped = warn_skipped
        self._num_rows: int | None = None
        self._memory = BatchMemory()

    def __getstate__(self) -> dict[str, Any]:
        """What a DataLoader worker gets: not the batches' memory (each process keeps its own)."""
        state = self.__dict__.copy()
        state["_memory"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._memory = BatchMemory()

    def _first_sites(self) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        """The sites of the first readable sample, and the width of each one's rows."""
        errors = []
        for sid, _, path in self._samples[:8]:
            try:
                with ActivationFile(path) as f:
                    return f.sites, {s: _width(f.shape(s, own=True)) for s in f.sites}
            except FormatError as e:
                errors.append(f"{sid}: {e}")
        raise FormatError(f"{self.run}: the first samples cannot be read ({errors[0]}).")

    def _check_sites(self, sites: Sequence[str] | None) -> list[str]:
        if isinstance(sites, str):
            sites = [sites]
        if sites is None:
            return list(self.run_sites)
        unknown = [s for s in sites if s not in self.run_sites]
        if unknown or not sites:
            raise UnknownNameError(
                f"{self.run}: no site {', '.join(map(repr, unknown)) or '(none given)'} in this "
                f"run. Sites: {', '.join(self.run_sites)}."
            )
        return list(dict.fromkeys(sites))

    def _check_labels(self, labels: Sequence[str]) -> list[str]:
        if isinstance(labels, str):
            labels = [labels]
        valid = [n for n in LABELS if self.rows == "tokens" or n not in TOKEN_LABELS]
        unknown = [n for n in labels if n not in valid]
        if unknown or "x" in labels:
            raise UnknownNameError(
                f"labels: no label {', '.join(map(repr, unknown))} for rows={self.rows!r}. "
                f"Labels: {', '.join(valid)}."
            )
        return list(dict.fromkeys(labels))

    @property
    def samples(self) -> list[tuple[str, dict[str, Any], Path | ShardSlice]]:
        """The run's samples with activations: ``(id, manifest line, where)``, in manifest order.

        ``sample_index`` labels index this list.
        """
        return self._samples

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle order for a new epoch (call before iterating)."""
        self.epoch = epoch

    def num_rows(self) -> int:
        """Rows of the whole run (all ranks and workers); reads every sample's header once.

        Samples that cannot be read (their header, or their run's shared prefix) are not counted.
        """
        if self._num_rows is None:
            if self.rows == "samples":
                self._num_rows = len(self._samples)
            else:
                total = 0
                site = self.sites[0]
                faults: dict[str, str | None] = {}  # per shared prefix: why it cannot be used
                for _, record, path in self._samples:
                    key = record.get("prefix")
                    if isinstance(key, str):
                        if key not in faults:
                            faults[key] = prefix_fault(self.run, key)
                        if faults[key] is not None:
                            continue  # skipped when read
                    try:
                        with ActivationFile(path) as f:
                            own = not self.shared_prefix
                            shape = f.shape(site, own=own) if site in f.names else ()
                    except FormatError:
                        continue
                    total += 1 if len(shape) == 1 else (shape[0] if shape else 0)
                self._num_rows = total
        return self._num_rows

    def _split(self) -> tuple[int, int]:
        """This (rank, worker)'s part and the number of parts."""
        rank, world = self._rank, self._world
        if rank is None or world is None:
            rank, world = 0, 1
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
        worker = get_worker_info()
        wid, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return rank * workers + wid, world * workers

    def sample_indices(self) -> list[int]:
        """The manifest indices of the samples this (rank, worker) reads, in reading order."""
        order = np.arange(len(self._samples))
        if self.shuffle_buffer:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._samples))
        part, parts = self._split()
        return [int(i) for i in order[part::parts]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rows (or batches) of this (rank, worker)'s samples."""
        part, _ = self._split()
        rng = np.random.default_rng([self.seed, self.epoch, part])
        if self.rows == "samples":
            items: Iterator[dict[str, Any]] = (
                self._sample_row(i, a)
                for i, a in self._read(self.sample_indices(), join=self.shared_prefix)
            )
            if self.shuffle_buffer:
                items = shuffled_list(items, self.shuffle_buffer, rng)
            yield from items
            return
        blocks: Iterator[Block] = (
            block
            for i, a in self._read(self.sample_indices(), join=False)
            for block in self._token_blocks(i, a)
        )
        if self.shuffle_buffer:
            blocks = shuffled(blocks, self.shuffle_buffer, rng)
        if self.batch_size is not None:
            for batch in batched(blocks, self.batch_size, self._memory):
                yield self._batch(batch)
            return
        for block in blocks:
            yield from self._block_rows(block)

    def _read(
        self, indices: Sequence[int], join: bool = True
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each readable sample's arrays (its sites and token ids); others skipped, warned.

        A site may come as :class:`~actcap.data.filerows.FileRows`, read (once) where it goes.
        ``join=False``: a sample on a shared prefix may come in two parts (see
        :data:`actcap.data.reader.PREFIX_PART`), each copied once where it goes.
        """
        names = [*self.sites, *(ID_TENSORS if "token_id" in self.labels else ())]
        files = ShardFiles()
        try:
            for i in indices:
                sid, _, path = self._samples[i]
                try:
                    _, arrays = read_arrays(path, names, files, join, lazy=True)
                except FormatError as e:
                    self._skip(sid, str(e))
                    continue
                except OSError as e:
                    self._skip(sid, f"{path}: cannot read ({e.strerror or e}).")
                    continue
                missing = [s for s in self.sites if s not in arrays]
                if missing:
                    self._skip(sid, f"{path}: no site {', '.join(missing)} in this sample.")
                    continue
                odd = [s for s in self.sites if _width(arrays[s].shape) != self._widths[s]]
                if odd:
                    s = odd[0]
                    self._skip(
                        sid,
                        f"{path}: site {s!r} has shape {list(arrays[s].shape)}, rows of "
                        f"{list(_width(arrays[s].shape))} where the run's first sample has "
                        f"{list(self._widths[s])}.",
                    )
                    continue
                lengths = {
                    s: _rows_of(arrays[s])
                    + (_rows_of(arrays[s + PREFIX_PART]) if s + PREFIX_PART in arrays else 0)
                    for s in self.sites
                }
                if self.rows == "tokens" and len(set(lengths.values())) > 1:
                    self._skip(sid, f"{path}: its sites differ in token count ({lengths}).")
                    continue
                yield i, arrays
        finally:
            files.close()

    def _skip(self, sample_id: str, why: str) -> None:
        self.skipped.append((sample_id, why))
        if self.warn_skipped:
            warnings.warn(f"sample {sample_id!r} skipped: {why}", stacklevel=3)

    def _array(self, a: np.ndarray | FileRows) -> np.ndarray | FileRows:
        """The rows in the dtype asked for (float32 for bfloat16, which numpy has not).

        Copied only for another dtype: rows still in their file, or a read-only view of it, stay
        so until they leave (:meth:`_tensor`), so that a batch or the shuffle buffer makes the
        one copy.
        """
        want = _NUMPY.get(self.dtype, np.float32)
        return a if a.dtype == want else a.astype(want)

    def _tensor(self, a: np.ndarray | FileRows) -> torch.Tensor:
        """Rows from :meth:`_array` as a writable tensor of the dtype asked for."""
        a = as_array(a)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def _sample_labels(self, i: int) -> dict[str, Any]:
        """The sample-level labels of manifest sample ``i``."""
        sid, record, _ = self._samples[i]
        out: dict[str, Any] = {}
        for name in self.labels:
            if name == "correct":
                value = record.get("correct")
                out[name] = -1 if value is None else int(bool(value))
            elif name == "score":
                value = record.get("score")
                out[name] = float("nan") if value is None else float(value)
            elif name == "category":
                value = record.get("category")
                out[name] = "" if value is None else str(value)
            elif name in ("question_id", "id"):
                out[name] = sid
            elif name == "sample_index":
                out[name] = i
        return out

    def _sample_row(self, i: int, arrays: Mapping[str, Any]) -> dict[str, Any]:
        x = {s: self._tensor(self._array(arrays[s])) for s in self.sites}
        return {"x": x if len(x) > 1 else x[self.sites[0]], **self._sample_labels(i)}

    def _token_blocks(self, i: int, arrays: Mapping[str, Any]) -> list[Block]:
        """Sample ``i``'s rows in one block, or two when its shared prefix rows come apart."""
        shared = [arrays[s + PREFIX_PART] for s in self.sites if s + PREFIX_PART in arrays]
        if len(shared) != len(self.sites):
            if shared:  # some sites apart, some not: join them all
                arrays = {
                    k: np.concatenate([arrays[k + PREFIX_PART], as_array(v)])
                    if k + PREFIX_PART in arrays
                    else v
                    for k, v in arrays.items()
                    if not k.endswith(PREFIX_PART)
                }
            return [self._token_block(i, arrays)]
        n_shared = _rows_of(shared[0])
        own = {k: v for k, v in arrays.items() if not k.endswith(PREFIX_PART)}
        whole = self._token_block(i, own, extra_rows=n_shared)
        if not self.shared_prefix:
            return [Block(whole.x, {k: v[n_shared:] for k, v in whole.labels.items()})]
        head = {s: self._array(_as_rows(arrays[s + PREFIX_PART], n_shared)) for s in self.sites}
        return [
            Block(head, {k: v[:n_shared] for k, v in whole.labels.items()}),
            Block(whole.x, {k: v[n_shared:] for k, v in whole.labels.items()}),
        ]

    def _token_block(self, i: int, arrays: Mapping[str, Any], extra_rows: int = 0) -> Block:
        """Sample ``i``'s rows: one per stored token (one for a stored last/mean vector).

        ``extra_rows``: rows before those in ``arrays`` (a shared prefix's, in a block of their
        own): the labels cover them too, and ``x`` only the rows given.
        """
        first = arrays[self.sites[0]]
        n_own = _rows_of(first)
        n = n_own + extra_rows
        x = {s: self._array(_as_rows(arrays[s], n_own)) for s in self.sites}
        labels = {
            k: np.full(n, v, dtype=object if isinstance(v, str) else None)
            for k, v in self._sample_labels(i).items()
        }
        position = np.full(n, -1, dtype=np.int64) if first.ndim == 1 else np.arange(n)
        if "position" in self.labels:
            labels["position"] = position
        if "token_id" in self.labels:
            ids = [arrays[k].reshape(-1) for k in ID_TENSORS if k in arrays]
            all_ids = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
            token_id = np.full(n, -1, dtype=np.int64)
            known = (position >= 0) & (position < len(all_ids))
            token_id[known] = all_ids[position[known]]
            labels["token_id"] = token_id
        return Block(x, {k: labels[k] for k in self.labels})

    def _block_rows(self, block: Block) -> Iterator[dict[str, Any]]:
        """One dict per row, labels as Python scalars (the default collate stacks them)."""
        names = list(block.labels)
        columns = [v.tolist() for v in block.labels.values()]
        xs = {s: self._tensor(a).unbind(0) for s, a in block.x.items()}
        rows: Any = (
            xs[self.sites[0]]
            if len(self.sites) == 1
            else (dict(zip(xs, row, strict=True)) for row in zip(*xs.values(), strict=True))
        )
        if not names:
            for x in rows:
                yield {"x": x}
            return
        for x, *values in zip(rows, *columns, strict=True):
            row = {"x": x}
            row.update(zip(names, values, strict=True))
            yield row

    def _batch(self, block: Block) -> dict[str, Any]:
        """A ready batch: labels as tensors, or lists of str (as the default collate makes)."""
        xs = {s: self._tensor(a) for s, a in block.x.items()}
        x: Any = xs[self.sites[0]] if len(self.sites) == 1 else xs
        out: dict[str, Any] = {"x": x}
        for k, v in block.labels.items():
            out[k] = v.tolist() if v.dtype.kind in "OU" else torch.from_numpy(v)
        return out


def _as_rows(a: np.ndarray | FileRows, n: int) -> np.ndarray | FileRows:
    """A stored site as ``n`` rows of one vector each (``[hidden]`` is one row; zero rows too)."""
    return a.reshape(n, math.prod(a.shape[1:]) if a.ndim > 1 else a.shape[0])


def _width(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of one row of a stored site: all of a ``[hidden]`` vector."""
    return tuple(shape) if len(shape) <= 1 else tuple(shape[1:])


def _is_whole(value: object, least: int) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``least``."""
    return (
        isinstance(value, int | np.integer) and not isinstance(value, bool) and bool(value >= least)
    )


def _check_arguments(
    shuffle_buffer: object,
    seed: object,
    batch_size: object,
    rank: object,
    world_size: object,
    shared_prefix: object,
) -> None:
    """Check :class:`ActivationDataset`'s numbers when it is made, not when it is iterated.

    Raises:
        UnknownNameError: Naming the argument and what it must be.
    """
    for name, value, least in (
        ("shuffle_buffer", shuffle_buffer, 0),
        ("seed", seed, 0),
        ("batch_size", batch_size, 1),
        ("rank", rank, 0),
        ("world_size", world_size, 1),
    ):
        if (value is not None or name in ("shuffle_buffer", "seed")) and not _is_whole(
            value, least
        ):
            raise UnknownNameError(f"{name}={value!r}: use a whole number of at least {least}.")
    if not isinstance(shared_prefix, bool):
        raise UnknownNameError(f"shared_prefix={shared_prefix!r}: use True or False.")
    if (rank is None) != (world_size is None):
        raise UnknownNameError("rank= and world_size= go together: give both or neither.")
    if rank is not None and not rank < world_size:  # type: ignore[operator]
        raise UnknownNameError(
            f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size."
        )


def _rows_of(a: np.ndarray | FileRows) -> int:
    """Token rows of a stored site: one for a ``[hidden]`` vector."""
    return 1 if a.ndim == 1 else int(a.shape[0])


def _no_activations(where: str, n_entries: int) -> str:
    """Why a run has no activations to read, in one line."""
    if not n_entries:
        return f"{where}: this run has no finished sample yet; no activations to read."
    return (
        f"{where}: this run has no activations: its {n_entries:,} sample(s) were answered with "
        "--no-capture. Run `actcap eval` again without --no-capture to capture them."
    )
