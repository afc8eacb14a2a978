"""The seed pipeline's public functions, kept with their names, arguments and return shapes.

The pipeline actcap grew from offered ``generate_inference_with_activations``,
``answer_benchmark_question_with_activations``, ``answer_and_grade_benchmark_question`` and
``load_activations``; they live here, on top of the facade (:mod:`actcap.api`), and the package
root re-exports them. New code calls :func:`actcap.capture` and :func:`actcap.evaluate`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from actcap.api import capture, load_model
from actcap.bench.graders import get_grader
from actcap.bench.prompts import Mode, build_prompt
from actcap.bench.questions import Benchmark, Question
from actcap.bench.runner import ModeOption, grader_name_for, mode_for
from actcap.bench.scoring import Answer, answer_generate, answer_loglik
from actcap.capture.collect import GenerationOptions
from actcap.capture.sites import LayerRequest, SiteKind, resolve_sites
from actcap.capture.spec import CaptureSpec, TokenSelection
from actcap.models.loading import LoadedModel
from actcap.storage.files import load_activations, save_activations
from actcap.storage.format import SampleMeta
from actcap.storage.layout import sample_filename
from actcap.storage.records import activation_dict

__all__ = [
    "answer_and_grade_benchmark_question",
    "answer_benchmark_question_with_activations",
    "as_question",
    "generate_inference_with_activations",
    "load_activations",
]


def generate_inference_with_activations(
    prompt: str,
    model: str | LoadedModel = "default",
    save_path: str | os.PathLike[str] | None = None,
    layers_to_capture: LayerRequest = None,
    *,
    max_new_tokens: int = 128,
    token_selection: TokenSelection = "all",
    dtype: str = "float32",
    sites: Sequence[SiteKind] = ("resid",),
    capture_generated: bool = False,
    chat: bool | None = None,
    device: str = "auto",
    extra: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Answer a prompt and return the answer with the activations recorded while reading it.

    Args:
        prompt: The user's message; the model's chat template is applied when it has one.
        model: ``"default"`` (built-in SmolLM2-135M-Instruct), a hub id, a local folder, a
            ``.gguf`` file, or an already loaded model. Loaded once per process.
        save_path: Also write a ``.safetensors`` activation file here.
        layers_to_capture: ``None`` for embeddings plus every layer; indices (``[0, 5, -1]``),
            ranges (``"0-3"``) or site names (``["layer_2", "layer_2.mlp"]``).
        max_new_tokens: Upper bound on the answer's length.
        token_selection: ``all`` tokens, the ``last`` one, or their ``mean``.
        dtype: Storage dtype: ``float32``, ``float16`` or ``bfloat16``.
        sites: For layers given by index: ``resid``, ``attn``, ``mlp``.
        capture_generated: Also capture the answer's tokens (one tensor covers prompt and answer).
        chat: Force the chat template on or off (default: use it when the model has one).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        extra: Anything to store in the file's ``extra`` metadata.

    Returns:
        ``(response, activation_data)``, where ``activation_data`` is the dictionary that
        :func:`actcap.load_activations` returns for the saved file.

    Raises:
        WriteError: When ``save_path`` is a folder (checked before the model is loaded).
        CaptureError: When the prompt is longer than the model's context less
            ``max_new_tokens`` (a prompt far too long is refused before it is tokenised).

    Example:
        >>> response, data = generate_inference_with_activations(
        ...     "What is the capital of France?", "default", layers_to_capture=[0, -1])
        >>> response
        'The capital of France is Paris.'
    """
    (captured,) = capture(
        prompt,
        model,
        layers=layers_to_capture,
        sites=sites,
        token_selection=token_selection,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        capture_generated=capture_generated,
        chat=chat,
        device=device,
        save=save_path,
        extra=extra,
    )
    return captured.response, captured.to_dict()


def as_question(question: Question | Mapping[str, Any]) -> Question:
    """Accept the project's ``Question`` or a dict with ``question``, ``answer`` and maybe ``choices``."""
    if isinstance(question, Question):
        return question
    data = dict(question)
    if "id" not in data:
        data["id"] = "q-" + hashlib.sha256(str(data.get("question", "")).encode()).hexdigest()[:12]
    return Question.from_dict(data)


def _answer(
    q: Question,
    lm: LoadedModel,
    spec: CaptureSpec,
    capture: bool,
    mode: ModeOption,
    max_new_tokens: int,
) -> tuple[Answer, Mode]:
    m = mode_for(q, mode)
    prompt = build_prompt(lm.tokenizer, q, (), m)
    sites = resolve_sites(lm.model, lm.layout, spec.layers, spec.kinds) if capture else []
    if m == "loglik":
        (a,) = answer_loglik(lm, [q], [prompt], spec, sites, 1)
    else:
        (a,) = answer_generate(
            lm, [prompt], spec, sites, GenerationOptions(max_new_tokens=max_new_tokens), 1
        )
    return a, m


