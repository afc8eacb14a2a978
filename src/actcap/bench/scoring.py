"""Answering questions in batches: generation, and multiple-choice log-likelihood.

Both run left-padded batches with position ids counted over real tokens, so a batch gives the same
answers as one question at a time, and both record activations through :mod:`actcap.capture`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from actcap.bench.questions import LETTERS, Question
from actcap.capture.collect import (
    GenerationOptions,
    encode,
    forward_kwargs,
    make_recorder,
    run_prompts,
    split_samples,
)
from actcap.capture.hooks import recording
from actcap.capture.sites import Site
from actcap.capture.spec import CaptureSpec
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


def answer_generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    spec: CaptureSpec,
    sites: Sequence[Site],
    generation: GenerationOptions,
    batch_size: int,
) -> list[Answer]:
    """Generate answers (greedy by default), capturing ``sites`` (none for evaluation only)."""
    samples = run_prompts(
        lm, prompts, spec, generation=generation, batch_size=batch_size, sites=sites
    )
    return [Answer(s.prompt, s.response, s.input_ids, s.activations, s.output_ids) for s in samples]


def _single_token_ids(lm: LoadedModel, texts: Sequence[str]) -> list[int] | None:
    ids = [lm.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


def _accepts_logits_to_keep(model: object) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def answer_loglik(
    lm: LoadedModel,
    questions: Sequence[Question],
    prompts: Sequence[str],
    spec: CaptureSpec,
    sites: Sequence[Site],
    batch_size: int,
    choice_format: ChoiceFormat = "letter",
) -> list[Answer]:
    """Score each choice's log-likelihood after the prompt and pick the most likely.

    With ``letter`` (the usual MMLU scoring) the continuations are `` A``, `` B``, ...: one token
    each, so one forward pass per batch, reading logits at the last position only. With ``text``,
    or letters that are not single tokens, each choice's text is scored as a continuation.
    """
    answers: list[Answer] = []
    recorder = make_recorder(lm, spec, sites, generating=False)
    keep_last = _accepts_logits_to_keep(lm.model)
    with recording(lm.model, recorder):
        for start in range(0, len(prompts), batch_size):
            qs = list(questions[start : start + batch_size])
            ps = list(prompts[start : start + batch_size])
            recorder.reset()
            recorder.batch_size = len(ps)
            batch = encode(lm, ps)
            letter_ids = None
            if choice_format == "letter":
                n_choices = max(len(q.choices or ()) for q in qs)
                letter_ids = _single_token_ids(lm, [f" {LETTERS[i]}" for i in range(n_choices)])
            if letter_ids is not None:
                kwargs = forward_kwargs(lm.model, batch)
                if keep_last:
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
            per_sample = split_samples(recorder, batch["attention_mask"], spec)
            for i, (p, s) in enumerate(zip(ps, scores, strict=True)):
                chosen = max(range(len(s)), key=s.__getitem__)
                ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].cpu()
                answers.append(Answer(p, LETTERS[chosen], ids, per_sample[i], None, s))
    return answers


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
    add_special = not bool(getattr(lm.tokenizer, "chat_template", None))
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
