"""ActivationDataset's throughput against the raw read speed of the same files, in one process.

    python -m benchmarks.bench_dataset --run /tmp/ds_run --sites layer_12 [--rounds 5]

The raw read opens each sample with safetensors and reads the same tensors the dataset delivers:
``safe_open(path, framework="numpy").get_tensor(site)`` for a file per sample (an array of its
own: one copy out of the file; ``framework="pt"`` would hand out a copy-on-write map of the file,
which reads nothing until used), ``safetensors.numpy.load`` of the sample's bytes for a shard.
The dataset is timed as a training loop reads it: rows of tokens through a ``DataLoader`` (``batch_size`` rows collated per batch), ready batches
(``ActivationDataset(batch_size=...)`` with ``DataLoader(batch_size=None)``), and one row per
sample. Each round times every reader once, in turn (interleaved), after a warm-up pass that
puts the files in the page cache; the best round of each is reported, with the ratio of its
MB/s to the raw read's (the target is at least 80%). Ready batches are timed twice: as every pass
after the first reads them (the memory of the last batches, kept by the dataset, filled again)
and as a first pass does (new memory for its first batches).
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import safe_open
from torch.utils.data import DataLoader

from actcap.data import ActivationDataset
from actcap.data.blocks import BatchMemory
from actcap.storage.format import ShardSlice


def read_raw(
    path: Path | ShardSlice, sites: list[str], with_key: bool = False
) -> tuple[dict[str, np.ndarray], str | None]:
    """One sample's ``sites`` with safetensors alone (a file, or its bytes in a shard), and with
    ``with_key`` the shared prefix its metadata names (None when it names none)."""
    if isinstance(path, ShardSlice):
        with open(path.shard, "rb") as f:
            f.seek(path.offset)
            raw = f.read(path.length)
        tensors = safetensors.numpy.load(raw)
        key = None
        if with_key:
            size = struct.unpack_from("<Q", raw)[0]
            key = (json.loads(raw[8 : 8 + size]).get("__metadata__") or {}).get("prefix")
        return {s: tensors[s] for s in sites}, key
    with safe_open(str(Path(path)), framework="numpy") as f:
        got = {s: f.get_tensor(s) for s in sites}
        return got, (f.metadata() or {}).get("prefix") if with_key else None


def counted(got: dict[str, np.ndarray]) -> tuple[int, int]:
    """Rows and bytes of one sample's arrays (a ``[hidden]`` vector is one row)."""
    first = next(iter(got.values()))
    return (first.shape[0] if first.ndim > 1 else 1), sum(a.nbytes for a in got.values())


def raw_reader(ds: ActivationDataset) -> Callable[[], tuple[int, int]]:
    """Read the sites of every sample with safetensors alone: (rows, bytes)."""
    samples = [path for _, _, path in ds.samples]

    def run() -> tuple[int, int]:
        rows = nbytes = 0
        for path in samples:
            n, b = counted(read_raw(path, ds.sites)[0])
            rows, nbytes = rows + n, nbytes + b
        return rows, nbytes

    return run


def joined_reader(ds: ActivationDataset) -> Callable[[], tuple[int, int]]:
    """Read every sample whole with safetensors alone, as docs/format.md section 3 does: a
    sample's file (or its bytes in a shard), and for a sample on a shared prefix its
    ``prefixes/`` file, rows joined."""
    samples = [path for _, _, path in ds.samples]
    prefixes = Path(ds.run) / "prefixes"

    def run() -> tuple[int, int]:
        rows = nbytes = 0
        for path in samples:
            got, key = read_raw(path, ds.sites, with_key=True)
            if key:
                with safe_open(str(prefixes / f"{key}.safetensors"), framework="numpy") as f:
                    got = {s: np.concatenate([f.get_tensor(s), a]) for s, a in got.items()}
            n, b = counted(got)
            rows, nbytes = rows + n, nbytes + b
        return rows, nbytes

    return run


