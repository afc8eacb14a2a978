"""The fast read of a whole run: each sample's arrays, one or two reads of an open shard per sample.

Every whole-run pass (analysis, the training dataset) reads through :func:`read_arrays`: a sample
in a local shard is read with ``pread`` from a shard kept open for the pass, with the same checks as
:class:`~actcap.storage.ActivationFile`; a local file is memory-mapped after one read of its
header (actcap's metadata checked, each tensor read inside the file), so that the caller's copy is
the only one; with ``lazy=True`` (the dataset) a site of a local file or shard comes as
:class:`~actcap.data.filerows.FileRows` instead, read once, straight where the caller puts it;
any other sample (a shard at a URL, a dtype numpy has not, a shared prefix of a shard, a file
whose header this path cannot use) through :class:`~actcap.storage.ActivationFile`, which also
says why a bad file is bad.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actcap.data.filerows import FileRows, OpenFile
from actcap.errors import FormatError
from actcap.storage import ActivationFile
from actcap.storage.format import ID_TENSORS, ShardSlice
from actcap.storage.header import check_metadata, parse_header
from actcap.storage.location import is_url, open_fd
from actcap.storage.names import site_sort_key
from actcap.storage.prefixes import is_prefix_key
from actcap.storage.reader import shared_rows

_NUMPY_DTYPES: dict[str, Any] = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}
"""Safetensors dtypes read straight into numpy (``BF16`` goes through torch)."""
_FIRST_READ = 64 << 10
"""Bytes read at once from a sample in a shard: its header and, for small samples, its tensors."""
_HEADER_READ = 16 << 10
"""Bytes read at once from a sample file: its header (a second read gets a longer one)."""


class ShardFiles:
    """Open local shards, kept open while a pass reads their samples (at most ``keep`` at once).

    A shard let go of here stays open while rows of it (:class:`FileRows`) wait to be read.
    """

    def __init__(self, keep: int = 32) -> None:
        """``keep``: shards held open at once (the least recently used is let go first)."""
        self._files: dict[str, OpenFile] = {}
        self._keep = keep

    def file(self, shard: str) -> OpenFile:
        """The shard, open."""
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= self._keep:
                self._files.pop(next(iter(self._files)))
            f = OpenFile(open_fd(shard), shard)
        self._files[shard] = f  # most recently used last
        return f

    def size(self, shard: str) -> int:
        """The shard's size in bytes."""
        return self.file(shard).size()

    def read(self, shard: str, start: int, n: int) -> bytes:
        """``n`` bytes from ``start`` (fewer at the end of the file)."""
        return self.file(shard).read(start, n)

    def close(self) -> None:
        """Let go of every shard held open (each closes once no rows of it wait to be read)."""
        self._files.clear()


def _slice_arrays(
    part: ShardSlice, files: ShardFiles, names_wanted: Sequence[str] | None, lazy: bool = False
) -> tuple[list[str], dict[str, Any]] | None:
    """A local shard slice's sites and the arrays asked for, with the checks of ActivationFile.

    ``lazy``: sites as :class:`FileRows` of the shard (token ids are read). None when a tensor
    has a dtype this fast path does not read (the caller falls back).

    Raises:
        FormatError: When the slice is truncated or not a valid activation file.
        OSError: When the shard cannot be read.
    """
    shard = files.file(part.shard)
    size = shard.size()
    if part.offset + part.length > size:
        raise FormatError(
            f"{part}: truncated: the shard has {size} bytes, this sample ends at byte "
            f"{part.offset + part.length}."
        )
    head = shard.read(part.offset, min(part.length, _FIRST_READ))

    def read(start: int, n: int) -> bytes:
        if start + n <= len(head):
            return head[start : start + n]
        return shard.read(part.offset + start, n)

    label = str(part)
    header = parse_header(read, part.length, label)
    if "prefix" in check_metadata(label, header):
        return None  # its first rows are in the run's shared prefix: ActivationFile joins them
    data_start = 8 + struct.unpack_from("<Q", head)[0]
    names = list(_sites_of(tuple(header)))
    arrays: dict[str, Any] = {}
    for name in names if names_wanted is None else names_wanted:
        info = header.get(name)
        if name == "__metadata__" or not isinstance(info, dict):
            continue  # not in this sample: the caller says which site is missing
        if info["dtype"] not in _NUMPY_DTYPES:
            return None
        begin, end = (data_start + o for o in info["data_offsets"])
        dtype = np.dtype(_NUMPY_DTYPES[info["dtype"]])
        if lazy and name not in ID_TENSORS and end > len(head):
            arrays[name] = FileRows(shard, part.offset + begin, dtype, tuple(info["shape"]))
            continue
        raw = read(begin, end - begin)
        if len(raw) != end - begin:
            raise FormatError(f"{label}: tensor {name!r} is truncated in the shard.")
        arrays[name] = np.frombuffer(raw, dtype).reshape(info["shape"])
    return names, arrays


