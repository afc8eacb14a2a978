"""Shared prompt prefixes, stored once per run.

Prompts of one run often begin with the same tokens: the few-shot examples of a subject, a system
prompt. With every token kept (``token_selection="all"``) a sample's activations at those positions
are the same for every prompt that shares them (a causal model's position ``t`` sees only tokens
``0..t``), so a run writes them once, in ``prefixes/<key>.safetensors``, and each sample file holds
only its own rows after the prefix. The key is the SHA-256 of the model, the storage dtype, the
site names and the prefix's token ids, so a prefix is found again on resume and by other writers
of the run (Ray workers) without coordination, and is never confused with another's.

A sample file that leans on a prefix says so in its header metadata (``prefix``: the key,
``prefix_tokens``: how many rows it holds) and in its manifest line (``prefix``). Readers join the
two (:class:`actcap.storage.files.ActivationFile`), so users always see ``[tokens, hidden]``.
The prefix lies in the sample's own run: ``<run>/prefixes/<key>.safetensors``, the run found as the
folder above the sample's ``samples/`` or ``shards/`` folder; a key is 64 hex digits, so no header
can point a reader anywhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from actcap.errors import FormatError
from actcap.storage.format import SampleMeta
from actcap.storage.layout import PREFIXES, SAMPLES, SHARDS
from actcap.storage.location import is_url
from actcap.storage.records import FinishedSample

PREFIX_KEY = "prefix"
"""Header metadata (and manifest) key: the prefix a sample's first rows are in."""
MIN_PREFIX_TOKENS = 16
"""Shorter common prefixes are not worth a file of their own."""

_KEY = re.compile(r"[0-9a-f]{64}")


def prefix_key(model: str, dtype: str, sites: Sequence[str], token_ids: Sequence[int]) -> str:
    """The key of a prefix: SHA-256 over the model, dtype, sites and token ids (64 hex digits)."""
    h = hashlib.sha256()
    for part in (model, dtype, "\x1f".join(sorted(sites))):
        h.update(part.encode())
        h.update(b"\x00")
    h.update(",".join(str(int(t)) for t in token_ids).encode())
    return h.hexdigest()


def is_prefix_key(text: object) -> bool:
    """Whether ``text`` is a well-formed prefix key (and so a safe file name)."""
    return isinstance(text, str) and _KEY.fullmatch(text) is not None


def prefix_filename(key: str) -> str:
    """The file name of a prefix inside ``prefixes/``.

    Raises:
        FormatError: When ``key`` is not 64 hex digits (a corrupt header or manifest line).
    """
    if not is_prefix_key(key):
        raise FormatError(f"shared prefix key {key!r} is corrupt (not 64 hex digits).")
    return f"{key}.safetensors"


def prefix_location(sample_location: str | os.PathLike[str], key: str) -> str:
    """Where a sample's prefix lies: ``prefixes/<key>.safetensors`` of the sample's run.

    Args:
        sample_location: The sample's file, or the shard it is in (a path or a URL).
        key: The prefix key from the sample's header.

    Raises:
        FormatError: When the key is corrupt, or the sample is not in a run's ``samples/`` or
            ``shards/`` folder.
    """
    name = prefix_filename(key)
    text = os.fspath(sample_location)
    if is_url(text):
        root, folder, _ = text.rstrip("/").rsplit("/", 2)
    else:
        parent = os.path.dirname(text)
        folder, root = os.path.basename(parent), os.path.dirname(parent) or "."
    if folder not in (SAMPLES, SHARDS):
        raise FormatError(
            f"{text}: its first token rows are in its run's shared prefix, and it lies outside a "
            f"run's {SAMPLES}/ or {SHARDS}/ folder, so that prefix cannot be found. Read it in its "
            "run, or save a copy of its own from there with save_activations (every row)."
        )
    return f"{root}/{PREFIXES}/{name}" if is_url(text) else os.path.join(root, PREFIXES, name)


def shareable_rows(
    activations: Mapping[str, Tensor], input_ids: Tensor | None, prefix_ids: Sequence[int]
) -> int:
    """How many leading rows of a sample a prefix can hold: ``len(prefix_ids)`` or 0.

    0 when the sample's tokens do not begin with the prefix, or a site has no row of its own
    after it (every sample keeps at least one row), or a site's tensor is not ``[tokens, ...]``.
    """
    n = len(prefix_ids)
    if n < MIN_PREFIX_TOKENS or input_ids is None or input_ids.numel() <= n:
        return 0
    if [int(t) for t in input_ids.reshape(-1)[:n].tolist()] != [int(t) for t in prefix_ids]:
        return 0
    if not activations or any(t.dim() < 2 or t.shape[0] <= n for t in activations.values()):
        return 0
    return n


def common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    """The longest run of token ids every row begins with."""
    if not rows:
        return []
    first, n = rows[0], min(len(r) for r in rows)
    for j in range(n):
        if any(r[j] != first[j] for r in rows[1:]):
            return list(first[:j])
    return list(first[:n])


@dataclass(frozen=True)
class SharedPrefix:
    """The rows of a prefix, as a run writer stores them once (an activation file of its own)."""

    key: str
    activations: dict[str, Tensor]
    """Site to ``[prefix_tokens, ...]``."""
    input_ids: Tensor
    meta: SampleMeta

    @property
    def filename(self) -> str:
        """Its name in ``prefixes/``."""
        return prefix_filename(self.key)


def split_shared_prefix(sample: FinishedSample) -> tuple[FinishedSample, SharedPrefix | None]:
    """Cut a sample's shared prefix rows off: the sample as its file keeps it, and the prefix.

    Nothing is cut (None) without capture, with ``last``/``mean`` selection, or when the sample
    does not begin with its ``shared_prefix`` tokens (see :func:`shareable_rows`). The sample
    returned says in its metadata and manifest record which prefix holds its first rows.
    """
    acts, meta = sample.activations, sample.meta
    if acts is None or meta is None or not sample.shared_prefix:
        return sample, None
    if meta.token_selection != "all":
        return sample, None
    n = shareable_rows(acts, sample.input_ids, sample.shared_prefix)
    if n == 0:
        return sample, None
    key = prefix_key(meta.model, meta.dtype, list(acts), sample.shared_prefix)
    prefix = SharedPrefix(
        key,
        {site: t[:n] for site, t in acts.items()},
        torch.tensor(sample.shared_prefix[:n], dtype=torch.int64),
        SampleMeta(
            prompt="",
            model=meta.model,
            token_selection="all",
            dtype=meta.dtype,
            extra={"shared_prefix": True},
        ),
    )
    own = dataclasses.replace(
        sample,
        activations={site: t[n:] for site, t in acts.items()},
        meta=dataclasses.replace(meta, prefix=key, prefix_tokens=n),
        record={**sample.record, PREFIX_KEY: key},
    )
    return own, prefix
