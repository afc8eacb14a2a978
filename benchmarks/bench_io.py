"""The writer's sustained bandwidth against the raw disk, and lazy loading of one site."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from actcap.storage import RunWriter, SampleMeta, load_activations, save_activations
from benchmarks.common import Figures


def writer(args: Any, figures: Figures) -> None:
    n_files = 4 if args.quick else 24
    per_file = torch.randn(
        31, 128, 576
    )  # a 128-token sample, every layer of a 576-wide model (~9 MB)
    acts = {f"layer_{i}": per_file[i] for i in range(per_file.shape[0])}
    size = per_file.numel() * 4
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        dd = Path(tmp) / "dd.bin"
        t0 = time.perf_counter()
        subprocess.run(
            [
                "dd",
                "if=/dev/zero",
                f"of={dd}",
                "bs=1M",
                f"count={n_files * size // (1 << 20)}",
                "oflag=direct",
                "conv=fsync",
            ],
            check=True,
            capture_output=True,
        )
        raw = n_files * size / (time.perf_counter() - t0) / 1e6
        dd.unlink()
        t0 = time.perf_counter()
        for i in range(n_files):
            save_activations(Path(tmp) / f"s{i}.safetensors", acts, SampleMeta("p"))
        ours = n_files * size / (time.perf_counter() - t0) / 1e6
        # The same samples through a run directory, one file each and into a shard.
        rates = {}
        for layout in ("files", "shards"):
            with RunWriter.open(Path(tmp) / layout, {"model": "m"}, storage=layout) as run:
                t0 = time.perf_counter()
                for i in range(n_files):
                    run.write_sample(f"s{i}", {}, acts, SampleMeta("p"))
                rates[layout] = n_files * size / (time.perf_counter() - t0) / 1e6
    print(f"\n## writer: {n_files} samples of {size / 1e6:.1f} MB, fsync each")
    print(f"raw disk (dd oflag=direct, fsync) {raw:8.1f} MB/s")
    print(f"actcap save_activations           {ours:8.1f} MB/s  ({ours / raw:.0%} of raw)")
    print(
        f"run directory, a file per sample  {rates['files']:8.1f} MB/s  ({rates['files'] / raw:.0%} of raw)"
    )
    print(
        f"run directory, shards             {rates['shards']:8.1f} MB/s  ({rates['shards'] / raw:.0%} of raw)"
    )
    figures.add("writer", "dd oflag=direct", mb_s=raw)
    figures.add("writer", "actcap save_activations", mb_s=ours, fraction_of_raw=ours / raw)
    for layout, rate in rates.items():
        figures.add("writer", f"run directory ({layout})", mb_s=rate, fraction_of_raw=rate / raw)


def loading(args: Any, figures: Figures) -> None:
    target = (16 << 20) if args.quick else (1 << 30)
    sites = 31
    tokens = target // (sites * 576 * 4)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "big.safetensors"
        save_activations(
            path, {f"layer_{i}": torch.randn(tokens, 576) for i in range(sites)}, SampleMeta("p")
        )
        size = os.path.getsize(path)
        os.sync()
        t0 = time.perf_counter()
        one = load_activations(path, sites=["layer_15"])["activations"]["layer_15"]
        float(one.sum())  # touch every byte of it
        lazy = time.perf_counter() - t0
        t0 = time.perf_counter()
        everything = load_activations(path)["activations"]
        float(sum(t.sum() for t in everything.values()))
        whole = time.perf_counter() - t0
    print(f"\n## loading a {size / 1e9:.2f} GB file ({sites} sites of {tokens} x 576)")
    print(f"one site, lazy   {lazy * 1000:8.1f} ms")
    print(f"whole file       {whole * 1000:8.1f} ms  ({whole / lazy:.0f}x)")
    figures.add("loading", "one site lazily", seconds=lazy, file_bytes=size)
    figures.add("loading", "whole file", seconds=whole, file_bytes=size)
