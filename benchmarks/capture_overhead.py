"""Capture overhead: a plain forward pass against one that captures every layer's residual stream.

Runs in one process, interleaved in shuffled rounds after a warm-up, on the built-in model with a
batch of 8 prompts of varied length, and prints the median time of each variant and its ratio to
the plain pass measured in the same round.

    python -m benchmarks.capture_overhead [--rounds 15] [--device cpu] [--model default]
"""

from __future__ import annotations

import argparse

import torch

from actcap.capture import CaptureSpec, encode, forward_kwargs, run_prompts
from actcap.models import load_model
from actcap.models.chat import format_prompt
from benchmarks.common import PROMPTS, interleaved, print_table, sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device)
    prompts = [format_prompt(lm.tokenizer, q) for q in PROMPTS[:8]]
    batch = encode(lm, prompts)
    lengths = batch["attention_mask"].sum(1).tolist()
    print(
        f"model {lm.display_name}, device {args.device}, batch {len(prompts)}, prompt tokens {min(lengths)}-{max(lengths)}"
    )
    spec = CaptureSpec(layers=None)  # embeddings + every layer, all tokens, float32

    @torch.inference_mode()
    def plain(module: torch.nn.Module) -> None:
        module(**forward_kwargs(module, batch))
        sync(args.device)

    def actcap() -> None:
        run_prompts(lm, prompts, spec, batch_size=len(prompts))
        sync(args.device)

    results = interleaved(
        {
            "plain forward (with LM head)": lambda: plain(lm.model),
            "plain forward (no LM head)": lambda: plain(lm.model.base_model),
            "actcap, every layer captured": actcap,
        },
        "plain forward (with LM head)",
        args.rounds,
    )
    print_table("capture overhead", results, "plain forward (with LM head)")
    same = (
        results["actcap, every layer captured"]["ratio"]
        / results["plain forward (no LM head)"]["ratio"]
    )
    print(f"capture vs the same computation without hooks (no LM head): {same:.3f}x")


if __name__ == "__main__":
    main()
