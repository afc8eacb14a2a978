"""Reading one sample lazily: :class:`ActivationFile` over a file or a slice of a shard.

Metadata is read and checked at once, tensors only when asked (memory-mapped, or from a shard
only the tensor's bytes); an older pipeline's ``torch.save`` file is loaded whole and read the
same way.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from actcap.errors import FormatError, UnknownNameError
from actcap.storage.dtypes import TORCH_DTYPES
from actcap.storage.float8 import dequantize, is_scale_name, needs_scale, scale_name
from actcap.storage.format import ID_TENSORS, SampleMeta, ShardSlice
from actcap.storage.header import PICKLED, check_metadata, detect_format, parse_header, read_header
from actcap.storage.layout import PREFIXES
from actcap.storage.legacy import legacy_contents
from actcap.storage.location import PathOrUrl, is_url, read_range, url_fs
from actcap.storage.names import site_sort_key
from actcap.storage.prefixes import is_prefix_key, prefix_filename, prefix_key, prefix_location
from actcap.storage.safety import UnsafePathError, run_path


class ActivationFile:
    """A lazily read activation file: metadata at once, tensors only when asked (memory-mapped).

    A ``torch.save`` file (told by its content, whatever its name) is loaded whole through
    ``torch.load(weights_only=True)`` and then read the same way.

    Example:
        >>> with ActivationFile("q0001.safetensors") as f:
        ...     f.sites, f.shape("layer_3")
        ...     x = f.get("layer_3")
    """

    def __init__(self, path: str | os.PathLike[str] | ShardSlice) -> None:
        """Open a file, or one sample inside a shard, and check its header; tensors are not read.

        Args:
            path: An activation file (safetensors, or an older pipeline's ``torch.save`` file),
                or a :class:`ShardSlice` (a local or fsspec shard).

        Raises:
            FormatError: When the file is no valid activation file.
            UnsafeFileError: A pickle that needs code execution (see :func:`load_activations`).
        """
        self.slice = path if isinstance(path, ShardSlice) else None
        self._handle: Any = None
        self._data_start = 0
        self._tensors: dict[str, Tensor] | None = None  # a torch.save file's, loaded whole
        if self.slice is not None:
            self.path = Path(self.slice.shard)
            self.label = str(self.slice)
            self.header = self._slice_header(self.slice)
        else:
            self.path = Path(path)  # type: ignore[arg-type]  # not a ShardSlice here
            self.label = str(self.path)
            self.header = self._file_header()
        self.raw_metadata = check_metadata(self.label, self.header)
        if self.slice is None and self._tensors is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise FormatError(f"{self.path}: cannot open as safetensors ({e}).") from e
        self.meta = SampleMeta.from_header(self.raw_metadata)
        self.identity: tuple[object, ...] = (self.label,)
        """What tells this file from another and from its own older versions (for caching)."""
        self._prefix: ActivationFile | None = None
        if "prefix" in self.raw_metadata and not (
            is_prefix_key(self.meta.prefix)
            and self.meta.prefix_tokens > 0
            and all(len(self.header[s]["shape"]) >= 1 for s in self.sites)
        ):
            raise FormatError(
                f"{self.label}: corrupt header: shared prefix {self.meta.prefix!r} of "
                f"{self.raw_metadata.get('prefix_tokens')!r} tokens for sites "
                f"{ {s: self.header[s]['shape'] for s in self.sites} }."
            )

    @property
    def prefix_tokens(self) -> int:
        """How many leading rows of each site lie in the run's shared prefix (0: none)."""
        return self.meta.prefix_tokens if self.meta.prefix else 0

    def _prefix_file(self) -> ActivationFile:
        """The run's shared prefix holding this sample's first rows, opened and checked once.

        Raises:
            FormatError: When it is missing, unreadable, outside the run, or does not fit.
        """
        if self._prefix is not None:
            return self._prefix
        key, n = self.meta.prefix, self.meta.prefix_tokens
        where = prefix_location(self.slice.shard if self.slice is not None else self.path, key)
        try:  # read through the location named by the key, never a path from the header
            if is_url(where):  # an object: read as one slice of itself
                fs, path = url_fs(where)
                size = int(fs.size(path))
                prefix = ActivationFile(ShardSlice(where, 0, size))
                prefix.identity = (where, size)
            else:  # never follow a link out of the sample's run
                run_path(str(Path(where).parent.parent), f"prefixes/{prefix_filename(key)}")
                prefix = ActivationFile(where)
                st = os.stat(where)
                prefix.identity = (where, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            ids = _sound_prefix_ids(prefix, key, where)
            if (prefix.meta.model, prefix.meta.dtype) != (self.meta.model, self.meta.dtype):
                raise FormatError(f"{where}: another model's or dtype's prefix.")
            if "input_ids" in self.header and self.get("input_ids")[:n].tolist() != list(ids):
                raise FormatError(f"{where}: holds other tokens than this sample's first {n}.")
            for site in self.sites:
                own, shared = self.shape(site, own=True), prefix.shape(site)
                if shared[0] != n or shared[1:] != own[1:]:
                    raise FormatError(
                        f"{where}: site {site!r} has shape {list(shared)}, not {n} rows of "
                        f"{list(own[1:])}."
                    )
        except (FormatError, UnsafePathError, UnknownNameError, OSError) as e:
            raise FormatError(
                f"{self.label}: its first {n} token rows are in the run's shared prefix "
                f"prefixes/{key}.safetensors, which cannot be used ({e}). Resume the run "
                "(actcap eval ... --resume) to redo every sample that uses it."
            ) from None
        self._prefix = prefix
        return prefix

    def _slice_header(self, part: ShardSlice) -> dict[str, Any]:
        """The checked header of one sample in a shard; notes where its tensors start."""
        header_bytes = 0
        if not is_url(part.shard):
            try:
                size = os.stat(part.shard).st_size
            except OSError as e:
                raise FormatError(
                    f"{part.shard}: cannot read the shard ({e.strerror or e})."
                ) from e
            if part.offset + part.length > size:
                raise FormatError(
                    f"{self.label}: the sample ends at byte {part.offset + part.length}, past the "
                    f"shard's end ({size} bytes); its manifest line is corrupt."
                )

        def read(start: int, n: int) -> bytes:
            nonlocal header_bytes
            if start == 8:
                header_bytes = n  # parse_header reads the JSON header right after its size
            return read_range(part.shard, part.offset + start, part.offset + start + n)

        header = parse_header(read, part.length, self.label)
        self._data_start = part.offset + 8 + header_bytes
        return header

    def _file_header(self) -> dict[str, Any]:
        """The checked header of a file; a torch.save file's is made from its loaded tensors."""
        if self.path.is_dir():
            raise FormatError(f"{self.path}: a folder, not an activation file.")
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such file.")
        if detect_format(self.path) in PICKLED:
            self._tensors, header = legacy_contents(self.path)
            return header
        return read_header(self.path)

    def __enter__(self) -> ActivationFile:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Release the memory map."""
        self.close()

    def close(self) -> None:
        """Release the memory map."""
        self._handle = None
        if self._prefix is not None:
            self._prefix.close()

    @property
    def names(self) -> list[str]:
        """All tensor names in the file."""
        return [k for k in self.header if k != "__metadata__"]

    @property
    def sites(self) -> list[str]:
        """Activation sites in the file (token-id tensors excluded), in the order stored."""
        return sorted(
            (k for k in self.names if k not in ID_TENSORS and not is_scale_name(k)),
            key=site_sort_key,
        )

    def shape(self, name: str, *, own: bool = False) -> tuple[int, ...]:
        """The shape of a tensor, from the header (a site's shared prefix rows included).

        ``own=True``: only the rows this file holds.
        """
        self._check_name(name)
        shape = tuple(self.header[name]["shape"])
        if own or not self._prefixed(name):
            return shape
        return (shape[0] + self.prefix_tokens, *shape[1:])

    def _prefixed(self, name: str) -> bool:
        """Whether a tensor's first rows lie in the shared prefix (sites only, not token ids)."""
        return bool(self.prefix_tokens) and name not in ID_TENSORS and not is_scale_name(name)

    def dtype(self, name: str) -> str:
        """The safetensors dtype of a tensor (``F32``, ``BF16``, ...)."""
        self._check_name(name)
        return str(self.header[name]["dtype"])

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Read one tensor (from a shard: only that tensor's bytes), in ``dtype`` if given.

        A float8 site (``--dtype float8``) comes back dequantized with its scale
        (:mod:`actcap.storage.float8`), in float32 unless ``dtype`` says otherwise.
        """
        t = self._get_own(name, dtype)
        if not self._prefixed(name):
            return t
        prefix = self._prefix_file()
        shared = _PREFIX_ROWS.get(prefix.identity, name, dtype, lambda: prefix.get(name, dtype))
        out = torch.empty((shared.shape[0] + t.shape[0], *t.shape[1:]), dtype=t.dtype)
        out[: shared.shape[0]] = shared
        out[shared.shape[0] :] = t
        return out

    def _get_own(self, name: str, dtype: torch.dtype | None) -> Tensor:
        """The rows of a tensor this file holds, dequantized when float8.

        Raises:
            FormatError: A float8 site without its scale, or with one that does not fit.
        """
        t = self._get_stored(name)
        scale = scale_name(name)
        where = f"{self.label}: site {name!r}"
        if scale in self.header:
            return dequantize(t, self._get_stored(scale), dtype or torch.float32, where=where)
        if not is_scale_name(name) and needs_scale(self.dtype(name), self.meta.dtype):
            raise FormatError(
                f"{where} is stored as float8 ({self.dtype(name)}) but has no scale {scale!r}; "
                "the file is damaged: capture this sample again."
            )
        return t if dtype is None else t.to(dtype)

    def is_float8(self, name: str) -> bool:
        """Whether a site is stored as float8 values with a scale per row."""
        return scale_name(name) in self.header

    def _get_stored(self, name: str) -> Tensor:
        """One tensor as stored."""
        self._check_name(name)
        if self._tensors is not None:
            return self._tensors[name]
        if self.slice is not None:
            info = self.header[name]
            start, end = info["data_offsets"]
            data = read_range(self.slice.shard, self._data_start + start, self._data_start + end)
            if len(data) != end - start:
                raise FormatError(f"{self.label}: tensor {name!r} is truncated in the shard.")
            dtype = TORCH_DTYPES[info["dtype"]]
            if not data:
                return torch.empty(info["shape"], dtype=dtype)
            return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info["shape"])
        try:
            return self._handle.get_tensor(name)  # type: ignore[no-any-return]
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{self.path}: cannot read tensor {name!r} ({e}).") from e

    def get_slice(self, name: str) -> Any:
        """A sliceable view of one tensor (``f.get_slice("layer_3")[-1]`` reads one row).

        Inside a shard or a torch.save file the tensor is read whole and then indexed.
        """
        self._check_name(name)
        if (
            self.slice is not None
            or self._tensors is not None
            or self.is_float8(name)
            or self._prefixed(name)
        ):
            return self.get(name)
        return self._handle.get_slice(name)

    def _check_name(self, name: str) -> None:
        if name not in self.header or name == "__metadata__":
            raise UnknownNameError(
                f"{self.label}: no site {name!r}. Sites in this file: {', '.join(self.sites)}."
            )

    def iter_sites(
        self, sites: Sequence[str] | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(site, tensor)`` one at a time (bounded memory), in ``dtype`` if given."""
        for name in sites if sites is not None else self.sites:
            yield name, self.get(name, dtype)


class _PrefixRows:
    """Shared prefix rows read once and kept, up to ``limit`` bytes (least recently used out).

    Every sample of a subject leans on the same prefix: reading its rows from the file for each
    sample would cost as much as storing them whole. Entries are keyed by the prefix file's
    identity (device, inode, size, mtime), so a rewritten prefix is read anew.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._rows: OrderedDict[tuple[object, ...], Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(
        self,
        identity: tuple[object, ...],
        name: str,
        dtype: torch.dtype | None,
        read: Callable[[], Tensor],
    ) -> Tensor:
        """A prefix's rows of one site, in ``dtype`` if given, ``read()`` when not kept yet.

        Read-only: do not modify what this returns.
        """
        key = (*identity, name, dtype)
        with self._lock:
            rows = self._rows.get(key)
            if rows is not None:
                self._rows.move_to_end(key)
                return rows
        rows = read().contiguous().clone()
        size = rows.numel() * rows.element_size()
        with self._lock:
            if key not in self._rows and size <= self.limit:
                self._rows[key] = rows
                self._bytes += size
                while self._bytes > self.limit:
                    _, old = self._rows.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return rows


_PREFIX_ROWS = _PrefixRows(512 << 20)


def shared_rows(sample: Path, key: str, n: int, sites: Sequence[str]) -> dict[str, Tensor]:
    """The rows of ``sites`` that a local sample file leaves to its run's shared prefix ``key``.

    Read once and kept (as :class:`ActivationFile` keeps them); read-only: do not modify.

    Raises:
        FormatError: When the prefix is missing, outside the run, or not ``n`` rows of a site.
    """
    where = prefix_location(sample, key)
    try:
        st = os.stat(where)
        identity = (where, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        # Checked once per version of the file, not per sample: the key holds what the check
        # saw (the folder and the name, not followed). A prefix reached through a link, even
        # one inside the run, is checked every time (where the link leads may change).
        folder, name = os.lstat(os.path.dirname(where)), os.lstat(where)
        linked = stat.S_ISLNK(folder.st_mode) or stat.S_ISLNK(name.st_mode)
        inside = (
            os.path.abspath(where),
            *identity[1:],
            (folder.st_dev, folder.st_ino),
            (name.st_dev, name.st_ino),
        )
        if linked or inside not in _INSIDE_RUNS:
            run_path(str(Path(where).parent.parent), f"prefixes/{prefix_filename(key)}")
        if not linked and inside not in _INSIDE_RUNS:
            _INSIDE_RUNS[inside] = None
            while len(_INSIDE_RUNS) > _SOUND_LIMIT:
                _INSIDE_RUNS.popitem(last=False)
    except (UnsafePathError, OSError) as e:
        raise FormatError(f"{sample}: its shared prefix cannot be used ({e}).") from None
    out = {}
    for site in sites:

        def read(site: str = site) -> Tensor:
            with ActivationFile(where) as prefix:
                prefix.identity = identity
                _sound_prefix_ids(prefix, key, where)
                return prefix.get(site)

        rows = _PREFIX_ROWS.get(identity, site, None, read)
        if rows.dim() < 1 or rows.shape[0] != n:
            raise FormatError(f"{where}: site {site!r} has {list(rows.shape)} rows, not {n}.")
        out[site] = rows
    return out


_INSIDE_RUNS: OrderedDict[tuple[object, ...], None] = OrderedDict()
"""Prefix files found to lie inside their run, no link leading out: by absolute path, the file's
identity, and the identities of its folder and name as they were (not followed) when checked."""
_SOUND_PREFIXES: OrderedDict[tuple[object, ...], tuple[int, ...]] = OrderedDict()
"""Prefix files found sound (by identity), with their token ids: checked once, not per sample."""
_SOUND_LIMIT = 256


def _sound_prefix_ids(prefix: ActivationFile, key: str, where: str) -> tuple[int, ...]:
    """A prefix's token ids, after :func:`check_prefix` (run once per version of the file)."""
    ids = _SOUND_PREFIXES.get(prefix.identity)
    if ids is None:
        check_prefix(prefix, key, where)
        ids = tuple(prefix.get("input_ids").reshape(-1).tolist())
        _SOUND_PREFIXES[prefix.identity] = ids
        while len(_SOUND_PREFIXES) > _SOUND_LIMIT:
            _SOUND_PREFIXES.popitem(last=False)
    return ids


def check_prefix(prefix: ActivationFile, key: str, where: str) -> None:
    """Check that a prefix file is the one its key names: its model, dtype, sites and tokens.

    The key is recomputed from what the file holds, so a file swapped for another prefix, cut
    to fewer rows or sites, or itself leaning on a prefix is refused (the values of the rows
    are not checked: actcap keeps no checksum of them).

    Raises:
        FormatError: When it is not.
    """
    if prefix.meta.prefix:
        raise FormatError(f"{where}: a shared prefix that has a prefix itself.")
    if "input_ids" not in prefix.header:
        raise FormatError(f"{where}: a shared prefix without its input_ids.")
    ids = prefix.get("input_ids").reshape(-1).tolist()
    if prefix_key(prefix.meta.model, prefix.meta.dtype, prefix.sites, ids) != key:
        raise FormatError(f"{where}: holds another prefix than its name says.")
    for site in prefix.sites:
        shape = prefix.shape(site)
        if not shape or shape[0] != len(ids):
            raise FormatError(
                f"{where}: site {site!r} has shape {list(shape)}, not {len(ids)} rows."
            )


def prefix_fault(root: PathOrUrl, key: str, real_root: str | None = None) -> str | None:
    """Why a run's shared prefix cannot be used (missing, damaged, another), or None when sound.

    Reads its header and token ids (see :func:`check_prefix`), never through a link out of the
    run, never a FIFO or device.
    """
    text = os.fspath(root)
    rel = ""
    try:
        rel = f"{PREFIXES}/{prefix_filename(key)}"
        where = run_path(text, rel, real_root)
        if is_url(where):
            fs, path = url_fs(where)
            if not fs.exists(path):
                return f"its shared prefix {rel} is missing"
            source: Path | ShardSlice = ShardSlice(where, 0, int(fs.size(path)))
        else:
            if not os.path.lexists(where):
                return f"its shared prefix {rel} is missing"
            source = Path(where)
        with ActivationFile(source) as prefix:
            check_prefix(prefix, key, rel)
    except (FormatError, UnsafePathError, UnknownNameError) as e:
        return f"its shared prefix {rel or key} cannot be used ({e})"
    except OSError as e:
        return f"its shared prefix {rel or key} cannot be read ({e.strerror or e})"
    return None