def answer_benchmark_question_with_activations(
    question: Question | Mapping[str, Any],
    model: str | LoadedModel = "default",
    save_activations: bool = True,
    activation_save_dir: str | os.PathLike[str] = "activations",
    *,
    layers_to_capture: LayerRequest = None,
    token_selection: TokenSelection = "all",
    dtype: str = "float32",
    mode: ModeOption = "generate",
    max_new_tokens: int = 64,
) -> tuple[str, dict[str, Any]]:
    """Answer one benchmark question and capture the activations of its prompt.

    Args:
        question: A ``Question`` or a dict with ``question``, ``answer``, optional ``choices``
            and ``id``.
        model: ``"default"``, a hub id, a folder, a ``.gguf`` file or a loaded model.
        save_activations: Write ``<activation_save_dir>/<id>.safetensors``.
        activation_save_dir: Where to write it.
        layers_to_capture: As in :func:`actcap.generate_inference_with_activations`.
        token_selection: ``all``, ``last`` or ``mean``.
        dtype: Storage dtype.
        mode: ``generate`` (default), ``loglik`` (multiple choice only) or ``auto``.
        max_new_tokens: Upper bound on the answer.

    Returns:
        ``(response, activation_data)`` with the same keys as ``load_activations`` gives, plus
        ``file`` (the path written, or None).
    """
    q = as_question(question)
    lm = load_model(model)
    spec = CaptureSpec(layers=layers_to_capture, token_selection=token_selection, dtype=dtype)
    a, m = _answer(q, lm, spec, True, mode, max_new_tokens)
    meta = _meta(
        a, lm, spec, {"question_id": q.id, "reference": q.answer, "category": q.category, "mode": m}
    )
    path: Path | None = None
    if save_activations:
        path = save_activations_file(Path(activation_save_dir) / sample_filename(q.id), a, meta)
    metadata = {"token_selection": token_selection, "dtype": spec.dtype, "extra": meta.extra}
    data = activation_dict(meta, a.activations, a.input_ids, a.output_ids, metadata)
    data["file"] = str(path) if path else None
    return a.response, data


def _meta(a: Answer, lm: LoadedModel, spec: CaptureSpec, extra: dict[str, Any]) -> SampleMeta:
    """The activation file's metadata for one answer."""
    return SampleMeta(
        prompt=a.prompt,
        response=a.response,
        model=lm.display_name,
        token_selection=spec.token_selection,
        dtype=spec.dtype,
        extra=extra,
    )


def save_activations_file(path: Path, a: Answer, meta: SampleMeta) -> Path:
    """Write an answer's activations (the seed's ``save_activations`` flag shadows the storage verb)."""
    return save_activations(
        path, a.activations, meta, input_ids=a.input_ids, output_ids=a.output_ids
    )


def answer_and_grade_benchmark_question(
    question: Question | Mapping[str, Any],
    model: str | LoadedModel = "default",
    *,
    grader: str | None = None,
    mode: ModeOption = "auto",
    max_new_tokens: int = 64,
    capture_activations: bool = False,
    activation_save_dir: str | os.PathLike[str] = "activations",
    layers_to_capture: LayerRequest = None,
    token_selection: TokenSelection = "all",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Answer and grade one question; with ``capture_activations=True`` also save its activations.

    Without capture this behaves as the seed pipeline did (no files written).

    Returns:
        ``{"id", "question", "reference", "response", "correct", "score", "extracted", "grader",
        "mode", "activation_file"}`` (``activation_file`` is None without capture).
    """
    q = as_question(question)
    lm = load_model(model)
    spec = CaptureSpec(layers=layers_to_capture, token_selection=token_selection, dtype=dtype)
    a, m = _answer(q, lm, spec, capture_activations, mode, max_new_tokens)
    bench = Benchmark("single", [q])
    name = grader_name_for(q, m, bench, grader)
    grade = get_grader(name)(a.response, (q.answer, *q.references) if q.references else q.answer)
    result: dict[str, Any] = {
        "id": q.id,
        "question": q.question,
        "reference": q.answer,
        "response": a.response,
        "correct": grade.correct,
        "score": grade.score,
        "extracted": grade.extracted,
        "grader": name,
        "mode": m,
        "activation_file": None,
    }
    if capture_activations:
        extra = {"question_id": q.id, "reference": q.answer, "correct": grade.correct}
        meta = _meta(a, lm, spec, {**extra, "score": grade.score, "grader": name, "mode": m})
        path = save_activations_file(Path(activation_save_dir) / sample_filename(q.id), a, meta)
        result["activation_file"] = str(path)
    return result
