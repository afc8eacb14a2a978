"""The evaluation runner: questions -> prompts -> batched answers -> grades -> records.

What one run does with its questions: plan them (modes, prompts, batches), answer and grade a
batch, and turn each answer into the record and the sample a writer takes; then summarise.
:func:`run_benchmark` runs it in this process through :mod:`actcap.bench.orchestrator`, which
holds the steps local and Ray runs share. Each finished sample is written (activation file,
then manifest line) as soon as its batch is done, so a crash loses at most the batch in flight;
``resume=True`` skips finished samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from actcap.bench.graders import Grade, get_grader, parse_number
from actcap.bench.prompts import Mode, build_prompt
from actcap.bench.questions import Benchmark, Question
from actcap.bench.scoring import Answer, ChoiceFormat, answer_generate, answer_loglik
from actcap.bench.summary import SummaryLine, summary_lines
from actcap.bench.verify import (
    VerificationWarning,
    compute_record,
    nonfinite_message,
    nonfinite_summary,
)
from actcap.capture.collect import GenerationOptions
from actcap.capture.sites import resolve_sites
from actcap.capture.spec import CaptureSpec
from actcap.capture.stats import StatsCollector
from actcap.errors import BenchmarkError
from actcap.models.chat import adds_special_tokens
from actcap.models.context import context_length, max_prompt_chars
from actcap.models.loading import LoadedModel
from actcap.storage.format import SampleMeta, utc_now
from actcap.storage.records import FinishedSample
from actcap.storage.writers import SampleWriter

ModeOption = Literal["auto", "generate", "loglik"]
DEFAULT_CAPTURE = CaptureSpec()


@dataclass(frozen=True)
class EvalOptions:
    """How to answer and grade."""

    mode: ModeOption = "auto"
    """``loglik`` for multiple choice and ``generate`` for the rest (``auto``), or one for all."""
    few_shot: int = 0
    """Solved examples shown before each question."""
    batch_size: int = 8
    """Questions per forward pass."""
    max_new_tokens: int = 64
    """Upper bound on a generated answer."""
    grader: str | None = None
    """Override every question's grader."""
    choice_format: ChoiceFormat = "letter"
    """Log-likelihood of the letters (MMLU style) or of the choice texts."""
    chat: bool | None = None
    """Force the chat template on or off."""
    limit: int | None = None
    """Answer only the first N questions."""
    sort_by_length: bool = True
    """Batch questions of one category and similar length together (less padding, shared
    few-shot prefixes; results are unchanged)."""
    prefix_cache: bool = True
    """In log-likelihood mode, run a batch's shared prompt prefix once and reuse its KV cache."""
    share_prefixes: bool = True
    """With every token kept, store the token prefix a group's prompts share (few-shot examples,
    a system prompt) once per run instead of in every sample (readers join it back)."""
    background_write: bool = True
    """Write sample files in a background thread (bounded queue) while the model computes."""
    overflow: Literal["error", "truncate"] = "error"
    """A prompt longer than the model's context: refuse (``error``), or keep its last tokens
    with a warning (``truncate``)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view for ``run.json``."""
        return dict(self.__dict__)


@dataclass
class EvalResult:
    """What an evaluation gives back."""

    accuracy: float
    """Share of graded samples that are correct."""
    n: int
    """Samples graded."""
    n_correct: int
    """Correct samples."""
    per_category: dict[str, dict[str, float]]
    """Category to ``{"accuracy", "n", "n_correct"}``."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """Manifest records, in question order."""
    out: Path | str | None = None
    """The run directory (or URL), when one was written."""
    wall_seconds: float = 0.0
    """Time spent answering in this call."""
    write_wait_seconds: float = 0.0
    """Time the model waited on a full write queue."""
    answered: int = 0
    """Questions answered in this call (not counting resumed ones)."""
    verification: dict[str, Any] | None = None
    """Stored activations re-checked against the model run on each prompt alone (``--verify``),
    as in ``results.json``; None when not run."""
    model: str = ""
    """The model, as the summary names it."""
    benchmark: str = ""
    """The benchmark's name."""

    def summary_lines(
        self, benchmark: str | None = None, model: str | None = None
    ) -> list[SummaryLine]:
        """What ``actcap eval`` prints at the end, line by line (see :mod:`actcap.bench.summary`).

        Args:
            benchmark: The benchmark's name as shown (default: :attr:`benchmark`).
            model: The model's name as shown (default: :attr:`model`).
        """
        return summary_lines(self, benchmark or self.benchmark, model or self.model)


