"""Export one site of a run for downstream training: Parquet, a Hugging Face dataset, or ``.npy``.

Rows are either token-major (one row per token: sample id, position, token id, activation), what
SAE training reads, or one row per sample (its last-token or mean vector), what a probe reads.
Samples are read one at a time and rows are written in groups, so memory stays bounded by one
sample plus one group of rows, whatever the size of the run.

Layouts written under ``--out``:

- ``parquet``: ``part-00000.parquet``, ... with columns ``sample_id``, ``sample_index``,
  ``position``, ``token_id``, ``correct``, ``category``, ``activation`` (a fixed-size list);
- ``hf-dataset``: a ``datasets.Dataset`` saved with ``save_to_disk`` (``datasets.load_from_disk``);
- ``npy``: ``activations.npy`` (rows x hidden, written row by row), ``sample_index.npy``,
  ``position.npy``, ``token_id.npy``, and ``samples.jsonl`` (id, correct, category per sample).

Each also gets ``_export.json`` (written atomically): the run, site, row layout, dtype, hidden size and row count (the
leading underscore keeps Parquet readers, which skip ``_`` and ``.`` files, reading the folder).

Every sample's site must have the first usable sample's layout: ``[tokens, hidden]`` (token rows)
or one ``[hidden]`` vector (a ``last``/``mean`` capture), with the same ``hidden``. A sample that
does not fit, or cannot be read, is skipped and listed in ``_export.json`` (``skipped``) and the
result; the rows and ``hidden`` written are always those the metadata states.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from actcap.data.samples import SampleRef, Skipped, iter_open, list_samples
from actcap.errors import FormatError, UnknownNameError, require
from actcap.storage.durable import atomic_write_bytes
from actcap.storage.format import utc_now
from actcap.storage.reader import ActivationFile

ExportFormat = Literal["parquet", "hf-dataset", "npy"]
Rows = Literal["tokens", "samples"]
Reduce = Literal["last", "mean"]
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class ExportResult:
    """What an export wrote: every format's writer returns one."""

    out: Path
    """The output folder."""
    n_rows: int
    """Rows written."""
    n_samples: int
    """Samples read."""
    hidden: int
    """Width of each activation row."""
    files: list[Path] = field(default_factory=list)
    """Files written (data files; ``_export.json`` besides)."""
    skipped: Skipped = field(default_factory=Skipped)
    """Samples that could not be read (or lack the site), with why."""


@dataclass(frozen=True)
class _Layout:
    """The layout every exported sample's site must have: from the first usable sample."""

    vector: bool
    """One ``[hidden]`` vector per sample (a ``last``/``mean`` capture), not ``[tokens, ...]``."""
    hidden: int
    """Width of a row."""

    @staticmethod
    def of(shape: tuple[int, ...]) -> _Layout | None:
        """The layout of a site of this shape (None for a scalar)."""
        if not shape:
            return None
        if len(shape) == 1:
            return _Layout(True, int(shape[0]))
        return _Layout(False, int(np.prod(shape[1:])))

    def describe(self) -> str:
        return f"[{self.hidden}]" if self.vector else f"[tokens, {self.hidden}]"


@dataclass
class _Block:
    """Rows of one sample."""

    ref: SampleRef
    index: int
    activation: np.ndarray
    position: np.ndarray
    token_id: np.ndarray


