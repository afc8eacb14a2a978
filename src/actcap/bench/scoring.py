"""Answering questions in batches: generation, and multiple-choice log-likelihood.

Both run left-padded batches with position ids counted over real tokens, so a batch gives the same
answers as one question at a time, and both record activations through :mod:`actcap.capture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from actcap.bench.questions import LETTERS, Question
from actcap.capture.collect import (
    GenerationOptions,
    accepts_argument,
    begin_stats_batch,
    count_selected,
    encode,
    forward_kwargs,
    make_recorder,
    run_prompts,
    select_tokens,
    split_nonfinite,
    split_samples,
)
from actcap.capture.hooks import Recorder, recording
from actcap.capture.sites import Site
from actcap.capture.spec import CaptureSpec
from actcap.capture.stats import ChunkPlan, StatsCollector
from actcap.models.chat import adds_special_tokens
from actcap.models.loading import LoadedModel

ChoiceFormat = Literal["letter", "text"]


@dataclass
class Answer:
    """A model's answer to one question, with what was recorded while it read the prompt."""

    prompt: str
    """The exact prompt text."""
    response: str
    """Generated text, or the chosen letter in log-likelihood mode."""
    input_ids: Tensor
    """Prompt tokens."""
    activations: dict[str, Tensor] = field(default_factory=dict)
    """Site to tensor (empty without capture)."""
    output_ids: Tensor | None = None
    """Generated tokens."""
    choice_logprobs: list[float] | None = None
    """Log-likelihood of each choice."""
    nonfinite: dict[str, int] = field(default_factory=dict)
    """Site to the values its float16 cast made inf/nan (see :mod:`actcap.capture.hooks`)."""


def answer_generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    spec: CaptureSpec,
    sites: Sequence[Site],
    generation: GenerationOptions,
    batch_size: int,
    stats: StatsCollector | None = None,
) -> list[Answer]:
    """Generate answers (greedy by default), capturing ``sites`` (none for evaluation only)."""
    samples = run_prompts(
        lm, prompts, spec, generation=generation, batch_size=batch_size, sites=sites, stats=stats
    )
    return [
        Answer(s.prompt, s.response, s.input_ids, s.activations, s.output_ids, None, s.nonfinite)
        for s in samples
    ]


