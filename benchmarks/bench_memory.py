"""Peak memory of an evaluation with capture: 1,000 questions against 100 must be the same."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks.common import MMLU_FILE, Figures

CHILD = r"""
import json, resource, sys, tempfile, threading, time
import torch
from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.bench.questions import Benchmark, Question
from actcap.capture import CaptureSpec
from actcap.models import load_model
n, path, device, out, cycle = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
torch.set_num_threads(2)
# The same questions repeated: both runs see the same prompt lengths, only the count differs.
base = load_benchmark("mmlu:" + path).questions[:cycle]
qs = [Question(f"{q.id}-r{i // len(base)}", q.question, q.answer, q.choices, q.category) for i, q in enumerate(base * (n // len(base) + 1))][:n]
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
lm = load_model("default", device=device)
run_benchmark(lm, Benchmark("warm", qs[:16]), capture=None, options=EvalOptions(mode="loglik", batch_size=16), progress=False)
after_load = rss_mb()
peak, done = [after_load], threading.Event()
def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], rss_mb())
threading.Thread(target=sample, daemon=True).start()
r = run_benchmark(lm, Benchmark("mem", qs), capture=CaptureSpec(layers=None, token_selection="last"),
                  options=EvalOptions(mode="loglik", batch_size=16), out=out, progress=False)
done.set()
print(json.dumps({"n": n, "rss_after_load_mb": after_load, "peak_rss_eval_mb": max(peak[0], rss_mb()),
                  "qps": r.answered / r.wall_seconds}))
"""


def main(lm: Any, args: Any, figures: Figures) -> None:
    small, large = (16, 48) if args.quick else (100, 1000)
    print(f"\n## peak memory, evaluation with capture of every layer, {small} vs {large} questions")
    peaks = {}
    for n in (small, large):
        with tempfile.TemporaryDirectory(dir=args.tmp) as out:
            r = subprocess.run(
                [sys.executable, "-c", CHILD, str(n), str(MMLU_FILE), args.device, out, str(small)],
                capture_output=True,
                text=True,
                check=True,
            )
        row = json.loads(r.stdout.strip().splitlines()[-1])
        peaks[n] = row["peak_rss_eval_mb"]
        print(
            f"{n:>5} questions: RSS after load {row['rss_after_load_mb']:8.1f} MB, peak during the evaluation {row['peak_rss_eval_mb']:8.1f} MB, {row['qps']:.2f} q/s"
        )
        figures.add("memory", f"{n} questions", **row)
    print(f"growth: {peaks[large] / peaks[small] - 1:+.1%}")