def _rows_of(
    ref: SampleRef,
    index: int,
    f: ActivationFile,
    site: str,
    layout: _Layout,
    rows: Rows,
    reduce: Reduce,
    dtype: Any,
) -> _Block:
    """One sample's rows of ``site``.

    Raises:
        FormatError: When it cannot be read, or its shape does not fit ``layout``.
    """
    x = f.get(site).float()
    if _Layout.of(tuple(x.shape)) != layout:
        raise FormatError(
            f"{f.label}: site {site!r} has shape {list(x.shape)}, not {layout.describe()} as the "
            "first sample's; left out of the export."
        )
    if x.dim() == 1:  # stored reduced (token selection last or mean): one row per sample
        x = x.unsqueeze(0)
        positions = np.array([-1], dtype=np.int32)
    else:
        x = x.reshape(x.shape[0], -1)
        positions = np.arange(x.shape[0], dtype=np.int32)
    ids: list[torch.Tensor] = [
        f.get(n).reshape(-1) for n in ("input_ids", "output_ids") if n in f.names
    ]
    all_ids = torch.cat(ids).numpy() if ids else np.zeros(0, dtype=np.int64)
    token_ids = np.full(len(positions), -1, dtype=np.int64)
    known = (positions >= 0) & (positions < len(all_ids))
    token_ids[known] = all_ids[positions[known]]
    if rows == "samples" and x.shape[0] > 1:
        if reduce == "mean":
            x, positions, token_ids = (
                x.mean(0, keepdim=True),
                np.array([-1], np.int32),
                np.array([-1]),
            )
        else:
            x, positions, token_ids = x[-1:], positions[-1:], token_ids[-1:]
    return _Block(ref, index, x.numpy().astype(dtype, copy=False), positions, token_ids)


def _blocks(
    samples: list[SampleRef],
    site: str,
    layout: _Layout,
    rows: Rows,
    reduce: Reduce,
    dtype: Any,
    skipped: Skipped,
) -> Iterator[_Block]:
    """Each sample's rows, in order; one that cannot be read or does not fit goes to ``skipped``."""
    index = 0
    for ref, f in iter_open(samples, skipped):
        if site not in f.sites:
            skipped.add(ref.path, f"no site {site!r} (sites: {', '.join(f.sites)})")
            continue
        try:
            block = _rows_of(ref, index, f, site, layout, rows, reduce, dtype)
        except FormatError as e:
            skipped.add(ref.path, str(e))
            continue
        index += 1
        yield block


def _first_layout(samples: list[SampleRef], site: str) -> _Layout:
    """The site's layout in the first readable header that has it in a usable shape.

    A vector of its own on a shared prefix (whose rows are tokens) is no usable shape.

    Raises:
        UnknownNameError: When no sample has the site.
        FormatError: When none has it in a usable shape.
    """
    seen: set[str] = set()
    unusable: list[str] = []
    for ref in samples:
        try:
            with ActivationFile(ref.path) as f:
                seen.update(f.sites)
                if site not in f.sites:
                    continue
                own = f.shape(site, own=True)
                layout = _Layout.of(f.shape(site))
                if layout is None or (f.prefix_tokens and len(own) < 2):
                    unusable.append(f"{f.label}: shape {list(own)}")
                    continue
                return layout
        except FormatError:
            continue
    if unusable:
        raise FormatError(
            f"No sample has site {site!r} as [tokens, hidden] or [hidden] ({unusable[0]}); "
            "the run is damaged."
        )
    raise UnknownNameError(
        f"No sample has site {site!r}. Sites in this run: {', '.join(sorted(seen)) or 'none'}."
    )


