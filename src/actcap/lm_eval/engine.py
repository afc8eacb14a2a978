"""Batched answers to lm-evaluation-harness requests, on token ids, with capture.

lm-eval hands a model token-level work: score continuations after a context, score whole texts in
windows, or generate until a stop string. This module does that work for a batch of contexts with
actcap's capture: the context of each row is read once, left padded with position ids counted
over real tokens (so a batch gives what each row alone gives), and its activations recorded.

- :func:`score_contexts`: every continuation of a context from one pass over the context. A
  continuation of one token (a letter) is read off the logits at the context's last position; the
  longer ones run after the context on its key-value cache, all together, never re-reading it. A
  batch whose contexts share a long prefix (the few-shot examples) runs the prefix once.
- :func:`score_windows`: the rolling windows of ``loglikelihood_rolling``, one pass each.
- :func:`generate_rows`: greedy (or sampled) generation with the model's ``generate``.

Nothing here knows lm-eval: the caller tokenises as lm-eval does and hands over token ids.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from actcap.capture import (
    CaptureSpec,
    Recorder,
    Site,
    accepts_argument,
    make_recorder,
    position_ids_for,
    recording,
    select_tokens,
    split_nonfinite,
    split_samples,
)
from actcap.models import LoadedModel

MIN_SHARED_PREFIX = 32
"""Shorter shared prefixes are not worth a separate pass (as in actcap's own scoring)."""


@dataclass
class Row:
    """One context read once, with what was recorded while the model read it."""

    input_ids: Tensor
    """The context's tokens, as read."""
    activations: dict[str, Tensor] = field(default_factory=dict)
    """Site to tensor (empty without capture)."""
    nonfinite: dict[str, int] = field(default_factory=dict)
    """Site to the values the float16 cast made inf/nan."""


@dataclass
class ScoredRow(Row):
    """A context and the ``(log-likelihood, is greedy)`` of each of its continuations."""

    scores: list[tuple[float, bool]] = field(default_factory=list)
    """Per continuation, in the order given."""


@dataclass
class GeneratedRow(Row):
    """A context and the tokens generated after it."""

    output_ids: list[int] = field(default_factory=list)
    """Every token ``generate`` returned for the row (padding included)."""


def _pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: Any, left: bool
) -> tuple[Tensor, Tensor]:
    """A padded ``(rows, width)`` id tensor and its attention mask."""
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad_id] * (width - len(r))
        ids.append(fill + list(r) if left else list(r) + fill)
        ones, zeros = [1] * len(r), [0] * (width - len(r))
        mask.append(zeros + ones if left else ones + zeros)
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _cache_key(module: Any) -> str:
    """Transformers 5.x renames ``past_key_values`` to ``cache`` in some releases."""
    return "cache" if accepts_argument(module, "cache") else "past_key_values"


def _new_cache(lm: LoadedModel) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=lm.model.config)


def _select_rows(cache: Any, rows: Tensor, in_place: bool) -> Any:
    """The cache of the given batch rows (repeats allowed); the original is kept unless ``in_place``."""
    if not in_place:
        layers = getattr(cache, "layers", None)
        if layers is not None:
            # Shallow copies: selecting rebinds each layer's tensors, the originals stay intact.
            cache = copy.copy(cache)
            cache.layers = [copy.copy(layer) for layer in layers]
        else:
            cache = copy.deepcopy(cache)
    cache.batch_select_indices(rows)
    return cache