@functools.lru_cache(maxsize=256)
def _sites_of(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The sites among a header's keys, in network order (the same for most samples)."""
    return tuple(
        sorted((k for k in keys if k not in ID_TENSORS and k != "__metadata__"), key=site_sort_key)
    )


def _safetensors_arrays(
    path: Path, names_wanted: Sequence[str] | None, join: bool = True, lazy: bool = False
) -> tuple[list[str], dict[str, Any]] | None:
    """A local safetensors file's sites, and read-only arrays over a memory map of it.

    The header is read once and checked as far as reading needs: actcap's metadata (as
    :class:`ActivationFile` checks it), and each tensor read lies inside the file with the size
    its dtype and shape say. No copy is made: the caller's one copy (into a batch, or into the
    dtype asked for) is the only one. ``lazy``: sites as :class:`FileRows` of the open file
    instead, read (once) where the caller puts them; token ids are read.

    None when this path does not apply (not a safetensors file, a header it cannot use, a dtype
    numpy has not, bfloat16 or float8 storage, a shared prefix): the caller reads through
    :class:`ActivationFile`, which also says why a bad file is bad.

    Raises:
        FormatError: When ``path`` is no regular file.
    """
    label = str(path)
    try:
        file = OpenFile(open_fd(label), label)
    except OSError:
        return None
    try:
        length = file.size()
        head = file.read(0, _HEADER_READ)
        if len(head) < 8:
            return None
        size = struct.unpack_from("<Q", head)[0]
        if size > min(length - 8, 100 << 20):
            return None
        text = head[8 : 8 + size] if 8 + size <= len(head) else file.read(8, size)
        header = json.loads(text)
        if not isinstance(header, dict):
            return None
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            return None
        if meta.get("dtype") not in (None, "float32", "float16"):
            return None  # bfloat16 and float8 go through torch (and float8's scales)
        check_metadata(label, header)
        names = _sites_of(tuple(header))
        wanted = names if names_wanted is None else [n for n in names_wanted if n in header]
        start = 8 + size
        spans = {}
        for n in wanted:
            info = header[n]
            dtype = np.dtype(_NUMPY_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if not all(type(d) is int and d >= 0 for d in (begin, end, *shape)):
                return None  # floats, bools, negatives: ActivationFile says what is wrong
            count = math.prod(shape)
            if not 0 <= begin <= end <= length - start or end - begin != count * dtype.itemsize:
                return None
            spans[n] = (dtype, count, start + begin, shape)
        arrays: dict[str, Any] = {}
        if lazy:
            for n, (dtype, count, offset, shape) in spans.items():
                if n in ID_TENSORS:
                    raw = file.read(offset, count * dtype.itemsize)
                    if len(raw) != count * dtype.itemsize:
                        return None
                    arrays[n] = np.frombuffer(raw, dtype).reshape(shape)
                else:
                    arrays[n] = FileRows(file, offset, dtype, shape)
        else:
            mm: Any = b""  # an empty file cannot be mapped, nor need be
            lo = 0
            if any(count for _, count, _, _ in spans.values()):
                mm, lo = _map(file.fd, spans.values())
            arrays = {
                n: np.frombuffer(mm, dtype, count, offset - lo).reshape(shape)
                for n, (dtype, count, offset, shape) in spans.items()
            }
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None
    finally:
        del file  # closed now, unless rows of it wait to be read
    if "prefix" in meta:
        joined = _join_prefix(path, meta, arrays, join)
        if joined is None:
            return None
        arrays = joined
    return list(names), arrays


PREFIX_PART = "@prefix"
"""With ``join=False``, ``<site>@prefix`` holds the rows of a site that the run's shared prefix
holds (read-only), and ``<site>`` the sample's own rows after them (no ``@`` is in a site name)."""


def _map(fd: int, spans: Any) -> tuple[mmap.mmap, int]:
    """A read-only map of just the bytes the wanted tensors span, its pages faulted in at once.

    Returns the map and the file offset it starts at. Mapping only the span (not the file) reads
    one site of a many-site file without touching the others; ``MAP_POPULATE`` (Linux) faults
    the pages in one call, where touching them one by one cost as much as copying them.
    """
    lo = min(offset for _, _, offset, _ in spans)
    hi = max(offset + count * dtype.itemsize for dtype, count, offset, _ in spans)
    lo -= lo % mmap.ALLOCATIONGRANULARITY
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        return mmap.mmap(
            fd, hi - lo, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ, offset=lo
        ), lo
    return mmap.mmap(fd, hi - lo, access=mmap.ACCESS_READ, offset=lo), lo


def _join_prefix(
    path: Path, meta: dict[str, Any], arrays: dict[str, Any], join: bool = True
) -> dict[str, Any] | None:
    """A sample's arrays with the rows its run's shared prefix holds put back in front.

    The prefix rows are read once per prefix and kept (:func:`actcap.storage.reader.shared_rows`).
    ``join=False`` leaves them apart (:data:`PREFIX_PART`), for a caller that copies each part
    where it goes. None when anything does not fit: the caller reads through
    :class:`ActivationFile`, which says what is wrong.
    """
    key, count = meta.get("prefix"), meta.get("prefix_tokens")
    if not is_prefix_key(key) or not isinstance(count, str) or not count.isdecimal():
        return None
    try:
        shared = shared_rows(path, str(key), int(count), [n for n in arrays if n not in ID_TENSORS])
    except FormatError:
        return None
    out: dict[str, Any] = {}
    for name, own in arrays.items():
        if name in ID_TENSORS:
            out[name] = own
            continue
        rows = shared[name].numpy()
        if rows.dtype != own.dtype or rows.shape[1:] != own.shape[1:]:
            return None
        if join:
            out[name] = np.empty((len(rows) + len(own), *rows.shape[1:]), rows.dtype)
            out[name][: len(rows)] = rows
            if isinstance(own, FileRows):
                own.read_into(out[name][len(rows) :])
            else:
                out[name][len(rows) :] = own
        else:
            rows = rows.view()
            rows.flags.writeable = False  # the kept rows: never to be written through
            out[name], out[name + PREFIX_PART] = own, rows
    return out


def _file_arrays(
    path: Path | ShardSlice, names_wanted: Sequence[str] | None, join: bool = True
) -> tuple[list[str], dict[str, np.ndarray]]:
    """A sample's sites and arrays through :class:`ActivationFile` (files, URLs, any dtype).

    ``join=False``: a site whose first rows are a shared prefix's comes in two parts
    (:data:`PREFIX_PART`), as from the fast path.
    """
    with ActivationFile(path) as f:
        names = f.sites
        wanted = names if names_wanted is None else [s for s in names_wanted if s in f.names]
        shared = 0 if join else f.prefix_tokens
        arrays = {}
        for s in wanted:
            try:
                a = _as_numpy(f, s)
            except (ValueError, RuntimeError, TypeError) as e:  # e.g. more dimensions than numpy's
                raise FormatError(f"{path}: tensor {s!r} cannot be read ({e}).") from None
            if shared and s not in ID_TENSORS and a.ndim > 1:
                arrays[s + PREFIX_PART], arrays[s] = a[:shared], a[shared:]
            else:
                arrays[s] = a
        return names, arrays


def _as_numpy(f: ActivationFile, name: str) -> np.ndarray:
    """One tensor as numpy: token ids as they are, activations as float32."""
    t = f.get(name)
    return (t if name in ID_TENSORS else t.float()).numpy()


def read_arrays(
    path: Path | ShardSlice,
    names: Sequence[str] | None,
    files: ShardFiles,
    join: bool = True,
    lazy: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """One sample's sites (all of them, in network order) and the arrays of the ``names`` asked for.

    ``names`` may hold sites and the token-id tensors (``input_ids``, ``output_ids``); one not in
    the sample is simply absent from the arrays; ``None`` reads every site. Arrays may be
    read-only and of any float dtype (convert before keeping them); token ids are integers.
    ``join=False``: a local sample file on a shared prefix may give its sites in two parts
    (:data:`PREFIX_PART`). ``lazy``: a site of a local file or shard may come as
    :class:`FileRows`, read where the caller puts it (its checks done).

    Raises:
        FormatError: When the sample is truncated or no valid activation file.
        OSError: When it cannot be read.
    """
    got = None
    if isinstance(path, ShardSlice):
        if not is_url(path.shard):
            got = _slice_arrays(path, files, names, lazy)
    elif not is_url(path):
        got = _safetensors_arrays(path if isinstance(path, Path) else Path(path), names, join, lazy)
    return got if got is not None else _file_arrays(path, names, join)
