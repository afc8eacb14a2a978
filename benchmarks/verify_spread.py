"""The spread of batched against single-prompt activations, which sets verification's tolerance.

Runs the model batched (left padding, and the shared-prefix KV cache for few-shot
log-likelihood), stores every sample, then re-checks every sample alone with ``verify_run`` and
prints, per compute dtype and run, the largest per-token relative difference over all sites and
samples, its median over samples, and the largest log-probability difference of the answers.
A second part times a typical run with the default ``--verify`` against the same run without.

    python -m benchmarks.verify_spread [--model default] [--device cpu] [--dtypes float32,bfloat16]

docs/verification.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.bench.verify import verify_run
from actcap.capture import CaptureSpec
from actcap.models import load_model
from benchmarks.common import DATA, MMLU_FILE

GSM8K = DATA / "gsm8k" / "test.jsonl"
SITES = ["embeddings", "0,7,15,22", "-1", "final_norm"]


def spread(
    lm: Any, out: Path, bench: Any, capture: CaptureSpec, options: EvalOptions, bug: bool = False
) -> dict[str, Any]:
    """Run batched, then re-check every sample alone with no tolerance; the figures.

    With ``bug``, the batch is right padded (a deliberately wrong batching, as a control).
    """
    side = lm.tokenizer.padding_side
    lm.tokenizer.padding_side = "right" if bug else side
    t0 = time.perf_counter()
    try:
        run_benchmark(
            lm, bench, capture=capture, options=options, out=out, progress=False, verify=0
        )
    finally:
        lm.tokenizer.padding_side = side
    run_s = time.perf_counter() - t0
    v = verify_run(out, lm, n=len(bench.questions), seed=0, tolerance=float("inf"))
    per_sample = [max(c.max_rel for c in s.sites) for s in v.samples]
    worst_site = max(v.sites.items(), key=lambda kv: kv[1]["max_rel"])
    return {
        "samples": v.n_checked,
        "max_rel": max(per_sample),
        "median_rel": statistics.median(per_sample),
        "worst_site": worst_site[0],
        "max_abs": max(d["max_abs"] for d in v.sites.values()),
        "answers_match": sum(s.answer == "match" for s in v.samples),
        "answers_tie": sum(s.answer == "tie" for s in v.samples),
        "answer_drift": max(s.answer_drift for s in v.samples),
        "run_s": round(run_s, 1),
        "verify_s_per_sample": round(v.seconds / max(v.n_checked, 1), 3),
    }


def cases(n_mc: int, n_gen: int) -> list[tuple[str, Any, CaptureSpec, EvalOptions, bool]]:
    mmlu = load_benchmark(f"mmlu:{MMLU_FILE}").limited(n_mc)
    gsm = load_benchmark(f"gsm8k:{GSM8K}").limited(n_gen)
    kinds = ("resid", "attn", "mlp")
    return [
        (
            "loglik, 3-shot, prefix cache",
            mmlu,
            CaptureSpec(layers=SITES, kinds=kinds),
            EvalOptions(few_shot=3, batch_size=8),
            False,
        ),
        (
            "loglik, 3-shot, padding only",
            mmlu,
            CaptureSpec(layers=SITES, kinds=kinds),
            EvalOptions(few_shot=3, batch_size=8, prefix_cache=False),
            False,
        ),
        (
            "generate, answer tokens captured",
            gsm,
            CaptureSpec(layers=SITES, capture_generated=True),
            EvalOptions(mode="generate", batch_size=n_gen, max_new_tokens=32),
            False,
        ),
        (
            "control: a bug (right padding)",
            mmlu,
            CaptureSpec(layers=SITES, kinds=kinds),
            EvalOptions(few_shot=0, batch_size=8, prefix_cache=False),
            True,
        ),
    ]


def cost(lm: Any, root: Path, n: int) -> dict[str, Any]:
    """A typical capture run (5-shot MMLU, every layer, last token) with the default --verify."""
    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(n)
    capture = CaptureSpec(layers=None, token_selection="last")
    options = EvalOptions(few_shot=5, batch_size=8)
    t0 = time.perf_counter()
    result = run_benchmark(lm, bench, capture=capture, options=options, out=root, progress=False)
    total = time.perf_counter() - t0
    v = result.verification or {}
    return {
        "questions": n,
        "run_s": round(total, 1),
        "verified": v.get("n_checked"),
        "verify_s": v.get("seconds"),
        "share": round((v.get("seconds") or 0) / total, 4),
        "passed": v.get("passed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--n-mc", type=int, default=16)
    parser.add_argument("--n-gen", type=int, default=6)
    parser.add_argument(
        "--cost-n", type=int, default=100, help="questions of the cost run (0: skip)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            lm = load_model(args.model, device=args.device, dtype=dtype)
            for i, (name, bench, capture, options, bug) in enumerate(cases(args.n_mc, args.n_gen)):
                row = {"dtype": dtype, "case": name}
                row.update(spread(lm, Path(tmp) / f"{dtype}-{i}", bench, capture, options, bug))
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.cost_n and dtype == "float32":
                row = {"dtype": dtype, "case": "cost of the default --verify"}
                row.update(cost(lm, Path(tmp) / f"{dtype}-cost", args.cost_n))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nmodel {args.model}, device {args.device}")
    print(
        f"{'dtype':<9} {'case':<34} {'max rel':>9} {'median':>9} {'worst site':<14} answers  drift"
    )
    for r in rows:
        if "max_rel" in r:
            print(
                f"{r['dtype']:<9} {r['case']:<34} {r['max_rel']:>9.2e} {r['median_rel']:>9.2e} "
                f"{r['worst_site']:<14} {r['answers_match']}/{r['samples']}  {r['answer_drift']:.2e}"
            )
        else:
            print(f"{r['dtype']:<9} {r['case']:<34} {json.dumps(r)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"model": args.model, "device": args.device, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
