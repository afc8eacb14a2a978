"""Writing and reading single-sample activation files.

Writes are atomic (a temporary name in the same folder, fsync, rename), so a reader or a crash
sees either the whole file or none. Reads tell what a file holds from its first bytes, never from
its name (:func:`detect_format`), check it before trusting it and name the file in every error.
Older pipelines' ``torch.save`` files load through ``torch.load(weights_only=True)``; a pickle
that needs more is refused unless the caller trusts it explicitly.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from actcap.errors import FormatError, UnknownNameError, UnsafeFileError, WriteError
from actcap.storage.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ID_TENSORS,
    SHARD_SUFFIX,
    SUFFIX,
    SampleMeta,
    ShardSlice,
)
from actcap.storage.location import is_url, read_range

MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


def site_sort_key(name: str) -> tuple[int, int, str]:
    """Order sites as they sit in the network: embeddings, layer_0, layer_0.attn, ..., final_norm."""
    m = re.match(r"^layer_(\d+)(.*)$", name)
    if name == "embeddings":
        return (0, 0, "")
    if m:
        return (1, int(m.group(1)), m.group(2))
    if name == "final_norm":
        return (2, 0, "")
    return (3, 0, name)


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


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
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

    _atomic_write(path, write)


def sample_tensors(
    label: str,
    activations: Mapping[str, Tensor],
    input_ids: Tensor | None,
    output_ids: Tensor | None,
) -> dict[str, Tensor]:
    """The tensors of one sample as stored: sites on the CPU, then the token ids as int64.

    Raises:
        FormatError: When a site is named like a token-id tensor.
    """
    tensors: dict[str, Tensor] = {}
    for name, t in activations.items():
        if name in ID_TENSORS:
            raise FormatError(
                f"{label}: {name!r} is reserved for token ids and cannot name a site."
            )
        tensors[name] = t.detach().to("cpu").contiguous()
    for name, ids in (("input_ids", input_ids), ("output_ids", output_ids)):
        if ids is not None:
            tensors[name] = ids.detach().to("cpu", torch.int64).reshape(-1).contiguous()
    return tensors


def encode_sample(
    label: str,
    activations: Mapping[str, Tensor],
    meta: SampleMeta,
    *,
    input_ids: Tensor | None = None,
    output_ids: Tensor | None = None,
) -> list[memoryview]:
    """One sample as the parts of a safetensors file: its header, then each tensor's bytes.

    Writing the parts one after another gives exactly the bytes ``safetensors.torch.save``
    would (its layout: an 8-byte little-endian header size, a JSON header padded with spaces to
    8 bytes, the tensors back to back), without first copying every tensor into one buffer, which
    made appending to a shard 2-3x slower than ``save_file``. Readers check it all the same.

    Raises:
        FormatError: When a site is named like a token-id tensor.
    """
    tensors = sample_tensors(label, activations, input_ids, output_ids)
    header: dict[str, Any] = {"__metadata__": meta.to_header()}
    parts: list[memoryview] = []
    offset = 0
    for name, t in tensors.items():
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        parts.append(raw.numpy().data)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [memoryview(struct.pack("<Q", len(text)) + text), *parts]


def save_activations(
    path: str | os.PathLike[str],
    activations: Mapping[str, Tensor],
    meta: SampleMeta,
    *,
    input_ids: Tensor | None = None,
    output_ids: Tensor | None = None,
) -> Path:
    """Write one sample's activations and metadata to a ``.safetensors`` file, atomically.

    Args:
        path: Destination file.
        activations: Site name to tensor (any device; copied to CPU).
        meta: Prompt, response, model, timestamp and the rest.
        input_ids: The prompt's token ids.
        output_ids: The generated token ids, when there are any.

    Returns:
        The path written.

    Raises:
        FormatError: When a site is named like a token-id tensor.

    Example:
        >>> save_activations("a.safetensors", {"layer_0": torch.zeros(3, 8)}, SampleMeta("hi"))
        PosixPath('a.safetensors')
    """
    target = Path(path)
    tensors = sample_tensors(str(target), activations, input_ids, output_ids)

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=meta.to_header())
        except (
            SafetensorError
        ) as e:  # safetensors reports I/O failures (ENOSPC, EIO) as its own type
            raise WriteError(f"{target}: cannot write ({e}).") from e

    _atomic_write(target, write)
    return target


FileKind = Literal["safetensors", "torch-zip", "pickle", "unknown"]
"""What a file holds, as :func:`detect_format` tells from its first bytes."""
_PICKLED: tuple[FileKind, ...] = ("torch-zip", "pickle")


def detect_format(path: Path) -> FileKind:
    """What a file holds, decided from its first bytes, never from its name.

    Every reader asks this before opening a file, so a safetensors file named ``.pkl`` is read as
    safetensors and a ``torch.save`` file named ``.safetensors`` through ``torch.load``.

    Returns:
        ``safetensors`` (an 8-byte little-endian header size, then ``{``), ``torch-zip`` (a zip
        archive: ``torch.save`` since PyTorch 1.6), ``pickle`` (the PROTO opcode of pickle
        protocol 2 to 5: ``pickle.dump`` and older ``torch.save``), or ``unknown`` (readers then
        try safetensors, whose checks say what is wrong).

    Raises:
        FormatError: When the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e}).") from e
    return format_of(head)