def loader_reader(loader: DataLoader, per_row: int) -> Callable[[], tuple[int, int]]:
    """Iterate a DataLoader of the dataset: (rows, bytes of x delivered)."""

    def run() -> tuple[int, int]:
        rows = 0
        for batch in loader:
            x = batch["x"]
            first = next(iter(x.values())) if isinstance(x, dict) else x
            rows += first.shape[0]
        return rows, rows * per_row

    return run


def cold_reader(ds: ActivationDataset, per_row: int) -> Callable[[], tuple[int, int]]:
    """Ready batches as a first pass reads them: no batch memory kept from an earlier pass."""
    loader = loader_reader(DataLoader(ds, batch_size=None), per_row)

    def run() -> tuple[int, int]:
        ds._memory = BatchMemory()
        return loader()

    return run


def samples_reader(ds: ActivationDataset) -> Callable[[], tuple[int, int]]:
    """One row per sample, as a probe reads them: (samples, bytes of x delivered)."""

    def run() -> tuple[int, int]:
        rows = nbytes = 0
        for row in ds:
            x = row["x"]
            for t in x.values() if isinstance(x, dict) else [x]:
                nbytes += t.numel() * t.element_size()
            rows += 1
        return rows, nbytes

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run directory (files or shards)")
    p.add_argument("--sites", default="layer_12", help="comma-separated sites, or all")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per batch")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also time ready batches through a DataLoader with this many worker processes",
    )
    args = p.parse_args()
    sites = None if args.sites == "all" else args.sites.split(",")
    tokens = ActivationDataset(args.run, sites=sites)
    sites = tokens.sites
    hidden = sum(next(iter(ActivationDataset(args.run, sites=[s])))["x"].numel() for s in sites)
    per_row = hidden * 4  # float32
    batched = ActivationDataset(args.run, sites=sites, batch_size=args.batch_size)
    prefixed = any(e.get("prefix") for _, e, _ in tokens.samples)
    readers = {
        "raw safetensors": raw_reader(tokens),
        **({"raw, prefix joined": joined_reader(tokens)} if prefixed else {}),
        "dataset, rows collated": loader_reader(DataLoader(tokens, args.batch_size), per_row),
        "dataset, batch_size=": loader_reader(DataLoader(batched, batch_size=None), per_row),
        "batch_size=, first pass": cold_reader(
            ActivationDataset(args.run, sites=sites, batch_size=args.batch_size), per_row
        ),
        "dataset, rows=samples": samples_reader(
            ActivationDataset(args.run, sites=sites, rows="samples")
        ),
    }
    if args.workers:
        readers[f"dataset, batches, {args.workers} workers"] = loader_reader(
            DataLoader(batched, batch_size=None, num_workers=args.workers), per_row
        )
    for read in readers.values():
        read()  # warm-up: the page cache, torch's first calls
    best: dict[str, tuple[float, int, int]] = {}
    for _ in range(args.rounds):
        for name, read in readers.items():
            start = time.perf_counter()
            rows, nbytes = read()
            took = time.perf_counter() - start
            if name not in best or took < best[name][0]:
                best[name] = (took, rows, nbytes)
    print(
        f"{args.run}: {len(tokens.samples)} samples, sites {', '.join(sites)}, best of {args.rounds}"
        + (
            " (a shared prefix: 'raw safetensors' reads each sample's own rows only; compare "
            "with 'of raw joined', which reads every row the dataset delivers)"
            if prefixed
            else ""
        )
    )
    raw_mbs = best["raw safetensors"][2] / best["raw safetensors"][0] / 1e6
    joined = best.get("raw, prefix joined")
    joined_mbs = joined[2] / joined[0] / 1e6 if joined else None
    for name, (took, rows, nbytes) in best.items():
        mbs = nbytes / took / 1e6
        print(
            f"  {name:24} {rows:>8,} rows {took * 1e3:8.1f} ms {rows / took:>12,.0f} rows/s "
            f"{mbs:8.0f} MB/s  {mbs / raw_mbs:6.0%} of raw"
            + (f"  {mbs / joined_mbs:6.0%} of raw joined" if joined_mbs else "")
        )


if __name__ == "__main__":
    main()
