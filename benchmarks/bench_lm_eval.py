"""lm-evaluation-harness tasks: actcap's model with capture against lm-eval's `hf` without.

    python -m benchmarks.bench_lm_eval [--device cpu|cuda] [--batch-size 16] [--rounds 3]
        [--tasks letters,texts,gsm8k] [--limit-letters 64 ...] [--json FILE] [--quick]

Every run goes through `lm_eval.simple_evaluate` on the local tasks of benchmarks/lm_eval_tasks/
(MMLU high-school geography by letters, 5-shot; the same questions by choice texts, 0-shot;
GSM8K, 0-shot greedy generation of up to 64 tokens), read from the files in data/. Variants, at
the same batch size, interleaved in shuffled rounds after a warm-up on two documents:

- lm-eval's `hf` model, no capture (the baseline);
- ActcapLM capturing every layer (embeddings + all blocks, last token of the context), writing
  each document to a run directory and the metrics at the end;
- ActcapLM without capture (no run directory).

Printed per task: median wall seconds and questions per second, and the same in CPU seconds
of this process (`time.process_time`, all its threads; what the work costs, whatever else runs on
the machine), each with the median over rounds of the speed relative to `hf` in the same round
(>1: faster than `hf`); the per-document answers of every variant are checked equal. On a
machine shared with other work, run with `--threads 1`: every torch operation waits for its
threads to be scheduled, so wall time then counts operations more than arithmetic. lm-eval's description of the machine after each evaluation
(`add_env_info`, ~1 s of subprocesses) is switched off for every variant alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "benchmarks" / "lm_eval_tasks"
TASK_NAMES = {
    "letters": ("actcap_mmlu_geography", 5),
    "texts": ("actcap_mmlu_geography_texts", 0),
    "gsm8k": ("actcap_gsm8k_zero_shot", 0),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", default="letters,texts,gsm8k")
    p.add_argument("--limit-letters", type=int, default=32)
    p.add_argument("--limit-texts", type=int, default=32)
    p.add_argument("--limit-gsm8k", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="Tiny sizes, one round: a smoke run.")
    p.add_argument("--json", default="benchmarks/results/lm_eval-latest.json")
    return p.parse_args(argv)


def evaluate(model: Any, manager: Any, task: str, shots: int, limit: int) -> dict[str, Any]:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model,
        tasks=[task],
        num_fewshot=shots,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=True,
    )


def per_doc_accuracy(results: dict[str, Any], task: str) -> list[float]:
    """Each document's main metric under the task's first filter."""
    samples = results["samples"][task]
    first = samples[0]["filter"]
    return [s["acc"] if "acc" in s else s["exact_match"] for s in samples if s["filter"] == first]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.quick:
        args.rounds, args.limit_letters, args.limit_texts, args.limit_gsm8k = 1, 8, 8, 2
    torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the task YAMLs name their data files relative to the repository
    import lm_eval.evaluator as evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from actcap.lm_eval import ActcapLM
    from actcap.models import load_model

    evaluator.add_env_info = lambda _results: None
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    lm = load_model(args.model, device=args.device)
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    hf = HFLM(pretrained=lm.source, dtype=dtype, batch_size=args.batch_size, device=args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-eval-"))
    print(
        f"# lm-eval tasks: {lm.display_name} on {args.device}, {args.threads} threads, "
        f"batch {args.batch_size}, torch {torch.__version__}, {platform.machine()}"
    )
    figures: list[dict[str, Any]] = []
    try:
        for key in args.tasks.split(","):
            task, shots = TASK_NAMES[key]
            limit = getattr(args, f"limit_{key}")

            def captured(task: str, shots: int, limit: int) -> Any:
                out = tmp / f"run-{time.time_ns()}"
                model = ActcapLM(
                    lm,
                    capture_dir=out,
                    token_selection="last",
                    batch_size=args.batch_size,
                    progress=False,
                )
                try:
                    return evaluate(model, manager, task, shots, limit)
                finally:
                    shutil.rmtree(out, ignore_errors=True)

            def plain(task: str, shots: int, limit: int) -> Any:
                model = ActcapLM(lm, batch_size=args.batch_size, progress=False)
                return evaluate(model, manager, task, shots, limit)

            runs: dict[str, Callable[[str, int, int], Any]] = {
                "lm-eval hf, no capture": lambda t, s, n: evaluate(hf, manager, t, s, n),
                "actcap, capture every layer (last token)": captured,
                "actcap, no capture": plain,
            }
            variants = {k: functools.partial(f, task, shots, limit) for k, f in runs.items()}
            warmups = {k: functools.partial(f, task, shots, 2) for k, f in runs.items()}
            figures += run_task(key, task, shots, limit, variants, warmups, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2))
    print(f"\nfigures saved to {args.json}")
    return figures


def run_task(
    key: str,
    task: str,
    shots: int,
    limit: int,
    variants: dict[str, Callable[[], Any]],
    warmups: dict[str, Callable[[], Any]],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Warm up on two documents, then time every variant in shuffled rounds (speed vs `hf`)."""
    baseline = "lm-eval hf, no capture"
    for fn in warmups.values():
        fn()
    accuracy: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    speed: dict[str, list[float]] = {k: [] for k in variants}
    cpu_speed: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)
        wall, used = {}, {}
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            results = variants[name]()
            wall[name], used[name] = time.perf_counter() - t0, time.process_time() - c0
            accuracy.setdefault(name, per_doc_accuracy(results, task))
        for name in variants:
            times[name].append(wall[name])
            cpu[name].append(used[name])
            speed[name].append(wall[baseline] / wall[name])
            cpu_speed[name].append(used[baseline] / used[name])
    same = all(a == accuracy[baseline] for a in accuracy.values())
    print(
        f"\n## {task} ({key}): {limit} documents, {shots}-shot, {args.rounds} rounds; "
        f"per-document answers of all variants equal: {same}"
    )
    print(
        f"{'variant':<44} {'wall s':>8} {'q/s':>7} {'vs hf':>7} {'CPU s':>8} {'q/CPU-s':>8} "
        f"{'vs hf':>7}  accuracy"
    )
    rows = []
    for name in variants:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        ratio, cpu_ratio = statistics.median(speed[name]), statistics.median(cpu_speed[name])
        acc = sum(accuracy[name]) / len(accuracy[name])
        print(
            f"{name:<44} {med:>8.2f} {limit / med:>7.2f} {ratio:>6.2f}x {med_cpu:>8.2f} "
            f"{limit / med_cpu:>8.2f} {cpu_ratio:>6.2f}x  {acc:.3f}"
        )
        rows.append(
            {
                "task": task,
                "variant": name,
                "documents": limit,
                "few_shot": shots,
                "batch_size": args.batch_size,
                "device": args.device,
                "threads": args.threads,
                "median_s": med,
                "min_s": min(times[name]),
                "max_s": max(times[name]),
                "qps": limit / med,
                "speed_vs_hf": ratio,
                "cpu_s": med_cpu,
                "q_per_cpu_s": limit / med_cpu,
                "cpu_speed_vs_hf": cpu_ratio,
                "accuracy": acc,
                "answers_equal_hf": accuracy[name] == accuracy[baseline],
            }
        )
    return rows


if __name__ == "__main__":
    main()
