"""Prefill capture of every layer: plain forward, output_hidden_states, actcap, nnsight, TransformerLens."""

from __future__ import annotations

import copy
from typing import Any

import torch

from actcap.capture import CaptureSpec, encode, forward_kwargs, run_prompts
from actcap.models.chat import format_prompt
from benchmarks.common import PROMPTS, Figures, interleaved, print_table, skip, sync


def variants(lm: Any, prompts: list[str], device: str) -> dict[str, Any]:
    batch = encode(lm, prompts)
    spec = CaptureSpec(layers=None)  # embeddings + every layer, all tokens, float32, to CPU
    base = lm.model.base_model
    n = lm.layout.num_layers

    @torch.inference_mode()
    def plain() -> None:
        lm.model(**forward_kwargs(lm.model, batch))
        sync(device)

    @torch.inference_mode()
    def hidden_states() -> None:
        out = lm.model(**forward_kwargs(lm.model, batch), output_hidden_states=True)
        [h.to("cpu") for h in out.hidden_states]
        sync(device)

    def actcap() -> None:
        run_prompts(lm, prompts, spec, batch_size=len(prompts))
        sync(device)

    out: dict[str, Any] = {
        "plain forward": plain,
        "output_hidden_states=True": hidden_states,
        "actcap (every layer, unpadded, on CPU)": actcap,
    }
    try:
        import nnsight  # noqa: F401

        out["nnsight"] = nnsight_variant(lm, batch, n, device)
    except ImportError:
        skip("prefill", "nnsight not installed (pip install 'actcap[bench]')")
    try:
        out["TransformerLens (TransformerBridge)"] = transformerlens_variant(lm, batch, device)
    except ImportError:
        skip("prefill", "transformer_lens not installed (pip install 'actcap[bench]')")
    del base
    return out


def nnsight_variant(lm: Any, batch: dict[str, torch.Tensor], n: int, device: str) -> Any:
    import warnings

    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Its own copy: peers may wrap or replace modules of the model they are given.
        model = LanguageModel(copy.deepcopy(lm.model), tokenizer=lm.tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def run() -> None:
        saved = []
        with torch.inference_mode(), model.trace(inputs):
            for i in range(n):
                saved.append(model.model.layers[i].output.save())
        [s.to("cpu") for s in saved]
        sync(device)

    return run


def transformerlens_variant(lm: Any, batch: dict[str, torch.Tensor], device: str) -> Any:
    from transformer_lens import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        lm.source, hf_model=lm.model, tokenizer=lm.tokenizer, device=device
    )
    ids = batch["input_ids"]
    mask = batch["attention_mask"]

    def run() -> None:
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(
                ids, attention_mask=mask, names_filter=lambda name: name.endswith("hook_resid_post")
            )
        [v.to("cpu") for v in cache.values()]
        sync(device)

    return run


def main(lm: Any, args: Any, figures: Figures) -> None:
    for bs in (1, 8):
        prompts = [format_prompt(lm.tokenizer, q) for q in PROMPTS[:bs]]
        results = interleaved(variants(lm, prompts, args.device), "plain forward", args.rounds)
        print_table(f"prefill, batch {bs}, every layer", results, "plain forward")
        for name, r in results.items():
            figures.add("prefill", name, batch=bs, **r)
