"""Capture overhead: a plain forward pass against one that captures every layer's residual stream.

Runs in one process, interleaved in shuffled rounds after a warm-up, on the built-in model with a
batch of 8 prompts of varied length, and prints the median time of each variant and its ratio to
the plain pass measured in the same round.

    python benchmarks/capture_overhead.py [--rounds 15] [--device cpu] [--model default]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from actcap.capture import CaptureSpec, encode, forward_kwargs, run_prompts
from actcap.models import load_model
from actcap.models.chat import format_prompt

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain in one sentence why the sky is blue during the day and red at sunset.",
    "What is 17 times 23?",
    "Which planet in our solar system has the most moons, and roughly how many have been found?",
    "Translate 'good morning' into Spanish.",
    "Summarise the plot of Romeo and Juliet in two sentences, mentioning both families and how "
    "the story ends for the two young lovers.",
    "Who wrote 'Pride and Prejudice'?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device)
    prompts = [format_prompt(lm.tokenizer, q) for q in QUESTIONS]
    batch = encode(lm, prompts)
    lengths = batch["attention_mask"].sum(1).tolist()
    print(
        f"model {lm.display_name}, device {args.device}, batch {len(prompts)}, prompt tokens {min(lengths)}-{max(lengths)}"
    )
    spec = CaptureSpec(layers=None)  # embeddings + every layer, all tokens, float32

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.inference_mode()
    def plain_full() -> None:
        lm.model(**forward_kwargs(lm.model, batch))
        sync()

    @torch.inference_mode()
    def plain_base() -> None:
        base = lm.model.base_model
        base(**forward_kwargs(base, batch))
        sync()

    def actcap_all_layers() -> None:
        run_prompts(lm, prompts, spec, batch_size=len(prompts))
        sync()

    variants = {
        "plain forward (with LM head)": plain_full,
        "plain forward (no LM head)": plain_base,
        "actcap, every layer captured": actcap_all_layers,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)
        this_round = {}
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            this_round[name] = time.perf_counter() - t0
        base_t = this_round["plain forward (with LM head)"]
        for name, t in this_round.items():
            times[name].append(t)
            ratios[name].append(t / base_t)
    print(f"{'variant':<32} {'median ms':>10} {'min-max ms':>16} {'ratio (median)':>15}")
    for name in variants:
        ts = [t * 1000 for t in times[name]]
        print(
            f"{name:<32} {statistics.median(ts):>10.1f} {min(ts):>7.1f}-{max(ts):<8.1f} "
            f"{statistics.median(ratios[name]):>14.3f}x"
        )
    cap = statistics.median(ratios["actcap, every layer captured"])
    base = statistics.median(ratios["plain forward (no LM head)"])
    print(f"capture vs the same computation without hooks (no LM head): {cap / base:.3f}x")


if __name__ == "__main__":
    main()
