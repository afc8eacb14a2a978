"""Each optimisation measured on and off, interleaved in the same process."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec, encode, forward_kwargs, run_prompts
from actcap.models.chat import format_prompt
from benchmarks.common import MMLU_FILE, PROMPTS, Figures, interleaved, print_table, sync


def main(lm: Any, args: Any, figures: Figures) -> None:
    n = 8 if args.quick else 32
    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(n)
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    counter = iter(range(10**9))

    def evaluate(capture: CaptureSpec | None, **opts: Any) -> Any:
        def run() -> None:
            run_benchmark(
                lm,
                bench,
                capture=capture,
                options=EvalOptions(mode="loglik", batch_size=args.batch_size, **opts),
                out=tmp / f"r{next(counter)}",
                progress=False,
            )

        return run

    last = CaptureSpec(layers=None, token_selection="last")
    every_token = CaptureSpec(layers=None, token_selection="all")
    sections = {
        "shared few-shot prefix, KV cache reused (5-shot loglik)": {
            "off": evaluate(last, few_shot=5, prefix_cache=False),
            "on": evaluate(last, few_shot=5, prefix_cache=True),
        },
        "batches sorted by length (0-shot loglik)": {
            "off": evaluate(last, sort_by_length=False, prefix_cache=False),
            "on": evaluate(last, sort_by_length=True, prefix_cache=False),
        },
        "background writer thread (all tokens, every layer)": {
            "off": evaluate(every_token, background_write=False),
            "on": evaluate(every_token, background_write=True),
        },
    }
    prompts = [format_prompt(lm.tokenizer, q) for q in PROMPTS[:8]]
    batch = encode(lm, prompts)

    @torch.inference_mode()
    def logits(keep: int | None) -> Any:
        def run() -> None:
            kwargs = forward_kwargs(lm.model, batch)
            if keep is not None:
                kwargs["logits_to_keep"] = keep
            lm.model(**kwargs)
            sync(args.device)

        return run

    def capture_first_layers(early: bool) -> Any:
        spec = CaptureSpec(layers="0-5")

        def run() -> None:
            run_prompts(lm, prompts, spec, batch_size=8, early_stop=early)
            sync(args.device)

        return run

    @torch.inference_mode()
    def head(skip: bool) -> Any:
        def run() -> None:
            module = lm.model.base_model if skip else lm.model
            module(**forward_kwargs(module, batch))
            sync(args.device)

        return run

    sections["logits only where read (logits_to_keep=1), batch 8"] = {
        "off": logits(None),
        "on": logits(1),
    }
    sections["output head skipped when only activations are wanted, batch 8"] = {
        "off": head(False),
        "on": head(True),
    }
    sections["stop after the last requested layer (layers 0-5 of 30), batch 8"] = {
        "off": capture_first_layers(False),
        "on": capture_first_layers(True),
    }
    rounds = 1 if args.quick else max(2, args.rounds // 3)
    for title, pair in sections.items():
        results = interleaved(
            pair, "off", rounds if "loglik" in title or "writer" in title else args.rounds
        )
        print_table(title, results, "off")
        figures.add(
            "optimisations",
            title,
            speedup=1 / results["on"]["ratio"],
            off_s=results["off"]["median_s"],
            on_s=results["on"]["median_s"],
        )
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp / f"dtype-{dtype}"
        t0 = time.perf_counter()
        run_benchmark(
            lm,
            bench,
            capture=CaptureSpec(layers=None, dtype=dtype),
            options=EvalOptions(mode="loglik", batch_size=args.batch_size),
            out=out,
            progress=False,
        )
        sizes[dtype] = (
            sum(p.stat().st_size for p in (out / "samples").iterdir()),
            time.perf_counter() - t0,
        )
    print(f"\n## storage dtype (all tokens, every layer, {n} questions)")
    for dtype, (size, wall) in sizes.items():
        print(f"{dtype:<9} {size / 1e6:8.1f} MB  {wall:6.1f} s")
        figures.add("optimisations", f"storage {dtype}", bytes=size, seconds=wall)