def format_of(head: bytes) -> FileKind:
    """:func:`detect_format` on a file's first 9 bytes.

    Safetensors is tried first: a pickle's or zip's first 9 bytes never look like it (byte 8 of
    a pickle is inside a frame length or an opcode argument, of a zip the compression method),
    and a misjudged file would only be parsed, never unpickled.
    """
    if len(head) >= 9 and head[8:9] == b"{":
        (size,) = struct.unpack("<Q", head[:8])
        if size <= MAX_HEADER_BYTES:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def read_header(path: Path) -> dict[str, Any]:
    """Read and check a safetensors header without loading any tensor.

    Raises:
        FormatError: When the file is empty, truncated, or not a safetensors file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return parse_header(lambda start, n: _read_at(f, start, n), size, str(path))
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e}).") from e


def _read_at(f: Any, start: int, n: int) -> bytes:
    f.seek(start)
    return bytes(f.read(n))


def parse_header(read: Callable[[int, int], bytes], size: int, label: str) -> dict[str, Any]:
    """Read and check a safetensors header through ``read(start, n)`` over ``size`` bytes.

    Every tensor's shape must match its byte span and lie inside the ``size`` bytes.

    Raises:
        FormatError: When the bytes are empty, truncated, or not a safetensors file.
    """
    head = read(0, 8) if size >= 8 else b""
    if len(head) < 8:
        raise FormatError(
            f"{label}: file is {'empty' if size == 0 else 'truncated'} ({size} bytes); not an activation file."
        )
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{label}: not a safetensors file, nor a torch.save or pickle file (it begins {head!r})."
        )
    if n + 8 > size:
        raise FormatError(
            f"{label}: not a safetensors file, or truncated (header claims {n} bytes, file has {size})."
        )
    raw = read(8, n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{label}: corrupt safetensors header ({e}).") from e
    except RecursionError as e:
        raise FormatError(f"{label}: corrupt safetensors header (JSON nested too deeply).") from e
    if not isinstance(header, dict):
        raise FormatError(f"{label}: corrupt safetensors header (not a JSON object).")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and dtype in _DTYPE_BYTES
        ):
            raise FormatError(f"{label}: corrupt entry for tensor {name!r} in the header.")
        count = math.prod(shape)
        if count * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise FormatError(
                f"{label}: tensor {name!r} claims shape {shape} ({dtype}) but spans "
                f"{offsets[1] - offsets[0]} bytes; the header is corrupt."
            )
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise FormatError(f"{label}: truncated: tensors need {8 + n + end} bytes, file has {size}.")
    return header


def check_metadata(path: Path | str, header: dict[str, Any]) -> dict[str, str]:
    """Check the actcap metadata of a header and return it.

    Files without actcap metadata (plain safetensors) are accepted; a newer format is refused.

    Raises:
        FormatError: For an unknown, newer or malformed ``format_version``.
    """
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: corrupt metadata in the header.")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise FormatError(
                f"{path}: corrupt metadata in the header ({key!r} is a {type(value).__name__}, "
                "not a string)."
            )
    if meta.get("format") not in (None, FORMAT_NAME):
        raise FormatError(
            f"{path}: format {meta.get('format')!r} is not an actcap activation file."
        )
    if "format_version" in meta:
        try:
            version = int(meta["format_version"])
        except (TypeError, ValueError):
            raise FormatError(
                f"{path}: format_version {meta['format_version']!r} is not a number."
            ) from None
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{path}: format_version {version} is newer than this actcap supports "
                f"({FORMAT_VERSION}); upgrade actcap (pip install -U actcap)."
            )
        if version < 1:
            raise FormatError(f"{path}: unknown format_version {version}.")
    if "extra" in meta:
        try:
            json.loads(meta["extra"])
        except (TypeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: metadata 'extra' is not valid JSON ({e}).") from e
        except RecursionError as e:
            raise FormatError(f"{path}: metadata 'extra' is JSON nested too deeply.") from e
    return {str(k): str(v) for k, v in meta.items()}


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
        if detect_format(self.path) in _PICKLED:
            self._tensors, header = _legacy_contents(self.path)
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

    @property
    def names(self) -> list[str]:
        """All tensor names in the file."""
        return [k for k in self.header if k != "__metadata__"]

    @property
    def sites(self) -> list[str]:
        """Activation sites in the file (token-id tensors excluded), in the order stored."""
        return sorted((k for k in self.names if k not in ID_TENSORS), key=site_sort_key)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, from the header."""
        self._check_name(name)
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype of a tensor (``F32``, ``BF16``, ...)."""
        self._check_name(name)
        return str(self.header[name]["dtype"])

    def get(self, name: str) -> Tensor:
        """Read one tensor (from a shard: only that tensor's bytes)."""
        self._check_name(name)
        if self._tensors is not None:
            return self._tensors[name]
        if self.slice is not None:
            info = self.header[name]
            start, end = info["data_offsets"]
            data = read_range(self.slice.shard, self._data_start + start, self._data_start + end)
            if len(data) != end - start:
                raise FormatError(f"{self.label}: tensor {name!r} is truncated in the shard.")
            dtype = _TORCH_DTYPES[info["dtype"]]
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
        if self.slice is not None or self._tensors is not None:
            return self.get(name)
        return self._handle.get_slice(name)

    def _check_name(self, name: str) -> None:
        if name not in self.header or name == "__metadata__":
            raise UnknownNameError(
                f"{self.label}: no site {name!r}. Sites in this file: {', '.join(self.sites)}."
            )

    def iter_sites(self, sites: Sequence[str] | None = None) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(site, tensor)`` one at a time (bounded memory)."""
        for name in sites if sites is not None else self.sites:
            yield name, self.get(name)


def check_question_id(header: Mapping[str, Any], sample_id: str, label: str) -> None:
    """Check that a sample's header names ``sample_id`` as its question, where it names one.

    Raises:
        FormatError: When its ``extra.question_id`` is another id (another sample's file).
    """
    meta = header.get("__metadata__")
    extra_text = meta.get("extra") if isinstance(meta, dict) else None
    try:
        extra = json.loads(extra_text) if isinstance(extra_text, str) else None
    except (ValueError, RecursionError):
        raise FormatError(f"{label}: corrupt metadata in the header (extra).") from None
    question_id = extra.get("question_id") if isinstance(extra, dict) else None
    if question_id is not None and question_id != sample_id:
        raise FormatError(
            f"{label}: holds sample {question_id!r}, not {sample_id!r} as the manifest says; the "
            "file was replaced. Resume the run to redo it."
        )


def load_activations(
    file_path: str | os.PathLike[str] | ShardSlice,
    sites: Sequence[str] | None = None,
    *,
    trust_pickle: bool = False,
    sample_id: str | None = None,
) -> dict[str, Any]:
    """Load an activation file into the dictionary the seed pipeline used.

    Args:
        file_path: A safetensors file written by actcap (or any safetensors file), a file
            written by ``torch.save`` in older pipelines, a :class:`ShardSlice`, or a run
            directory (or URL) together with ``sample_id``. What a file holds is told from its
            first bytes, never from its name (:func:`detect_format`).
        sites: Read only these sites (memory-mapped, so one layer of a large file loads fast).
        trust_pickle: Allow a pickle that ``torch.load(weights_only=True)`` refuses. Unpickling
            can run arbitrary code: only pass True for files you made yourself.
        sample_id: With a run directory (either layout, files or shards), the sample to load.
            This reads the run's manifests on each call; to go through many samples, iterate
            ``open_run(run).sample_paths()`` and pass each source here instead.

    Returns:
        ``{"prompt", "response", "model", "timestamp", "input_ids", "output_ids",
        "activations": {site: tensor}, "metadata": {...}}``.

    Raises:
        FormatError: The file is missing, truncated, corrupt or of a newer format, or (with
            ``sample_id``) holds another sample than the manifest says.
        UnsafeFileError: A pickle that needs code execution, without ``trust_pickle``.
        UnknownNameError: ``sample_id`` is not in the run.
    """
    source: Path | ShardSlice
    if isinstance(file_path, ShardSlice):
        source = file_path
    elif sample_id is not None or is_url(file_path) or Path(file_path).is_dir():
        source = _find_in_run(file_path, sample_id)
    else:
        source = Path(file_path)
        if not source.is_file():
            raise FormatError(f"{source}: no such file.")
        if detect_format(source) in _PICKLED:
            return _load_legacy(source, sites, trust_pickle)
    with ActivationFile(source) as f:
        if sample_id is not None:
            check_question_id(f.header, sample_id, f.label)
        wanted = list(sites) if sites is not None else f.sites
        acts = dict(f.iter_sites(wanted))
        meta = f.meta
        names = f.names
        input_ids = f.get("input_ids") if "input_ids" in names else None
        output_ids = f.get("output_ids") if "output_ids" in names else None
        raw = f.raw_metadata
    return {
        "prompt": meta.prompt,
        "response": meta.response,
        "model": meta.model,
        "timestamp": meta.timestamp,
        "input_ids": input_ids,
        "output_ids": output_ids,
        "activations": acts,
        "metadata": {**raw, "extra": meta.extra},
    }


def _find_in_run(root: str | os.PathLike[str], sample_id: str | None) -> Path | ShardSlice:
    """Where one sample of a run lies (the run may be local or at a URL, files or shards)."""
    from actcap.storage.run import open_run  # run.py builds on this module

    if sample_id is None:
        raise FormatError(
            f"{os.fspath(root)}: a run holds many samples; pass sample_id= to choose one "
            "(actcap inspect RUN lists them)."
        )
    text = os.fspath(root)
    if not is_url(text) and Path(text).is_file() and Path(text).suffix == SHARD_SUFFIX:
        text = str(Path(text).parent.parent)  # a shard inside RUN/shards/
    info = open_run(text)
    entry = info.find(sample_id)
    source = entry.source(info.root)
    if source is None:
        raise FormatError(f"{text}: sample {sample_id!r} was run without capture; no activations.")
    return source


def _brief(e: BaseException) -> str:
    """The first line of an exception's message, shortened (torch's run to many lines)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _unpickle(path: Path, trust_pickle: bool) -> Any:
    """A torch.save or pickle file's contents: tensors and plain containers only, unless trusted.

    Raises:
        FormatError: When the bytes are no readable torch.save or pickle file.
        UnsafeFileError: A well-formed pickle that needs more than ``weights_only``, untrusted.
    """
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it was not written with; the load is still safe.
            warnings.simplefilter("ignore", UserWarning)
            with open(path, "rb") as f:  # a file object: torch.load judges a path by its suffix
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = e
    except Exception as e:  # weights_only runs no code: any failure means unreadable bytes
        raise FormatError(f"{path}: not a readable torch.save or pickle file ({_brief(e)}).") from e
    problem = _pickle_problem(path)
    if problem is not None:
        raise FormatError(f"{path}: a corrupt torch.save or pickle file ({problem}).") from refused
    if not trust_pickle:
        raise UnsafeFileError(
            f"{path}: this pickle holds objects beyond tensors and plain containers, and loading "
            "it could run arbitrary code. If you made this file yourself, load it in Python with "
            "load_activations(path, trust_pickle=True); otherwise do not open it."
        ) from refused
    try:
        with open(path, "rb") as f:
            if detect_format(path) == "torch-zip":
                return torch.load(f, map_location="cpu", weights_only=False)
            return pickle.load(f)  # noqa: S301 - trusted; a plain pickle.dump, which torch.load refuses
    except Exception as e:  # any unpickling failure of a trusted file
        raise FormatError(f"{path}: cannot unpickle ({_brief(e)}).") from e


def _pickle_problem(path: Path) -> str | None:
    """Why a file's pickle (a torch zip's ``data.pkl``) does not parse; None when it parses.

    Opcodes and stack are checked by ``pickletools.dis``, which runs nothing.
    """
    import pickletools
    import zipfile

    try:
        with open(os.devnull, "w") as sink:
            if detect_format(path) == "torch-zip":
                with zipfile.ZipFile(path) as z:
                    member = next(n for n in z.namelist() if n.endswith("data.pkl"))
                    with z.open(member) as f:
                        pickletools.dis(f, out=sink)
            else:
                with open(path, "rb") as f:
                    pickletools.dis(f, out=sink)
    except StopIteration:
        return "a zip archive without a data.pkl"
    except Exception as e:  # any parse failure: not a pickle anyone could load
        return _brief(e)
    return None


def _legacy_contents(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A torch.save file's tensors, and a safetensors-like header describing them.

    Raises:
        FormatError: When the file is no activation file, or an activation is no tensor.
        UnsafeFileError: A pickle that needs code execution.
    """
    data = _load_legacy(path, None, trust_pickle=False)
    tensors = {str(k): v for k, v in data["activations"].items()}
    tensors.update({k: data[k] for k in ID_TENSORS if isinstance(data.get(k), Tensor)})
    text = ("prompt", "response", "model", "timestamp")
    header: dict[str, Any] = {
        "__metadata__": {k: data[k] for k in text if isinstance(data.get(k), str)}
    }
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise FormatError(f"{path}: activation {name!r} is a {type(t).__name__}, not a tensor.")
        dtype = _SAFETENSORS_NAMES.get(t.dtype, str(t.dtype))
        header[name] = {"dtype": dtype, "shape": list(t.shape)}
    return tensors, header


def _load_legacy(path: Path, sites: Sequence[str] | None, trust_pickle: bool) -> dict[str, Any]:
    """The seed's dictionary from a torch.save or pickle file (see :func:`_unpickle`)."""
    data = _unpickle(path, trust_pickle)
    if not isinstance(data, dict) or not isinstance(data.get("activations"), dict):
        raise FormatError(
            f"{path}: a torch.save file without an 'activations' dictionary is not an activation file."
        )
    acts = data["activations"]
    if sites is not None:
        missing = [s for s in sites if s not in acts]
        if missing:
            raise UnknownNameError(
                f"{path}: no site {missing[0]!r}. Sites in this file: {', '.join(map(str, acts))}."
            )
        acts = {s: acts[s] for s in sites}
    return {
        "prompt": data.get("prompt", ""),
        "response": data.get("response", ""),
        "model": data.get("model", ""),
        "timestamp": data.get("timestamp", ""),
        "input_ids": data.get("input_ids"),
        "output_ids": data.get("output_ids"),
        "activations": dict(acts),
        "metadata": {k: v for k, v in data.items() if k != "activations"},
    }