def _single_token_ids(lm: LoadedModel, texts: Sequence[str]) -> list[int] | None:
    ids = [lm.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


@torch.inference_mode()
def answer_loglik(
    lm: LoadedModel,
    questions: Sequence[Question],
    prompts: Sequence[str],
    spec: CaptureSpec,
    sites: Sequence[Site],
    batch_size: int,
    choice_format: ChoiceFormat = "letter",
    prefix_cache: bool = True,
    stats: StatsCollector | None = None,
) -> list[Answer]:
    """Score each choice's log-likelihood after the prompt and pick the most likely.

    With ``letter`` (the usual MMLU scoring) the continuations are `` A``, `` B``, ...: one token
    each, so one forward pass per batch, reading logits at the last position only. With ``text``,
    or letters that are not single tokens, each choice's text is scored as a continuation.

    With ``prefix_cache``, a batch whose prompts share a long token prefix (the few-shot examples
    of one subject) runs that prefix once and only each question's own tokens after it, reusing
    the prefix's key-value cache. Results and activations equal the plain path's, and so do
    ``stats`` (the prefix's tokens count once per prompt, as if each prompt had run alone).
    """
    answers: list[Answer] = []
    for start in range(0, len(prompts), batch_size):
        qs = list(questions[start : start + batch_size])
        ps = list(prompts[start : start + batch_size])
        letter_ids = None
        if choice_format == "letter":
            n_choices = max(len(q.choices or ()) for q in qs)
            letter_ids = _single_token_ids(lm, [f" {LETTERS[i]}" for i in range(n_choices)])
        cached = (
            _loglik_shared_prefix(lm, qs, ps, spec, sites, letter_ids, stats)
            if prefix_cache and letter_ids
            else None
        )
        answers.extend(
            cached
            if cached is not None
            else _loglik_batch(
                lm, qs, ps, spec, sites, letter_ids, choice_format, batch_size, stats
            )
        )
    return answers


def _answers(
    ps: Sequence[str],
    scores: Sequence[list[float]],
    ids: Sequence[Tensor],
    acts: Sequence[dict[str, Tensor]],
    nonfinite: Sequence[dict[str, int]],
) -> list[Answer]:
    out = []
    for p, s, i, a, bad in zip(ps, scores, ids, acts, nonfinite, strict=True):
        chosen = max(range(len(s)), key=s.__getitem__)
        out.append(Answer(p, LETTERS[chosen], i, a, None, s, bad))
    return out


def _loglik_batch(
    lm: LoadedModel,
    qs: list[Question],
    ps: list[str],
    spec: CaptureSpec,
    sites: Sequence[Site],
    letter_ids: list[int] | None,
    choice_format: ChoiceFormat,
    batch_size: int,
    stats: StatsCollector | None = None,
) -> list[Answer]:
    recorder = make_recorder(lm, spec, sites, generating=False, stats=stats)
    recorder.batch_size = len(ps)
    with recording(lm.model, recorder):
        batch = encode(lm, ps)
        begin_stats_batch(stats, batch["attention_mask"])
        if letter_ids is not None:
            kwargs = forward_kwargs(lm.model, batch)
            if accepts_argument(lm.model, "logits_to_keep"):
                kwargs["logits_to_keep"] = 1
            logits = lm.model(**kwargs).logits[:, -1, :].float()  # (batch, vocab)
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            scores = [
                [float(logprobs[i, letter_ids[j]]) for j in range(len(q.choices or ()))]
                for i, q in enumerate(qs)
            ]
        else:
            base = getattr(lm.model, "base_model", lm.model)
            base(**forward_kwargs(base, batch))
            scores = [
                _score_texts(lm, p, q, choice_format, batch_size)
                for p, q in zip(ps, qs, strict=True)
            ]
        recorder.synchronize()
    acts = split_samples(recorder, batch["attention_mask"], spec)
    nonfinite = split_nonfinite(recorder, batch["attention_mask"], spec)
    ids = [batch["input_ids"][i][batch["attention_mask"][i].bool()].cpu() for i in range(len(ps))]
    return _answers(ps, scores, ids, acts, nonfinite)


MIN_SHARED_PREFIX = 32
"""Shorter shared prefixes are not worth a separate pass."""


def _loglik_shared_prefix(
    lm: LoadedModel,
    qs: list[Question],
    ps: list[str],
    spec: CaptureSpec,
    sites: Sequence[Site],
    letter_ids: list[int],
    stats: StatsCollector | None = None,
) -> list[Answer] | None:
    """The letter scoring of :func:`answer_loglik` with the batch's common prefix run once.

    Returns None when the prompts share too short a prefix (the caller takes the plain path).
    """
    add_special = adds_special_tokens(lm.tokenizer)
    rows = [lm.tokenizer.encode(p, add_special_tokens=add_special) for p in ps]
    n_prefix = _common_prefix_length(rows)
    n_prefix = min(n_prefix, min(len(r) for r in rows) - 1)  # every question keeps a token
    if len(ps) < 2 or n_prefix < MIN_SHARED_PREFIX:
        return None
    from transformers import DynamicCache

    device = lm.device
    base = getattr(lm.model, "base_model", lm.model)
    # Keep every chunk: (1, prefix, hidden) once, then (batch, suffix, hidden), right padded.
    recorder = Recorder(
        sites, dtype=spec.torch_dtype, device=spec.offload_device, max_steps=2, stats=stats
    )
    suffixes = [r[n_prefix:] for r in rows]
    width = max(len(s) for s in suffixes)
    pad = lm.tokenizer.pad_token_id or 0
    suffix_ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=device)
    suffix_mask = torch.tensor(
        [[1] * len(s) + [0] * (width - len(s)) for s in suffixes], device=device
    )
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    if stats is not None:
        samples = stats.new_samples(len(ps), device)
        prefix_positions = torch.arange(n_prefix, device=device).expand(len(ps), -1)
        stats.begin_batch(
            [
                ChunkPlan(
                    torch.ones_like(prefix_positions, dtype=torch.bool),
                    samples,
                    prefix_positions,
                    shared=True,
                ),
                ChunkPlan(
                    suffix_mask.bool(),
                    samples,
                    n_prefix + torch.arange(width, device=device).expand(len(ps), -1),
                ),
            ]
        )
    with recording(lm.model, recorder):
        recorder.batch_size = 1
        prefix = torch.tensor([rows[0][:n_prefix]], device=device)
        cache = DynamicCache(config=lm.model.config)
        # transformers 5.x renames past_key_values to cache; older releases know only the former.
        key = "cache" if accepts_argument(base, "cache") else "past_key_values"
        base(
            input_ids=prefix,
            use_cache=True,
            position_ids=torch.arange(n_prefix, device=device)[None],
            **{key: cache},
        )
        cache.batch_repeat_interleave(len(ps))
        recorder.batch_size = len(ps)
        mask = torch.cat(
            [torch.ones(len(ps), n_prefix, dtype=suffix_mask.dtype, device=device), suffix_mask],
            dim=1,
        )
        positions = (n_prefix + torch.arange(width, device=device)).expand(len(ps), -1)
        out = base(
            input_ids=suffix_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{key: cache},
        )
        last = out.last_hidden_state[
            torch.arange(len(ps), device=device), lengths - 1
        ]  # (batch, hidden)
        logits = _head(lm, last)  # (batch, vocab)
        recorder.synchronize()
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    scores = [
        [float(logprobs[i, letter_ids[j]]) for j in range(len(q.choices or ()))]
        for i, q in enumerate(qs)
    ]
    acts: list[dict[str, Tensor]] = [{} for _ in ps]
    for name, chunks in recorder.chunks.items():
        shared, tail = chunks[0][0], chunks[1]  # (prefix, hidden), (batch, suffix, hidden)
        for i, s in enumerate(suffixes):
            acts[i][name] = select_tokens(
                torch.cat([shared, tail[i, : len(s)]]), spec.token_selection
            )
    nonfinite: list[dict[str, int]] = [{} for _ in ps]
    for name, counts in recorder.nonfinite.items():
        if len(counts) < 2:
            continue
        # (prefix,) and (batch, suffix)
        shared_counts, tail_counts = counts[0][0].cpu(), counts[1].cpu()
        for i, s in enumerate(suffixes):
            per_token = torch.cat([shared_counts, tail_counts[i, : len(s)]])
            if total := count_selected(per_token, spec.token_selection):
                nonfinite[i][name] = total
    ids = [torch.tensor(r) for r in rows]
    return _answers(ps, scores, ids, acts, nonfinite)


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for j in range(n):
        if any(r[j] != first[j] for r in rows[1:]):
            return j
    return n


