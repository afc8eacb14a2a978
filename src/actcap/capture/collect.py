"""Run prompts through a model with capture on: batched, left-padded, optionally generating.

Returns one :class:`CapturedSample` per prompt, with padding removed, tokens selected, and every
tensor on the offload device in the storage dtype.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from actcap.capture.hooks import Recorder, StopForward, deepest_block, recording, stop_after
from actcap.capture.sites import Site, resolve_sites
from actcap.capture.spec import CaptureSpec, TokenSelection
from actcap.capture.stats import ChunkPlan, StatsCollector
from actcap.errors import CaptureError
from actcap.models.chat import adds_special_tokens
from actcap.models.loading import LoadedModel


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate an answer."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens."""
    do_sample: bool = False
    """Greedy decoding by default."""
    temperature: float = 1.0
    """Sampling temperature (only with ``do_sample``)."""
    min_new_tokens: int = 0
    """Generate at least this many tokens (benchmarks use it to fix the work done)."""


@dataclass(frozen=True)
class CapturedSample:
    """One prompt's answer and activations."""

    prompt: str
    """The exact text the model read."""
    input_ids: Tensor
    """``(prompt_tokens,)`` int64, padding removed."""
    activations: dict[str, Tensor]
    """Site name to ``(tokens, hidden)``, or ``(hidden,)`` under ``last``/``mean`` selection."""
    output_ids: Tensor | None = None
    """``(generated_tokens,)`` int64 when the model generated, up to and including its stop token."""
    response: str = ""
    """The decoded answer (special tokens removed)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything the caller attaches."""
    nonfinite: dict[str, int] = field(default_factory=dict)
    """Site to how many of its stored values the cast to float16 made inf/nan (sites with none
    left out; empty unless the storage dtype is float16)."""


