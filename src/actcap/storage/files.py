"""The public verbs on one sample: :func:`save_activations` and :func:`load_activations`.

Like safetensors' ``save_file``/``load_file``, they are symmetric: a sample saved by one loads
with the other, from a file, a slice of a shard or a run and a sample id. They sit above the
storage modules that do the work (:mod:`~actcap.storage.durable` writes, :mod:`~actcap.storage.encode`,
:mod:`~actcap.storage.reader`, :mod:`~actcap.storage.legacy`, :mod:`~actcap.storage.runinfo`),
which never import this module. :class:`ActivationFile` is re-exported here as the third public
verb on a file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from actcap.errors import FormatError, WriteError
from actcap.storage.durable import atomic_write
from actcap.storage.encode import sample_tensors
from actcap.storage.format import SHARD_SUFFIX, SampleMeta, ShardSlice
from actcap.storage.header import PICKLED, check_question_id, detect_format
from actcap.storage.legacy import load_legacy
from actcap.storage.location import is_url
from actcap.storage.reader import ActivationFile
from actcap.storage.records import activation_dict
from actcap.storage.runinfo import open_run

__all__ = ["ActivationFile", "load_activations", "save_activations"]


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
    if meta.prefix:  # a file of its own holds every row: it leans on no run's shared prefix
        meta = dataclasses.replace(meta, prefix="", prefix_tokens=0)
    tensors = sample_tensors(str(target), activations, input_ids, output_ids, meta.dtype)

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=meta.to_header())
        except (
            SafetensorError
        ) as e:  # safetensors reports I/O failures (ENOSPC, EIO) as its own type
            raise WriteError(f"{target}: cannot write ({e}).") from e

    atomic_write(target, write)
    return target


def load_activations(
    file_path: str | os.PathLike[str] | ShardSlice,
    sites: Sequence[str] | None = None,
    *,
    trust_pickle: bool = False,
    sample_id: str | None = None,
    dtype: torch.dtype | None = None,
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
        dtype: Return the activations in this dtype (default: as stored; a float8 run's come
            back dequantized in float32, see :mod:`actcap.storage.float8`).

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
        if detect_format(source) in PICKLED:
            return load_legacy(source, sites, trust_pickle)
    with ActivationFile(source) as f:
        if sample_id is not None:
            check_question_id(f.header, sample_id, f.label)
        wanted = list(sites) if sites is not None else f.sites
        acts = dict(f.iter_sites(wanted, dtype))
        meta = f.meta
        names = f.names
        input_ids = f.get("input_ids") if "input_ids" in names else None
        output_ids = f.get("output_ids") if "output_ids" in names else None
        raw = f.raw_metadata
    return activation_dict(meta, acts, input_ids, output_ids, {**raw, "extra": meta.extra})


def _find_in_run(root: str | os.PathLike[str], sample_id: str | None) -> Path | ShardSlice:
    """Where one sample of a run lies (the run may be local or at a URL, files or shards)."""
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
