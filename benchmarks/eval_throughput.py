"""Evaluation throughput: the same MMLU questions answered one at a time and in batches.

With capture on (every layer, last token), in log-likelihood and in generation mode, on the
built-in model, 5-shot by default (the usual MMLU setting). Variants run interleaved in the same
process; prints questions per second and ratios. Log-likelihood also has the loop a hand-written
script runs: one question at a time, full logits and ``output_hidden_states``, ``torch.save`` per
question.

    python -m benchmarks.eval_throughput [--n 64] [--batch-size 16] [--few-shot 5] [--rounds 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec
from actcap.models import load_model
from benchmarks.bench_eval import naive_loop
from benchmarks.common import MMLU_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--benchmark", default=f"mmlu:{MMLU_FILE}")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--few-shot", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device)
    bench = load_benchmark(args.benchmark).limited(args.n)
    capture = CaptureSpec(layers=None, token_selection="last")
    variants = {
        (mode, bs): EvalOptions(
            mode=mode,
            batch_size=bs,
            few_shot=args.few_shot,
            max_new_tokens=args.max_new_tokens,
            sort_by_length=bs > 1,
        )
        for mode in ("loglik", "generate")
        for bs in (1, args.batch_size)
    }
    # warm-up
    run_benchmark(
        lm,
        bench.limited(2),
        capture=capture,
        options=EvalOptions(batch_size=2, max_new_tokens=2),
        progress=False,
    )
    qps: dict[tuple[str, int], list[float]] = {k: [] for k in variants}
    qps[("naive", 1)] = []
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = [*variants, ("naive", 1)]
            rng.shuffle(order)
            for key in order:
                out = Path(tmp) / f"{key[0]}-{key[1]}-{r}"
                t0 = time.perf_counter()
                if key[0] == "naive":
                    acc = naive_loop(lm, bench, args.few_shot, out)
                    qps[key].append(len(bench.questions) / (time.perf_counter() - t0))
                    print(
                        f"  round {r}: naive    batch   1: {qps[key][-1]:.2f} q/s, accuracy {acc:.3f}",
                        flush=True,
                    )
                    continue
                result = run_benchmark(
                    lm, bench, capture=capture, options=variants[key], out=out, progress=False
                )
                qps[key].append(len(bench.questions) / (time.perf_counter() - t0))
                print(
                    f"  round {r}: {key[0]:<8} batch {key[1]:>3}: {qps[key][-1]:.2f} q/s, accuracy {result.accuracy:.3f}",
                    flush=True,
                )
    print(
        f"{len(bench.questions)} questions, model {lm.display_name}, capture every layer (last token), {args.few_shot}-shot"
    )
    print(f"{'mode':<9} {'one at a time':>14} {'batched':>10} {'ratio':>7}")
    for mode in ("loglik", "generate"):
        one = statistics.median(qps[(mode, 1)])
        many = statistics.median(qps[(mode, args.batch_size)])
        print(f"{mode:<9} {one:>10.2f} q/s {many:>6.2f} q/s {many / one:>6.2f}x")
    naive = statistics.median(qps[("naive", 1)])
    many = statistics.median(qps[("loglik", args.batch_size)])
    print(
        f"loglik, hand-written loop {naive:.2f} q/s; actcap batched {many:.2f} q/s: {many / naive:.2f}x"
    )


if __name__ == "__main__":
    main()
