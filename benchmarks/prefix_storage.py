"""Shared prefixes stored once: bytes on disk and write time, before and after, same samples.

A 5-shot MMLU subject is answered once with every token of every site captured; the same
finished samples are then written into fresh runs with the prefix shared (one file per run) and
without (every sample whole), the two interleaved over several rounds, in one process. Reading
back is timed too (``load_activations`` of every sample, which joins the prefix rows).

    python -m benchmarks.prefix_storage --model default --limit 40 --few-shot 5
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from actcap.bench import EvalOptions, load_benchmark, runner
from actcap.bench.prefixes import shared_prefixes
from actcap.capture import CaptureSpec
from actcap.models import load_model
from actcap.storage import FinishedSample, RunWriter, load_activations, open_run
from benchmarks.common import MMLU_FILE


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _write(samples: list[FinishedSample], out: Path, storage: str) -> float:
    t0 = time.perf_counter()
    with RunWriter.open(out, {"model": "bench"}, storage=storage) as w:  # type: ignore[arg-type]
        for s in samples:
            w.write(s)
        w.flush()
    return time.perf_counter() - t0


def _read(out: Path) -> float:
    t0 = time.perf_counter()
    total = 0.0
    for _, source in open_run(out).sample_paths():
        for t in load_activations(source)["activations"].values():
            total += float(t.sum())  # touch every value (a whole file is memory-mapped lazily)
    return time.perf_counter() - t0


def main() -> None:
    """Answer once, then write and read the samples both ways, interleaved."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--few-shot", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--storage", default="files", choices=["files", "shards"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    lm = load_model(args.model, device="cpu")
    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(args.limit)
    options = EvalOptions(few_shot=args.few_shot, batch_size=8)
    capture = CaptureSpec(token_selection="all", dtype=args.dtype)
    sites = runner.run_sites(lm, capture)
    plan = runner.plan_questions(lm, bench, bench.questions, options)
    prefixes = shared_prefixes(lm, plan, bench, options)
    samples: list[FinishedSample] = []
    for batch in runner.plan_batches(plan, options.batch_size):
        for q, a, record in runner.answer_batch(lm, bench, batch, capture, sites, options):
            samples.append(
                runner.finished_sample(
                    lm.display_name, bench, q, a, record, capture, prefixes.get(q.id, ())
                )
            )
    whole = [dataclasses.replace(s, shared_prefix=()) for s in samples]
    tokens = [int(s.input_ids.numel()) for s in samples if s.input_ids is not None]
    shared_n = len(next(iter(prefixes.values()), ()))
    print(
        f"{len(samples)} samples, {len(sites)} sites, {args.dtype}, prompts "
        f"{min(tokens)}-{max(tokens)} tokens (mean {statistics.mean(tokens):.0f}), "
        f"shared prefix {shared_n} tokens"
    )
    times: dict[str, list[float]] = {"whole": [], "shared": []}
    reads: dict[str, list[float]] = {"whole": [], "shared": []}
    sizes: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix="actcap-prefix-bench-"))
    try:
        for r in range(args.rounds):
            order = [("whole", whole), ("shared", samples)]
            if r % 2:
                order.reverse()
            for name, items in order:
                out = tmp / f"{name}-{r}"
                times[name].append(_write(items, out, args.storage))
                reads[name].append(_read(out))
                sizes[name] = _size(out)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'':8} {'bytes on disk':>14} {'write s (median)':>17} {'read s (median)':>16}")
    for name in ("whole", "shared"):
        print(
            f"{name:8} {sizes[name] / 1e6:11.1f} MB {statistics.median(times[name]):17.3f} "
            f"{statistics.median(reads[name]):16.3f}"
        )
    print(
        f"shared/whole: bytes {sizes['shared'] / sizes['whole']:.3f}, write time "
        f"{statistics.median(times['shared']) / statistics.median(times['whole']):.3f}, read time "
        f"{statistics.median(reads['shared']) / statistics.median(reads['whole']):.3f}"
    )


if __name__ == "__main__":
    main()
