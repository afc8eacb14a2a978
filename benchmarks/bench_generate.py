"""Generation with per-step capture of every layer against plain ``generate``."""

from __future__ import annotations

from typing import Any

import torch

from actcap.capture import CaptureSpec, GenerationOptions, encode, run_prompts
from actcap.models.chat import format_prompt
from benchmarks.common import PROMPTS, Figures, interleaved, print_table, sync


def main(lm: Any, args: Any, figures: Figures) -> None:
    from transformers import GenerationConfig

    new_tokens = 4 if args.quick else 32
    for bs in (1, 8):
        prompts = [format_prompt(lm.tokenizer, q) for q in PROMPTS[:bs]]
        batch = encode(lm, prompts)
        # Same budget for both: exactly new_tokens tokens (no early stop), greedy.
        config = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )

        @torch.inference_mode()
        def plain(batch: Any = batch, config: Any = config) -> None:
            lm.model.generate(**batch, generation_config=config)
            sync(args.device)

        spec = CaptureSpec(layers=None, capture_generated=True)
        opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

        def actcap(
            prompts: list[str] = prompts, spec: CaptureSpec = spec, opts: GenerationOptions = opts
        ) -> None:
            run_prompts(lm, prompts, spec, generation=opts, batch_size=len(prompts))
            sync(args.device)

        results = interleaved(
            {"plain generate": plain, "actcap, every layer, every step": actcap},
            "plain generate",
            args.rounds,
        )
        print_table(f"generation, batch {bs}, {new_tokens} new tokens", results, "plain generate")
        for name, r in results.items():
            figures.add("generate", name, batch=bs, new_tokens=new_tokens, **r)