def encode(
    lm: LoadedModel, prompts: Sequence[str], max_length: int | None = None
) -> dict[str, Tensor]:
    """Tokenize formatted prompts into a left-padded batch on the model's device.

    Prompts are full texts (chat template already applied), so no special tokens are added unless
    the tokenizer has no chat template (then its usual BOS is added).
    """
    add_special = adds_special_tokens(lm.tokenizer)
    batch = lm.tokenizer(
        list(prompts),
        return_tensors="pt",
        padding=True,
        add_special_tokens=add_special,
        truncation=max_length is not None,
        max_length=max_length,
    )
    return {k: v.to(lm.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def begin_stats_batch(stats: StatsCollector | None, attention_mask: Tensor) -> None:
    """Tell ``stats`` a left-padded batch begins: its real tokens count, each its own sample."""
    if stats is not None:
        samples = stats.new_samples(attention_mask.shape[0], attention_mask.device)
        stats.begin_batch([ChunkPlan(attention_mask.bool(), samples)])


def position_ids_for(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens, so a left-padded row matches the prompt alone."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@functools.cache
def _parameters(fn: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def accepts_argument(module: Any, name: str) -> bool:
    """Whether ``module.forward`` takes an argument called ``name``.

    Signatures differ by architecture and transformers release; the answer is cached per class.
    """
    return name in _parameters(type(module).forward)


def forward_kwargs(module: Any, batch: dict[str, Tensor]) -> dict[str, Any]:
    """Arguments for a forward pass of ``module`` on a left-padded batch."""
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
    }
    if accepts_argument(module, "position_ids"):
        kwargs["position_ids"] = position_ids_for(batch["attention_mask"])
    if accepts_argument(module, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


def make_recorder(
    lm: LoadedModel,
    spec: CaptureSpec,
    sites: Sequence[Site],
    *,
    generating: bool,
    stats: StatsCollector | None = None,
) -> Recorder:
    """A recorder configured for ``spec``: prefill only unless generated tokens are wanted."""
    keep_steps = spec.capture_generated and generating
    return Recorder(
        sites,
        dtype=spec.torch_dtype,
        device=spec.offload_device,
        last_token_only=spec.token_selection == "last" and not keep_steps,
        max_steps=None if keep_steps else 1,
        stats=stats,
    )


def select_tokens(t: Tensor, selection: TokenSelection) -> Tensor:
    """Reduce ``(tokens, hidden)`` to what was asked for."""
    if selection == "all":
        return t.contiguous()
    if selection == "last":
        return t[-1].contiguous()
    return t.float().mean(dim=0).to(t.dtype)


def _sample_rows(
    chunks: Sequence[Tensor],
    i: int,
    n_real: int,
    last_only: bool,
    generated_length: int | None,
) -> Tensor:
    """Sample ``i``'s rows of a site's chunks: its prompt tokens (padding cut), then its decode steps.

    Works on activations ``(batch, seq, hidden)`` and on per-position counts ``(batch, seq)``.
    """
    prefill = chunks[0]
    if last_only:
        return prefill[i, -1:]
    rows = prefill[i, prefill.shape[1] - n_real :]
    if generated_length is not None and generated_length > 1:
        steps = [c[i] for c in chunks[1:generated_length]]  # the tokens it read after its prompt
        if steps:
            rows = torch.cat([rows, *steps], dim=0)
    return rows


def count_selected(counts: Tensor, selection: TokenSelection) -> int:
    """Non-finite values behind a stored tensor: the last token's under ``last``, all others'."""
    if counts.numel() == 0:
        return 0
    return int(counts[-1]) if selection == "last" else int(counts.sum())


def split_samples(
    recorder: Recorder,
    attention_mask: Tensor,
    spec: CaptureSpec,
    generated_lengths: Sequence[int] | None = None,
) -> list[dict[str, Tensor]]:
    """Cut a batch's recorded chunks into per-sample tensors without padding.

    Args:
        recorder: Holds per site a prefill chunk ``(batch, prompt_len or 1, hidden)`` and, when
            generated tokens were captured, one ``(batch, 1, hidden)`` chunk per decode step.
        attention_mask: The prompt batch's mask ``(batch, prompt_len)``, left padded.
        spec: Gives the token selection.
        generated_lengths: Tokens each sample generated, stop token included. The model reads all
            but the last of them, so that many minus one decode rows belong to the sample.
    """
    lengths = attention_mask.sum(dim=1).tolist()
    out: list[dict[str, Tensor]] = [{} for _ in lengths]
    for name, chunks in recorder.chunks.items():
        if not chunks:
            raise CaptureError(
                f"Site {name!r} recorded nothing: its module did not run in this forward pass."
            )
        for i, n in enumerate(lengths):
            gen = generated_lengths[i] if generated_lengths is not None else None
            rows = _sample_rows(chunks, i, int(n), recorder.last_token_only, gen)
            out[i][name] = select_tokens(rows, spec.token_selection)
    return out


def split_nonfinite(
    recorder: Recorder,
    attention_mask: Tensor,
    spec: CaptureSpec,
    generated_lengths: Sequence[int] | None = None,
) -> list[dict[str, int]]:
    """Per sample, the sites whose stored values the cast made inf/nan, with how many.

    Cut like :func:`split_samples` (padding removed, the same rows), after
    ``recorder.synchronize()``.
    """
    lengths = attention_mask.sum(dim=1).tolist()
    out: list[dict[str, int]] = [{} for _ in lengths]
    for name, counts in recorder.nonfinite.items():
        if not counts:
            continue
        on_cpu = [c.cpu() for c in counts]
        for i, n in enumerate(lengths):
            gen = generated_lengths[i] if generated_lengths is not None else None
            rows = _sample_rows(on_cpu, i, int(n), recorder.last_token_only, gen)
            if total := count_selected(rows, spec.token_selection):
                out[i][name] = total
    return out


def _trim_generated(ids: Tensor, stops: Sequence[int], pad_id: int | None) -> Tensor:
    """Cut a row of generated ids after its first stop token (generate pads finished rows)."""
    for j, tok in enumerate(ids.tolist()):
        if tok in stops:
            return ids[: j + 1]
    if pad_id is not None and pad_id not in stops:
        keep = ids != pad_id
        return ids[: int(keep.nonzero().max()) + 1] if keep.any() else ids[:0]
    return ids


@torch.inference_mode()
def run_prompts(
    lm: LoadedModel,
    prompts: Sequence[str],
    spec: CaptureSpec,
    *,
    generation: GenerationOptions | None = None,
    batch_size: int = 8,
    sites: Sequence[Site] | None = None,
    early_stop: bool = True,
    stats: StatsCollector | None = None,
) -> list[CapturedSample]:
    """Capture activations for formatted prompts, generating an answer for each when asked.

    Args:
        lm: The loaded model.
        prompts: Full prompt texts (see :func:`actcap.models.chat.format_prompt`).
        spec: What to capture.
        generation: Generate an answer with these options; ``None`` runs the prompt only (the
            model's output head is skipped, as nobody reads its logits).
        batch_size: Prompts per forward pass.
        sites: Pre-resolved sites; resolved from ``spec`` when None.
        early_stop: Without generation, end each forward pass after the deepest decoder block
            holding a wanted site (layers past it are never computed).
        stats: Accumulates statistics over every token read (prompt tokens, and the generated
            tokens read when ``spec.capture_generated``), whatever the token selection.

    Returns:
        One sample per prompt, in order.
    """
    if batch_size < 1:
        raise CaptureError(f"batch_size must be at least 1, got {batch_size}.")
    sites = (
        list(sites)
        if sites is not None
        else resolve_sites(lm.model, lm.layout, spec.layers, spec.kinds)
    )
    recorder = make_recorder(lm, spec, sites, generating=generation is not None, stats=stats)
    results: list[CapturedSample] = []
    blocks = lm.layout.blocks
    stop_index = deepest_block(sites, [lm.layout.block_path(i) for i in range(len(blocks))])
    stop: AbstractContextManager[None] = nullcontext()
    if (
        early_stop
        and generation is None
        and stop_index is not None
        and stop_index < len(blocks) - 1
    ):
        # Resolve by path, as the recording hooks do: a wrapper may have swapped modules in place.
        stop = stop_after(lm.model.get_submodule(lm.layout.block_path(stop_index)))
    with recording(lm.model, recorder), stop:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            recorder.reset()
            recorder.batch_size = len(chunk)
            batch = encode(lm, chunk)
            begin_stats_batch(stats, batch["attention_mask"])
            if generation is None:
                base = getattr(lm.model, "base_model", lm.model)
                with suppress(StopForward):
                    base(**forward_kwargs(base, batch))
                recorder.synchronize()
                per_sample = split_samples(recorder, batch["attention_mask"], spec)
                nonfinite = split_nonfinite(recorder, batch["attention_mask"], spec)
                for i, text in enumerate(chunk):
                    ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].cpu()
                    results.append(CapturedSample(text, ids, per_sample[i], nonfinite=nonfinite[i]))
                continue
            results.extend(_generate_batch(lm, chunk, batch, spec, generation, recorder))
    return results


def _generate_batch(
    lm: LoadedModel,
    chunk: list[str],
    batch: dict[str, Tensor],
    spec: CaptureSpec,
    generation: GenerationOptions,
    recorder: Recorder,
) -> list[CapturedSample]:
    from transformers import GenerationConfig

    stops = lm.stop_ids
    config = GenerationConfig(
        max_new_tokens=generation.max_new_tokens,
        min_new_tokens=generation.min_new_tokens or None,
        do_sample=generation.do_sample,
        temperature=generation.temperature if generation.do_sample else None,
        top_p=None,
        top_k=None,
        eos_token_id=stops,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    sequences = lm.model.generate(**batch, generation_config=config)  # type: ignore[operator]
    recorder.synchronize()
    prompt_len = batch["input_ids"].shape[1]
    generated = [
        _trim_generated(row[prompt_len:].cpu(), stops, lm.tokenizer.pad_token_id)
        for row in sequences
    ]
    lengths = [len(g) for g in generated]
    if recorder.stats is not None:
        recorder.stats.finish_generated(batch["attention_mask"].sum(dim=1), lengths)
    per_sample = split_samples(recorder, batch["attention_mask"], spec, lengths)
    nonfinite = split_nonfinite(recorder, batch["attention_mask"], spec, lengths)
    out = []
    for i, text in enumerate(chunk):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].cpu()
        response = lm.tokenizer.decode(generated[i], skip_special_tokens=True).strip()
        out.append(
            CapturedSample(
                text,
                ids,
                per_sample[i],
                output_ids=generated[i],
                response=response,
                nonfinite=nonfinite[i],
            )
        )
    return out