def _pad_id(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


@dataclass
class _ContextPass:
    """What one pass over a batch of contexts leaves for the continuations."""

    last_logprobs: Tensor
    """``(rows, vocab)`` log-probabilities of the token after each context."""
    cache: Any
    """The contexts' key-value cache (None when no continuation needs it)."""
    mask: Tensor
    """``(rows, cache width)`` attention mask over the cache."""
    next_position: Tensor
    """``(rows,)`` position of the first token after each context."""
    rows: list[Row]
    """Per context: its tokens and activations."""


def _recording(lm: LoadedModel, recorder: Recorder | None) -> AbstractContextManager[Any]:
    return recording(lm.model, recorder) if recorder is not None else nullcontext()


def _plain_pass(
    lm: LoadedModel,
    contexts: Sequence[Sequence[int]],
    spec: CaptureSpec,
    sites: Sequence[Site],
    need_cache: bool,
) -> _ContextPass:
    """All contexts in one left-padded forward; logits at the last position only."""
    ids, mask = _pad(contexts, _pad_id(lm), lm.device, left=True)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if accepts_argument(lm.model, "position_ids"):
        kwargs["position_ids"] = position_ids_for(mask)
    cache = _new_cache(lm) if need_cache else None
    kwargs["use_cache"] = need_cache
    if cache is not None:
        kwargs[_cache_key(lm.model)] = cache
    if accepts_argument(lm.model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    recorder = make_recorder(lm, spec, sites, generating=False) if sites else None
    if recorder is not None:
        recorder.batch_size = len(contexts)
    with _recording(lm, recorder):
        logits = lm.model(**kwargs).logits[:, -1, :]
    rows = [Row(torch.tensor(list(c))) for c in contexts]
    if recorder is not None:
        recorder.synchronize()
        for row, acts, bad in zip(
            rows,
            split_samples(recorder, mask, spec),
            split_nonfinite(recorder, mask, spec),
            strict=True,
        ):
            row.activations, row.nonfinite = acts, bad
    last = torch.log_softmax(logits.float(), dim=-1)
    return _ContextPass(last, cache, mask, mask.sum(dim=1), rows)


def _prefix_pass(
    lm: LoadedModel,
    contexts: Sequence[Sequence[int]],
    n_prefix: int,
    spec: CaptureSpec,
    sites: Sequence[Site],
) -> _ContextPass:
    """The shared prefix once (its cache repeated for every row), then each row's own tokens."""
    device = lm.device
    base = getattr(lm.model, "base_model", lm.model)
    n = len(contexts)
    suffixes = [list(c[n_prefix:]) for c in contexts]
    suffix_ids, suffix_mask = _pad(suffixes, _pad_id(lm), device, left=False)
    lengths = suffix_mask.sum(dim=1)
    # Keep every chunk: (1, prefix, hidden) once, then (rows, suffix, hidden), right padded.
    recorder = (
        Recorder(sites, dtype=spec.torch_dtype, device=spec.offload_device, max_steps=2)
        if sites
        else None
    )
    cache = _new_cache(lm)
    with _recording(lm, recorder):
        if recorder is not None:
            recorder.batch_size = 1
        base(
            input_ids=torch.tensor([list(contexts[0][:n_prefix])], device=device),
            position_ids=torch.arange(n_prefix, device=device)[None],
            use_cache=True,
            **{_cache_key(base): cache},
        )
        cache.batch_repeat_interleave(n)
        if recorder is not None:
            recorder.batch_size = n
        mask = torch.cat(
            [torch.ones(n, n_prefix, dtype=suffix_mask.dtype, device=device), suffix_mask], dim=1
        )
        positions = (n_prefix + torch.arange(suffix_ids.shape[1], device=device)).expand(n, -1)
        kwargs: dict[str, Any] = {
            "input_ids": suffix_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            _cache_key(lm.model): cache,
        }
        last_index = lengths - 1
        keep = torch.unique(last_index)
        if accepts_argument(lm.model, "logits_to_keep"):
            kwargs["logits_to_keep"] = keep
            logits = lm.model(**kwargs).logits  # (rows, len(keep), vocab)
            column = torch.searchsorted(keep, last_index)
        else:
            logits = lm.model(**kwargs).logits
            column = last_index
        last = logits[torch.arange(n, device=device), column]
    rows = [Row(torch.tensor(list(c))) for c in contexts]
    if recorder is not None:
        recorder.synchronize()
        _split_prefix_recording(recorder, rows, [len(s) for s in suffixes], spec)
    return _ContextPass(
        torch.log_softmax(last.float(), dim=-1), cache, mask, n_prefix + lengths, rows
    )


def _split_prefix_recording(
    recorder: Recorder, rows: list[Row], suffix_lengths: list[int], spec: CaptureSpec
) -> None:
    """Per row: the shared prefix's activations, then its own tokens', selected as asked."""
    for name, chunks in recorder.chunks.items():
        shared, tail = chunks[0][0], chunks[1]
        for i, n in enumerate(suffix_lengths):
            rows[i].activations[name] = select_tokens(
                torch.cat([shared, tail[i, :n]]), spec.token_selection
            )
    for name, counts in recorder.nonfinite.items():
        if len(counts) < 2:
            continue
        shared_counts, tail_counts = counts[0][0].cpu(), counts[1].cpu()
        for i, n in enumerate(suffix_lengths):
            per_token = torch.cat([shared_counts, tail_counts[i, :n]])
            total = int(per_token[-1]) if spec.token_selection == "last" else int(per_token.sum())
            if total:
                rows[i].nonfinite[name] = total


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for j in range(n):
        if any(r[j] != first[j] for r in rows[1:]):
            return j
    return n


@torch.inference_mode()
def score_contexts(
    lm: LoadedModel,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    spec: CaptureSpec,
    sites: Sequence[Site],
    *,
    prefix_cache: bool = True,
) -> list[ScoredRow]:
    """Score every continuation of every context, reading each context once.

    Args:
        lm: The model.
        contexts: Token ids of each context (at least one token each).
        continuations: Per context, the token ids of each continuation (at least one token each).
        spec: What to capture (token selection, dtype).
        sites: Where to capture; none for scoring only.
        prefix_cache: Run a long prefix shared by every context once.

    Returns:
        Per context, its tokens and activations and, per continuation, the sum of its tokens'
        log-probabilities and whether greedy decoding would have produced it.
    """
    need_cache = any(len(c) > 1 for conts in continuations for c in conts)
    n_prefix = _common_prefix(contexts) if prefix_cache and len(contexts) > 1 else 0
    n_prefix = min(n_prefix, min(len(c) for c in contexts) - 1)  # each row keeps a token
    state = (
        _prefix_pass(lm, contexts, n_prefix, spec, sites)
        if n_prefix >= MIN_SHARED_PREFIX
        else _plain_pass(lm, contexts, spec, sites, need_cache)
    )
    greedy_next = state.last_logprobs.argmax(dim=-1).tolist()
    out: list[ScoredRow] = []
    for i, (row, conts) in enumerate(zip(state.rows, continuations, strict=True)):
        scores = [(float(state.last_logprobs[i, c[0]]), greedy_next[i] == c[0]) for c in conts]
        out.append(ScoredRow(row.input_ids, row.activations, row.nonfinite, scores))
    longer = [
        (i, j, list(c))
        for i, conts in enumerate(continuations)
        for j, c in enumerate(conts)
        if len(c) > 1
    ]
    if longer:
        _score_rest(lm, state, longer, out, _rows_per_pass(len(contexts), state.mask.shape[1]))
    return out


def _rows_per_pass(n_contexts: int, width: int) -> int:
    """Continuation rows per pass: up to four per context while the contexts are short.

    Each row holds its context's cache, so rows times cache width stays near what the context
    pass held (at most four times, for contexts under 256 tokens).
    """
    return max(n_contexts, min(4 * n_contexts, n_contexts * 1024 // max(width, 1)))


def _score_rest(
    lm: LoadedModel,
    state: _ContextPass,
    longer: list[tuple[int, int, list[int]]],
    out: list[ScoredRow],
    batch_rows: int,
) -> None:
    """Add the log-probabilities of the tokens after the first, on the contexts' cache.

    Rows go in groups of ``batch_rows``, each with its context's cache.
    """
    device = lm.device
    key = _cache_key(lm.model)
    for start in range(0, len(longer), batch_rows):
        group = longer[start : start + batch_rows]
        which = torch.tensor([i for i, _, _ in group], device=device)
        only = start == 0 and len(longer) <= batch_rows  # the last use: select in place
        cache = _select_rows(state.cache, which, in_place=only)
        inputs, input_mask = _pad([c[:-1] for _, _, c in group], _pad_id(lm), device, left=False)
        positions = state.next_position[which][:, None] + torch.arange(
            inputs.shape[1], device=device
        )
        kwargs: dict[str, Any] = {
            "input_ids": inputs,
            "attention_mask": torch.cat([state.mask[which], input_mask], dim=1),
            "use_cache": True,
            key: cache,
        }
        if accepts_argument(lm.model, "position_ids"):
            kwargs["position_ids"] = positions
        logprobs = torch.log_softmax(lm.model(**kwargs).logits.float(), dim=-1)
        for r, (i, j, cont) in enumerate(group):
            targets = torch.tensor(cont[1:], device=device)
            lp = logprobs[r, : len(targets)]
            total = float(lp.gather(1, targets[:, None]).sum())
            greedy = bool((lp.argmax(dim=-1) == targets).all())
            first, first_greedy = out[i].scores[j]
            out[i].scores[j] = (first + total, first_greedy and greedy)


@torch.inference_mode()
def score_windows(
    lm: LoadedModel,
    windows: Sequence[tuple[Sequence[int], Sequence[int]]],
    spec: CaptureSpec,
    sites: Sequence[Site],
) -> list[tuple[float, Row]]:
    """Score rolling windows: each ``(context, continuation)`` as one pass over both.

    Returns:
        Per window, the log-likelihood of its continuation and the activations of the tokens
        that predict it (one row per continuation token, before any token selection).
    """
    inputs = [list(ctx) + list(cont[:-1]) for ctx, cont in windows]
    ids, mask = _pad(inputs, _pad_id(lm), lm.device, left=True)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if accepts_argument(lm.model, "position_ids"):
        kwargs["position_ids"] = position_ids_for(mask)
    recorder = (
        Recorder(sites, dtype=spec.torch_dtype, device=spec.offload_device, max_steps=1)
        if sites
        else None
    )
    if recorder is not None:
        recorder.batch_size = len(inputs)
    with _recording(lm, recorder):
        logprobs = torch.log_softmax(lm.model(**kwargs).logits.float(), dim=-1)
    every = CaptureSpec(token_selection="all", dtype=spec.dtype)
    acts: list[dict[str, Tensor]] = [{} for _ in inputs]
    if recorder is not None:
        recorder.synchronize()
        acts = split_samples(recorder, mask, every)
    out = []
    for i, (_, cont) in enumerate(windows):
        n = len(cont)
        targets = torch.tensor(list(cont), device=lm.device)
        lp = logprobs[i, -n:]
        total = float(lp.gather(1, targets[:, None]).sum())
        row = Row(ids[i, -n:].cpu(), {name: t[-n:] for name, t in acts[i].items()})
        out.append((total, row))
    return out


@torch.inference_mode()
def generate_rows(
    lm: LoadedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    spec: CaptureSpec,
    sites: Sequence[Site],
    generate_kwargs: dict[str, Any],
    kept_lengths: Any,
) -> list[GeneratedRow]:
    """Generate after a left-padded batch, recording the prompt (and, if asked, each step).

    Args:
        lm: The model.
        input_ids: ``(rows, width)``, left padded.
        attention_mask: Its mask.
        spec: What to capture; ``capture_generated`` also records the generated tokens.
        sites: Where; none for generation only.
        generate_kwargs: Passed to ``generate`` as they are (stopping criteria, lengths, ...).
        kept_lengths: Called with each row's generated ids, returns how many of them make the
            answer (the decode steps kept under ``capture_generated``).
    """
    recorder = make_recorder(lm, spec, sites, generating=True) if sites else None
    if recorder is not None:
        recorder.batch_size = int(input_ids.shape[0])
    with _recording(lm, recorder):
        sequences = lm.model.generate(  # type: ignore[operator]
            input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
        )
    generated = [row[input_ids.shape[1] :].tolist() for row in sequences]
    rows = [
        GeneratedRow(input_ids[i][attention_mask[i].bool()].cpu(), output_ids=g)
        for i, g in enumerate(generated)
    ]
    if recorder is not None:
        recorder.synchronize()
        lengths = [kept_lengths(g) for g in generated] if spec.capture_generated else None
        for row, acts, bad in zip(
            rows,
            split_samples(recorder, attention_mask, spec, lengths),
            split_nonfinite(recorder, attention_mask, spec, lengths),
            strict=True,
        ):
            row.activations, row.nonfinite = acts, bad
    return rows
