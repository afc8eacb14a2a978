"""``--stats`` at real shapes: statistics over every token next to capture alone, on one device.

A randomly initialised model of a real shape (Llama-3.1-8B by default; timing needs the shapes,
not the weights, and no hub) reads batches of prompts four ways, interleaved in one process:
the base model's forward alone (no output head, as capture runs it), capture of every layer's
last token, the same with statistics over every token of every layer (``--stats all``), and
capture of every token. Ratios are to the plain forward of the same round.

    python -m benchmarks.gpu_stats --device cuda --shape llama-3.1-8b --batch 8 --tokens 512
    python -m benchmarks.gpu_stats --device cpu --shape tiny        # a try on the CPU
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import torch

from actcap.capture import CaptureSpec
from actcap.capture.collect import run_prompts
from actcap.capture.sites import resolve_sites
from actcap.capture.stats import StatsCollector
from actcap.models import wrap_model
from benchmarks.common import interleaved, print_table

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 384,
    },
}


def build(shape: str, device: str, dtype: torch.dtype) -> Any:
    """A random model of ``shape`` on ``device`` (weights made there, in ``dtype``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, pad_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def prompts_of(tokenizer: Any, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` prompts of about ``tokens`` tokens each (lengths vary by up to 10%, so batches pad)."""
    rng = random.Random(seed)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "what",
        "is",
        "capital",
        "of",
        "France",
        "answer",
    ]
    out = []
    for _ in range(n):
        want = int(tokens * rng.uniform(0.9, 1.0))
        text = ""
        while len(tokenizer.encode(text)) < want:
            text += " " + " ".join(rng.choice(words) for _ in range(16))
        ids = tokenizer.encode(text)[:want]
        out.append(tokenizer.decode(ids))
    return out


def main() -> None:
    """Time the four ways and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from tests.conftest import build_tokenizer

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    lm = wrap_model(build(args.shape, args.device, dtype), build_tokenizer(), name=args.shape)
    prompts = prompts_of(lm.tokenizer, args.batch, args.tokens)
    storage = "bfloat16" if dtype == torch.bfloat16 else "float32"
    last = CaptureSpec(token_selection="last", dtype=storage)
    every = CaptureSpec(token_selection="all", dtype=storage)
    sites = resolve_sites(lm.model, lm.layout, last.layers, last.kinds)
    names = [s.name for s in sites]
    base = lm.model.model
    batch = lm.tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)

    def done() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.inference_mode()
    def plain() -> None:
        base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        done()

    def capture_last() -> None:
        run_prompts(lm, prompts, last, batch_size=args.batch, sites=sites)
        done()

    def capture_last_stats() -> None:
        stats = StatsCollector(names)
        run_prompts(lm, prompts, last, batch_size=args.batch, sites=sites, stats=stats)
        stats.finished()
        done()

    def capture_all() -> None:
        run_prompts(lm, prompts, every, batch_size=args.batch, sites=sites)
        done()

    n_tokens = int(batch["attention_mask"].sum())
    print(
        f"{args.shape} ({sum(p.numel() for p in lm.model.parameters()) / 1e9:.2f} B parameters, "
        f"{dtype}) on {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}; "
        f"batch {args.batch}, {n_tokens} tokens; {len(sites)} sites"
    )
    results = interleaved(
        {
            "forward (no head)": plain,
            "capture last token, every layer": capture_last,
            "  + --stats all (every token)": capture_last_stats,
            "capture every token, every layer": capture_all,
        },
        baseline="forward (no head)",
        rounds=args.rounds,
    )
    print_table("statistics over every token", results, "forward (no head)")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