def export_site(
    run: str | os.PathLike[str],
    site: str,
    out: str | os.PathLike[str],
    *,
    to: ExportFormat = "parquet",
    rows: Rows = "tokens",
    reduce: Reduce = "last",
    dtype: Literal["float32", "float16"] = "float32",
    group_rows: int = 8192,
    rows_per_file: int = 1_000_000,
) -> ExportResult:
    """Write one site of a run (or folder of files) in a layout training code reads directly.

    Args:
        run: A run directory or URL (either storage layout), or a folder of activation files.
        site: The site to export, e.g. ``layer_12`` or ``layer_3.mlp``.
        out: The output folder (created; must be empty or absent).
        to: ``parquet``, ``hf-dataset`` or ``npy``.
        rows: ``tokens`` (one row per token) or ``samples`` (one vector per sample).
        reduce: With ``rows="samples"``, which vector stands for a sample stored per token.
        dtype: Activation dtype of the export (bfloat16 runs are widened).
        group_rows: Rows buffered before they are written (Parquet row group size).
        rows_per_file: Parquet rows per file before the next part begins.

    Returns:
        Rows, samples and files written.

    Raises:
        UnknownNameError: No sample has the site.
        FormatError: ``out`` is a non-empty folder, or the run cannot be read.
        MissingDependencyError: ``pyarrow`` (parquet) or ``datasets`` (hf-dataset) is missing.
    """
    if to not in ("parquet", "hf-dataset", "npy"):
        raise UnknownNameError(f"Unknown export format {to!r}; use parquet, hf-dataset or npy.")
    if rows not in ("tokens", "samples"):
        raise UnknownNameError(f"Unknown row layout {rows!r}; use tokens or samples.")
    if to in ("parquet", "hf-dataset"):
        require("pyarrow", "export", f"Export to {to}")
    if to == "hf-dataset":
        require("datasets", "hf", "Export to a Hugging Face dataset")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FormatError(f"{target}: exists and is not an empty folder; choose another --out.")
    samples = list_samples(run)
    layout = _first_layout(samples, site)
    hidden = layout.hidden
    np_dtype = _NP_DTYPES[dtype]
    skipped = Skipped.of(samples)
    blocks = _blocks(samples, site, layout, rows, reduce, np_dtype, skipped)
    target.mkdir(parents=True, exist_ok=True)
    if to == "npy":
        result = _write_npy(blocks, np_dtype, hidden, target, skipped)
    elif to == "parquet":
        result = _write_parquet(blocks, hidden, dtype, target, skipped, group_rows, rows_per_file)
    else:
        result = _write_hf(blocks, hidden, dtype, target, skipped, group_rows)
    info = {
        "run": os.fspath(run),
        "site": site,
        "format": to,
        "rows": rows,
        "reduce": reduce if rows == "samples" else None,
        "dtype": dtype,
        "hidden": hidden,
        "n_rows": result.n_rows,
        "n_samples": result.n_samples,
        "skipped": skipped.files,
        "created": utc_now(),
    }
    atomic_write_bytes(target / "_export.json", json.dumps(info, indent=2).encode())
    return result


def _schema(hidden: int, dtype: str) -> Any:
    import pyarrow as pa

    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("sample_index", pa.int32()),
            ("position", pa.int32()),
            ("token_id", pa.int64()),
            ("correct", pa.bool_()),
            ("category", pa.string()),
            ("activation", pa.list_(value, hidden)),
        ]
    )


def _record_batch(buffer: list[_Block], schema: Any) -> Any:
    import pyarrow as pa

    n = [len(b.position) for b in buffer]
    acts = np.concatenate([b.activation for b in buffer])
    values = pa.array(acts.reshape(-1), type=schema.field("activation").type.value_type)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(
                [b.ref.id for b, k in zip(buffer, n, strict=True) for _ in range(k)], pa.string()
            ),
            pa.array(np.repeat([b.index for b in buffer], n).astype(np.int32)),
            pa.array(np.concatenate([b.position for b in buffer])),
            pa.array(np.concatenate([b.token_id for b in buffer])),
            pa.array(
                [b.ref.correct for b, k in zip(buffer, n, strict=True) for _ in range(k)],
                pa.bool_(),
            ),
            pa.array(
                [
                    str(b.ref.record.get("category", ""))
                    for b, k in zip(buffer, n, strict=True)
                    for _ in range(k)
                ],
                pa.string(),
            ),
            pa.FixedSizeListArray.from_arrays(values, acts.shape[1]),
        ],
        schema=schema,
    )


def _grouped(blocks: Iterator[_Block], group_rows: int) -> Iterator[list[_Block]]:
    """Blocks gathered into groups of about ``group_rows`` rows (a sample is never split)."""
    buffer: list[_Block] = []
    size = 0
    for block in blocks:
        buffer.append(block)
        size += len(block.position)
        if size >= group_rows:
            yield buffer
            buffer, size = [], 0
    if buffer:
        yield buffer


def _write_parquet(
    blocks: Iterator[_Block],
    hidden: int,
    dtype: str,
    target: Path,
    skipped: Skipped,
    group_rows: int,
    rows_per_file: int,
) -> ExportResult:
    """Stream rows into ``part-00000.parquet``, ... of ``rows_per_file`` rows each."""
    import pyarrow.parquet as pq

    schema = _schema(hidden, dtype)
    files: list[Path] = []
    writer: Any = None
    in_file = n_rows = n_samples = 0
    try:
        for group in _grouped(blocks, group_rows):
            if writer is None or in_file >= rows_per_file:
                if writer is not None:
                    writer.close()
                files.append(target / f"part-{len(files):05d}.parquet")
                writer = pq.ParquetWriter(files[-1], schema)
                in_file = 0
            batch = _record_batch(group, schema)
            writer.write_batch(batch, row_group_size=batch.num_rows)
            in_file += batch.num_rows
            n_rows += batch.num_rows
            n_samples += len(group)
    finally:
        if writer is not None:
            writer.close()
    return ExportResult(target, n_rows, n_samples, hidden, files, skipped)


