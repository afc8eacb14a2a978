"""The benchmark suite: one command, every comparison, figures printed and saved as JSON.

    python -m benchmarks.run_all [--device cpu|cuda] [--quick] [--only prefill,generate,...]

Sections: prefill (plain forward, output_hidden_states, actcap, nnsight, TransformerLens at batch 1
and 8), generate (per-step capture against plain generate), eval (hand-written loop, actcap with
and without capture, lm-evaluation-harness), optimisations (each on and off), writer (MB/s against
dd), memory (1,000 questions against 100), loading (one site of a 1 GB file). See
docs/performance.md for the figures measured.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from actcap.models import load_model
from benchmarks import (
    bench_eval,
    bench_generate,
    bench_io,
    bench_memory,
    bench_optimizations,
    bench_prefill,
)
from benchmarks.common import Figures

SECTIONS = {
    "prefill": bench_prefill.main,
    "generate": bench_generate.main,
    "eval": bench_eval.main,
    "optimisations": bench_optimizations.main,
    "writer": lambda lm, args, fig: bench_io.writer(args, fig),
    "loading": lambda lm, args, fig: bench_io.loading(args, fig),
    "memory": bench_memory.main,
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--rounds", type=int, default=9, help="Interleaved rounds for the timed comparisons."
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--few-shot", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run (CI runs it).")
    p.add_argument("--only", default=None, help="Comma-separated sections: " + ", ".join(SECTIONS))
    p.add_argument("--tmp", default=None, help="Folder for temporary files (the disk measured).")
    p.add_argument(
        "--json", default="benchmarks/results/latest.json", help="Where to save the figures."
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Figures:
    args = parse(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    torch.set_num_threads(args.threads)
    args.tmp = args.tmp or tempfile.gettempdir()
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [c for c in chosen if c not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    lm = load_model(args.model, device=args.device)
    print(
        f"# actcap benchmark suite: {lm.display_name} on {args.device}, torch {torch.__version__}, "
        f"{args.threads} threads, {platform.machine()}, {'quick' if args.quick else 'full'}"
    )
    figures = Figures()
    for name in chosen:
        t0 = time.perf_counter()
        SECTIONS[name](lm, args, figures)
        print(f"  [{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    if args.json:
        figures.save(Path(args.json))
    return figures


if __name__ == "__main__":
    main()