def mode_for(q: Question, option: ModeOption) -> Mode:
    """Which answering mode a question gets.

    Raises:
        BenchmarkError: For log-likelihood on a question without choices.
    """
    if option == "auto":
        return "loglik" if q.is_multiple_choice else "generate"
    if option == "loglik" and not q.is_multiple_choice:
        raise BenchmarkError(
            f"Question {q.id!r} has no choices, so it cannot be answered by log-likelihood; use --mode generate or auto."
        )
    return option


def grader_name_for(q: Question, mode: Mode, benchmark: Benchmark, override: str | None) -> str:
    """The grader: the user's, the question's, the benchmark's, else one that fits the question."""
    if override:
        return override
    if mode == "loglik":
        return "choice"
    if q.grader:
        return q.grader
    if benchmark.default_grader:
        return benchmark.default_grader
    if q.is_multiple_choice:
        return "mc_letter"
    return "numeric" if parse_number(q.answer) is not None else "contains"


def fit_prompt(lm: LoadedModel, qid: str, prompt: str, room: int, overflow: str) -> str:
    """Check a prompt against the model's context; refuse it or keep its last tokens.

    Raises:
        BenchmarkError: When the prompt is too long and ``overflow`` is ``error``.
    """
    add_special = adds_special_tokens(lm.tokenizer)
    text = prompt
    if len(prompt) > max_prompt_chars(room):
        # Too long to fit whatever its tokens: never tokenise it all (memory grows with the text).
        if overflow != "truncate":
            raise BenchmarkError(
                f"Question {qid!r}: the prompt has {len(prompt):,} characters, far more than the "
                f"{room} tokens this model can take (context minus answer tokens); refused before "
                "tokenising it. Shorten the question, use fewer --few-shot examples, or "
                "--overflow truncate to keep its last tokens."
            )
        text = prompt[-max_prompt_chars(room) :]  # only its end is kept: tokenise no more
    ids = lm.tokenizer.encode(text, add_special_tokens=add_special)
    if len(ids) <= room and text is prompt:
        return prompt
    size = f"{len(ids)} tokens" if text is prompt else f"{len(prompt):,} characters"
    if overflow != "truncate":
        raise BenchmarkError(
            f"Question {qid!r}: the prompt has {size}, more than the {room} tokens this model "
            "can take (context minus answer tokens). Use fewer --few-shot examples, or "
            "--overflow truncate to keep its last tokens."
        )
    # Keep the end (the question itself); a little slack, as decoding and re-encoding can merge tokens.
    kept = lm.tokenizer.decode(ids[-max(room - 8, 1) :], skip_special_tokens=False)
    warnings.warn(
        f"Question {qid!r}: prompt truncated from {size} to its last {room - 8} tokens to fit the context.",
        stacklevel=3,
    )
    return str(kept)


