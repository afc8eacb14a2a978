"""The activation file format: one sample per ``.safetensors`` file, readable without actcap.

Layout (see ``docs/format.md``): one tensor per site named by the site, ``input_ids`` (int64) and,
when the answer was generated, ``output_ids``; string metadata in the safetensors header with
``format=actcap``, ``format_version``, ``prompt``, ``response``, ``model``, ``timestamp``,
``token_selection``, ``dtype`` and ``extra`` (a JSON object).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

FORMAT_NAME = "actcap"
FORMAT_VERSION = 1
ID_TENSORS = ("input_ids", "output_ids")
"""Tensors in a file that hold token ids, not activations."""
SUFFIX = ".safetensors"


def utc_now() -> str:
    """The current time as ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class SampleMeta:
    """The metadata of one activation file."""

    prompt: str
    """The exact text the model read."""
    response: str = ""
    """What it answered (empty when it only read the prompt)."""
    model: str = ""
    """Which model."""
    timestamp: str = field(default_factory=utc_now)
    """When, ISO 8601 UTC."""
    token_selection: str = "all"
    """``all``, ``last`` or ``mean``."""
    dtype: str = "float32"
    """Storage dtype of the activations."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Benchmark, question id, grade, and anything the caller adds (JSON)."""
    prefix: str = ""
    """The run's shared prefix holding the first ``prefix_tokens`` rows of every site, or ``""``
    (see :mod:`actcap.storage.prefixes`)."""
    prefix_tokens: int = 0
    """How many leading token rows are in that prefix instead of this file."""

    def to_header(self) -> dict[str, str]:
        """The safetensors header metadata (string to string)."""
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "prompt": self.prompt,
            "response": self.response,
            "model": self.model,
            "timestamp": self.timestamp,
            "token_selection": self.token_selection,
            "dtype": self.dtype,
            "extra": json.dumps(self.extra, ensure_ascii=False, sort_keys=True),
            **(
                {"prefix": self.prefix, "prefix_tokens": str(self.prefix_tokens)}
                if self.prefix
                else {}
            ),
        }

    @classmethod
    def from_header(cls, header: dict[str, str]) -> SampleMeta:
        """Rebuild from header metadata already checked by the reader."""
        extra_text = header.get("extra") or "{}"
        extra = json.loads(extra_text)
        return cls(
            prompt=header.get("prompt", ""),
            response=header.get("response", ""),
            model=header.get("model", ""),
            timestamp=header.get("timestamp", ""),
            token_selection=header.get("token_selection", "all"),
            dtype=header.get("dtype", ""),
            extra=extra if isinstance(extra, dict) else {"value": extra},
            prefix=header.get("prefix", ""),
            prefix_tokens=_count(header.get("prefix_tokens", "")),
        )


def _count(text: str) -> int:
    """A non-negative count written in a header, or -1 when it is none (the reader refuses it)."""
    return int(text) if text.isdecimal() and len(text) < 16 else -1 if text else 0


SHARD_SUFFIX = ".shard"
"""A shard: many samples' safetensors blobs one after another (see :mod:`actcap.storage.shards`)."""


@dataclass(frozen=True)
class ShardSlice:
    """Where one sample lies inside a shard: the shard (a path or URL) and a byte range.

    The bytes ``[offset, offset + length)`` are a whole safetensors file of that sample, so any
    safetensors reader takes them: ``safetensors.torch.load(f.read(length))`` after a seek.
    """

    shard: str
    """The shard file: a local path or an fsspec URL."""
    offset: int
    """Where the sample's bytes begin."""
    length: int
    """How many bytes it has."""

    def __str__(self) -> str:
        """``shard@offset`` (used in messages)."""
        return f"{self.shard}@{self.offset}"


SampleSource = str | os.PathLike[str] | ShardSlice
"""Where one sample's activations are: a file, or a slice of a shard."""
