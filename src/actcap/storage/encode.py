"""Encoding one sample as safetensors bytes: its tensors as stored, and the file's parts."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from actcap.errors import FormatError
from actcap.storage.dtypes import SAFETENSORS_NAMES
from actcap.storage.float8 import FLOAT8, quantize_sites
from actcap.storage.format import ID_TENSORS, SampleMeta


def sample_tensors(
    label: str,
    activations: Mapping[str, Tensor],
    input_ids: Tensor | None,
    output_ids: Tensor | None,
    storage_dtype: str = "",
) -> dict[str, Tensor]:
    """The tensors of one sample as stored: sites on the CPU, then the token ids as int64.

    With ``storage_dtype`` ``float8`` each site is stored as float8 values and a scale per row
    (:mod:`actcap.storage.float8`).

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
    if storage_dtype == FLOAT8:
        tensors = quantize_sites(tensors, set(tensors))
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
    tensors = sample_tensors(label, activations, input_ids, output_ids, meta.dtype)
    header: dict[str, Any] = {"__metadata__": meta.to_header()}
    parts: list[memoryview] = []
    offset = 0
    for name, t in tensors.items():
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        parts.append(raw.numpy().data)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [memoryview(struct.pack("<Q", len(text)) + text), *parts]