def _write_hf(
    blocks: Iterator[_Block],
    hidden: int,
    dtype: str,
    target: Path,
    skipped: Skipped,
    group_rows: int,
) -> ExportResult:
    """Write a Hugging Face dataset without holding it in memory.

    Rows stream to Parquet in a scratch folder; ``datasets`` converts that to Arrow (in batches,
    memory-mapped) and saves it with ``save_to_disk``; the scratch folder is then removed.
    """
    import datasets

    scratch = Path(tempfile.mkdtemp(prefix=".hf-scratch-", dir=target))
    try:
        parts = _write_parquet(
            blocks, hidden, dtype, scratch, skipped, group_rows, rows_per_file=1 << 62
        )
        if parts.files:
            ds = datasets.Dataset.from_parquet(
                [str(f) for f in parts.files],
                cache_dir=str(scratch / "cache"),
                keep_in_memory=False,
            )
        else:
            ds = datasets.Dataset.from_dict({}, features=None)
        ds.save_to_disk(str(target))
        del ds
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(target, parts.n_rows, parts.n_samples, hidden, [target], skipped)


def _npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header of an array; the same length whatever ``shape[0]`` (numpy pads it)."""
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def _write_npy(
    blocks: Iterator[_Block], dtype: Any, hidden: int, target: Path, skipped: Skipped
) -> ExportResult:
    """Append each sample's rows to the arrays, then write the row count into their headers.

    Plain sequential writes, not a memory map: the dirty pages of a map count against the
    process and would grow with the run (measured: +153 MB for 180 MB more data). Each header is
    written first for no rows and rewritten in place at the end (numpy leaves room for the row
    count to grow), so the arrays hold exactly the rows written, which ``samples.jsonl`` and
    ``_export.json`` describe.
    """
    names = ("activations", "sample_index", "position", "token_id")
    dtypes = (np.dtype(dtype), np.dtype(np.int32), np.dtype(np.int32), np.dtype(np.int64))
    widths: tuple[tuple[int, ...], ...] = ((hidden,), (), (), ())
    streams = [open(target / f"{n}.npy", "wb") for n in names]  # noqa: SIM115 - closed below
    row = n_samples = 0
    try:
        for stream, dt, width in zip(streams, dtypes, widths, strict=True):
            stream.write(_npy_header(dt, (0, *width)))
        with open(target / "samples.jsonl", "w") as meta:
            for block in blocks:
                k = len(block.position)
                parts = (block.activation, np.full(k, n_samples), block.position, block.token_id)
                for stream, dt, part in zip(streams, dtypes, parts, strict=True):
                    stream.write(np.ascontiguousarray(part, dtype=dt).tobytes())
                meta.write(
                    json.dumps(
                        {
                            "sample_index": n_samples,
                            "id": block.ref.id,
                            "correct": block.ref.correct,
                            "category": block.ref.record.get("category"),
                            "rows": [row, row + k],
                        }
                    )
                    + "\n"
                )
                row += k
                n_samples += 1
        for stream, dt, width in zip(streams, dtypes, widths, strict=True):
            header = _npy_header(dt, (row, *width))
            if len(header) != len(_npy_header(dt, (0, *width))):
                raise FormatError(f"{target}: {row} rows do not fit the .npy header; export less.")
            stream.seek(0)
            stream.write(header)
    finally:
        for stream in streams:
            stream.close()
    files = [
        target / n
        for n in (
            "activations.npy",
            "sample_index.npy",
            "position.npy",
            "token_id.npy",
            "samples.jsonl",
        )
    ]
    return ExportResult(target, row, n_samples, hidden, files, skipped)
