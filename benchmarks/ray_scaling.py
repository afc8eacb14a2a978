"""Ray scale-out: the same questions answered by one Ray worker and by two, interleaved.

One local Ray cluster serves every round; each variant is a fresh run directory, so each time
includes what a user waits for: the actors starting and loading the model, answering, writing
and the merge. Also the single-process runner with one torch thread per worker, for reference.
Prints questions per second and ratios against one worker.

    python -m benchmarks.ray_scaling [--n 96] [--rounds 2] [--mode loglik] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.bench.distributed import RayOptions, run_benchmark_ray
from actcap.capture import CaptureSpec
from actcap.models import load_model
from benchmarks.common import MMLU_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--benchmark", default=f"mmlu:{MMLU_FILE}")
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--few-shot", type=int, default=0)
    parser.add_argument("--mode", default="loglik", choices=["loglik", "generate"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    bench = load_benchmark(args.benchmark).limited(args.n)
    capture = CaptureSpec(layers=None, token_selection="last")
    options = EvalOptions(
        batch_size=args.batch_size,
        few_shot=args.few_shot,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
    )
    lm = load_model(args.model, device="cpu")
    scratch = Path(tempfile.mkdtemp(prefix="actcap-ray-bench-"))

    def single(out: Path) -> tuple[float, float]:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        run_benchmark(lm, bench, capture=capture, options=options, out=out, progress=False)
        seconds = time.perf_counter() - t0
        return seconds, seconds  # the model is loaded before the clock starts

    def on_ray(workers: int):
        def go(out: Path) -> tuple[float, float]:
            t0 = time.perf_counter()
            run_benchmark_ray(
                args.model,
                bench,
                out,
                capture=capture,
                options=options,
                ray_options=RayOptions(workers=workers, load_kwargs={"device": "cpu"}),
                progress=False,
            )
            end = time.time()
            seconds = time.perf_counter() - t0
            # Each actor records when its model was loaded: answering starts at the first one.
            ready = min(
                json.loads(p.read_text())["started"] for p in (out / "workers").glob("*.json")
            )
            return seconds, end - ready

        return go

    variants = {
        "ray, 1 worker": on_ray(1),
        "ray, 2 workers": on_ray(2),
        "one process, 1 thread": single,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    answering: dict[str, list[float]] = {k: [] for k in variants}
    run = 0
    n = len(bench.questions)
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            run += 1
            seconds, steady = variants[name](scratch / f"run{run}")
            times[name].append(seconds)
            answering[name].append(steady)
            print(
                f"round {r + 1} {name:<24} {seconds:6.1f} s {n / seconds:5.2f} q/s"
                f" (after the models loaded: {steady:5.1f} s, {n / steady:5.2f} q/s)"
            )
    base = statistics.median(times["ray, 1 worker"])
    base_steady = statistics.median(answering["ray, 1 worker"])
    rows = []
    print(
        f"\n{n} questions, {args.mode}, batch {args.batch_size}, {args.few_shot}-shot, "
        f"capture of every layer's last token, {os.cpu_count()} CPU cores"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        steady = statistics.median(answering[name])
        rows.append(
            {
                "variant": name,
                "seconds": round(med, 2),
                "q_per_s": round(n / med, 3),
                "vs_1_worker": round(base / med, 3),
                "answering_seconds": round(steady, 2),
                "answering_q_per_s": round(n / steady, 3),
                "answering_vs_1_worker": round(base_steady / steady, 3),
            }
        )
        print(
            f"{name:<24} end to end {med:6.1f} s {n / med:5.2f} q/s {base / med:5.2f}x | "
            f"after loading {steady:6.1f} s {n / steady:5.2f} q/s {base_steady / steady:5.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