def _head(lm: LoadedModel, hidden: Tensor) -> Tensor:
    """The model's output head on final hidden states (with Gemma-2-style logit soft-capping)."""
    head = lm.model.get_output_embeddings()  # type: ignore[operator]
    logits: Tensor = head(hidden)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _score_texts(
    lm: LoadedModel, prompt: str, q: Question, choice_format: ChoiceFormat, batch_size: int
) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the prompt.

    Hooks fire on these passes too, but the recorder keeps only the first forward of the batch.
    """
    conts = [
        f" {LETTERS[i]}" if choice_format == "letter" else f" {c}"
        for i, c in enumerate(q.choices or ())
    ]
    add_special = adds_special_tokens(lm.tokenizer)
    n_prompt = len(lm.tokenizer.encode(prompt, add_special_tokens=add_special))
    out: list[float] = []
    for start in range(0, len(conts), batch_size):
        texts = [prompt + c for c in conts[start : start + batch_size]]
        batch = encode(lm, texts)
        logprobs = torch.log_softmax(
            lm.model(**forward_kwargs(lm.model, batch)).logits.float(), dim=-1
        )
        for i in range(len(texts)):
            n_real = int(batch["attention_mask"][i].sum())
            n_cont = max(n_real - n_prompt, 1)
            targets = batch["input_ids"][i, -n_cont:]
            preds = logprobs[i, -n_cont - 1 : -1]
            out.append(float(preds.gather(1, targets[:, None]).sum()))
    return out
