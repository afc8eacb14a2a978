"""Telling and checking a file before any tensor is trusted.

:func:`detect_format` tells what a file holds from its first bytes, never from its name;
:func:`parse_header` checks a safetensors header (every tensor inside the bytes, shapes matching
spans); :func:`check_metadata` checks actcap's metadata and refuses a newer format;
:func:`check_question_id` checks that a file holds the sample its manifest line names.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from actcap.errors import FormatError
from actcap.storage.dtypes import DTYPE_BYTES
from actcap.storage.format import FORMAT_NAME, FORMAT_VERSION
from actcap.storage.location import open_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024

FileKind = Literal["safetensors", "torch-zip", "pickle", "unknown"]
"""What a file holds, as :func:`detect_format` tells from its first bytes."""

PICKLED: tuple[FileKind, ...] = ("torch-zip", "pickle")


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
        with open_regular(path) as f:
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
        with open_regular(path) as f:
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
            and isinstance(dtype, str)
            and dtype in DTYPE_BYTES
        ):
            raise FormatError(f"{label}: corrupt entry for tensor {name!r} in the header.")
        count = math.prod(shape)
        if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
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
