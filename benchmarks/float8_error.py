"""The error of ``--dtype float8`` against bfloat16, per site, on the built-in model.

Captures every token of a few MMLU questions (zero-shot prompts, every layer) in float32, then
stores each site the two ways actcap does: bfloat16 (a cast) and float8 (e4m3 with a float32
scale per token vector, :mod:`actcap.storage.float8`), and prints per site:

- ``rel RMS``: ``||float8 - bf16|| / ||bf16||`` over all tokens;
- ``max rel (token)``: the largest of the same ratio for one token vector;
- ``max rel (elem)``: the largest ``|float8 - bf16| / |bf16|`` over elements of normal e4m3
  magnitude (scaled value at least 2**-6 of the row's largest), the per-element bound's check;
- and, for scale, ``bf16 rel RMS``: bfloat16's own error against float32.

Run: ``.venv/bin/python benchmarks/float8_error.py [--questions 8]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from actcap.bench import load_benchmark
from actcap.bench.prompts import build_prompt
from actcap.capture.collect import run_prompts
from actcap.capture.spec import CaptureSpec
from actcap.models import load_model
from actcap.storage.float8 import dequantize, quantize

DATA = Path(__file__).resolve().parent.parent / "data" / "mmlu" / "test"


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    lm = load_model("default", device=args.device)
    bench = load_benchmark(f"mmlu:{DATA}").limited(args.questions)
    prompts = [build_prompt(lm.tokenizer, q, [], "loglik") for q in bench.questions]
    spec = CaptureSpec(layers="all", token_selection="all", dtype="float32")
    samples = run_prompts(lm, prompts, spec, batch_size=4)
    n_tokens = sum(len(s.input_ids) for s in samples)
    print(f"model {lm.display_name}, {len(samples)} MMLU questions, {n_tokens} tokens")
    print(
        f"{'site':<14} {'rel RMS':>9} {'max rel (token)':>16} {'max rel (elem)':>15} "
        f"{'bf16 rel RMS':>13}"
    )
    for site in samples[0].activations:
        x = torch.cat([s.activations[site] for s in samples]).float()
        bf16 = x.to(torch.bfloat16).float()
        f8 = dequantize(*quantize(x))
        _, scale = quantize(x)
        per_token = (f8 - bf16).norm(dim=-1) / bf16.norm(dim=-1).clamp_min(1e-30)
        normal = (x / scale).abs() >= 2.0**-6
        elem = ((f8 - bf16).abs() / bf16.abs().clamp_min(1e-30))[normal & (bf16 != 0)]
        print(
            f"{site:<14} {float((f8 - bf16).norm() / bf16.norm()):>9.2e} "
            f"{float(per_token.max()):>16.2e} {float(elem.max()):>15.2e} "
            f"{float((bf16 - x).norm() / x.norm()):>13.2e}"
        )


if __name__ == "__main__":
    main()