def versions() -> dict[str, str]:
    """Library versions for the run record."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("actcap", "torch", "transformers", "safetensors", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def summarize(
    records: Sequence[Mapping[str, Any]],
) -> tuple[float, int, int, dict[str, dict[str, float]]]:
    """Accuracy overall and per category from manifest records."""
    graded = [r for r in records if r.get("correct") is not None]
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for r in graded:
        by_cat[str(r.get("category", ""))].append(bool(r["correct"]))
    n_correct = sum(bool(r["correct"]) for r in graded)
    per_cat = {
        c: {"accuracy": sum(v) / len(v), "n": len(v), "n_correct": sum(v)}
        for c, v in sorted(by_cat.items())
    }
    return (n_correct / len(graded) if graded else 0.0), len(graded), n_correct, per_cat


@dataclass(frozen=True)
class Planned:
    """A question ready to answer: how (mode) and with which exact prompt."""

    question: Question
    mode: Mode
    prompt: str


def plan_questions(
    lm: LoadedModel, bench: Benchmark, todo: Sequence[Question], options: EvalOptions
) -> list[Planned]:
    """Build and check every prompt, and order the questions as they will be batched.

    Log-likelihood questions come first, then generation; within a mode, questions of one
    category and similar length sit together (``sort_by_length``). Only the tokenizer and the
    config are used, so a model skeleton without weights plans as well as the real one.

    Raises:
        BenchmarkError: A question that cannot be answered as asked, or a prompt too long.
    """
    limit = context_length(lm)
    plan: list[Planned] = []
    for q in todo:
        mode = mode_for(q, options.mode)
        prompt = build_prompt(
            lm.tokenizer, q, bench.shots_for(q, options.few_shot), mode, options.chat
        )
        room = limit - (options.max_new_tokens if mode == "generate" else 0)
        plan.append(Planned(q, mode, fit_prompt(lm, q.id, prompt, room, options.overflow)))
    ordered: list[Planned] = []
    for mode in ("loglik", "generate"):
        group = [p for p in plan if p.mode == mode]
        if options.sort_by_length:
            group.sort(key=lambda p: (p.question.category, -len(p.prompt)))
        ordered += group
    return ordered


def plan_batches(plan: Sequence[Planned], batch_size: int) -> list[list[Planned]]:
    """Cut a plan into batches of at most ``batch_size`` questions of one mode."""
    out: list[list[Planned]] = []
    for item in plan:
        if out and len(out[-1]) < batch_size and out[-1][0].mode == item.mode:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def answer_batch(
    lm: LoadedModel,
    bench: Benchmark,
    batch: Sequence[Planned],
    capture: CaptureSpec | None,
    sites: Sequence[Any],
    options: EvalOptions,
    stats: StatsCollector | None = None,
) -> list[tuple[Question, Answer, dict[str, Any]]]:
    """Answer and grade one batch (any mix of modes: each mode runs as its own pass).

    ``stats`` accumulates statistics over every token read, each sample named by question id.
    """
    spec = capture if capture is not None else CaptureSpec(layers=[])
    out: list[tuple[Question, Answer, dict[str, Any]]] = []
    for mode in ("loglik", "generate"):
        part = [p for p in batch if p.mode == mode]
        if not part:
            continue
        questions = [p.question for p in part]
        texts = [p.prompt for p in part]
        if mode == "loglik":
            answers = answer_loglik(
                lm,
                questions,
                texts,
                spec,
                list(sites),
                options.batch_size,
                options.choice_format,
                options.prefix_cache,
                stats,
            )
        else:
            gen = GenerationOptions(max_new_tokens=options.max_new_tokens)
            answers = answer_generate(lm, texts, spec, list(sites), gen, options.batch_size, stats)
        if stats is not None:
            stats.sample_names.extend(q.id for q in questions)
        for q, a in zip(questions, answers, strict=True):
            out.append((q, a, _grade_and_record(q, a, mode, bench, options)))
    return out


def run_config(
    lm: LoadedModel,
    bench: Benchmark,
    capture: CaptureSpec | None,
    sites: Sequence[Any],
    options: EvalOptions,
    storage: str,
    questions: Sequence[Question] | None = None,
) -> dict[str, Any]:
    """What ``run.json`` records of a run.

    ``questions`` is the whole question set before ``--limit`` (default: ``bench``'s); its
    digest, and the resolved model, let a resume refuse another question set or model.
    """
    return {
        "model": lm.display_name,
        "model_source": lm.source,
        "model_id": model_id(lm.source),
        "questions_digest": questions_digest(bench.questions if questions is None else questions),
        "benchmark": bench.name,
        "n_questions": len(bench.questions),
        "capture": capture.to_json() if capture is not None else None,
        "sites": [s.name for s in sites],
        "options": options.to_json(),
        "storage": storage,
        "started": utc_now(),
        "versions": versions(),
        "compute": compute_record(lm),
    }


def model_id(source: str) -> str:
    """Which model a run used: the absolute real path of a local folder or file, else the hub id."""
    return os.path.realpath(source) if os.path.exists(source) else source


def questions_digest(questions: Sequence[Question]) -> str:
    """A digest of a question set: ids, questions, choices and answers, in order (sha256 hex)."""
    digest = hashlib.sha256()
    for q in questions:
        item = [q.id, q.question, list(q.choices) if q.choices else None, q.answer]
        digest.update(json.dumps(item, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


def run_sites(lm: LoadedModel, capture: CaptureSpec | None) -> list[Any]:
    """The capture sites of a run (none without capture)."""
    if capture is None:
        return []
    return resolve_sites(lm.model, lm.layout, capture.layers, capture.kinds)


def finish_run(
    writer: SampleWriter,
    bench: Benchmark,
    records: Mapping[str, dict[str, Any]],
    *,
    answered: int,
    wall: float,
    waited: float,
    extra: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Summarise the records in question order and write ``results.json``.

    Values the storage dtype could not hold (stored as inf/nan) are counted from the records,
    reported in ``results.json["nonfinite"]`` and warned about.
    """
    ordered = [records[q.id] for q in bench.questions if q.id in records]
    acc, n, n_correct, per_cat = summarize(ordered)
    nonfinite = nonfinite_summary(ordered)
    if nonfinite is not None:
        warnings.warn(nonfinite_message(nonfinite, "float16"), VerificationWarning, stacklevel=2)
    result = EvalResult(
        acc,
        n,
        n_correct,
        per_cat,
        ordered,
        writer.root,
        wall_seconds=wall,
        answered=answered,
        write_wait_seconds=waited,
    )
    writer.write_results(
        {
            "accuracy": acc,
            "n": n,
            "n_correct": n_correct,
            "per_category": per_cat,
            "n_questions": len(bench.questions),
            "answered_this_session": answered,
            "wall_seconds": round(wall, 3),
            "questions_per_second": round(answered / wall, 3) if wall > 0 and answered else None,
            "write_wait_seconds": round(waited, 3),
            **({"nonfinite": nonfinite} if nonfinite is not None else {}),
            **(extra or {}),
            "finished": utc_now(),
        }
    )
    return result


def _grade_and_record(
    q: Question, a: Answer, mode: Mode, bench: Benchmark, options: EvalOptions
) -> dict[str, Any]:
    grader_name = grader_name_for(q, mode, bench, options.grader)
    reference: Sequence[str] | str = (q.answer, *q.references) if q.references else q.answer
    grade: Grade = get_grader(grader_name)(a.response, reference)
    return {
        "id": q.id,
        **q.to_record(),
        "prompt": a.prompt,
        "response": a.response,
        "correct": grade.correct,
        "score": grade.score,
        "extracted": grade.extracted,
        "grader": grader_name,
        "mode": mode,
        "choice_logprobs": a.choice_logprobs,
        "n_prompt_tokens": int(a.input_ids.numel()),
        "n_output_tokens": int(a.output_ids.numel()) if a.output_ids is not None else 0,
        **({"nonfinite": a.nonfinite} if a.nonfinite else {}),
    }


def finished_sample(
    model_name: str,
    bench: Benchmark,
    q: Question,
    a: Answer,
    record: dict[str, Any],
    capture: CaptureSpec | None,
    shared_prefix: tuple[int, ...] = (),
) -> FinishedSample:
    """One answered question as the run writer takes it (``shared_prefix``: see EvalOptions)."""
    if capture is None:
        return FinishedSample(q.id, record)
    meta = SampleMeta(
        prompt=a.prompt,
        response=a.response,
        model=model_name,
        token_selection=capture.token_selection,
        dtype=capture.dtype,
        extra={
            "benchmark": bench.name,
            "question_id": q.id,
            "category": q.category,
            "reference": q.answer,
            "correct": record["correct"],
            "score": record["score"],
            "extracted": record["extracted"],
            "mode": record["mode"],
            "grader": record["grader"],
            **({"nonfinite": record["nonfinite"]} if record.get("nonfinite") else {}),
        },
    )
    return FinishedSample(
        q.id, record, a.activations, meta, a.input_ids, a.output_ids, shared_prefix
    )
