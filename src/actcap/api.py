"""The seed pipeline's public functions, kept with their names and return shapes.

``generate_inference_with_activations`` and ``load_activations`` are the core; the benchmark
functions (``answer_benchmark_question_with_activations``, ``answer_and_grade_benchmark_question``)
live in :mod:`actcap.bench.api` and are re-exported from the package root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actcap.capture.collect import CapturedSample, GenerationOptions, run_prompts
from actcap.capture.sites import LayerRequest, SiteKind
from actcap.capture.spec import CaptureSpec, TokenSelection
from actcap.errors import WriteError
from actcap.models.chat import format_prompt
from actcap.models.context import check_prompt_chars, check_prompt_length, context_length
from actcap.models.loading import LoadedModel, load_model
from actcap.storage.files import save_activations
from actcap.storage.format import SampleMeta, utc_now


def sample_to_dict(sample: CapturedSample, meta: SampleMeta) -> dict[str, Any]:
    """The seed's activation dictionary for one captured sample."""
    return {
        "prompt": meta.prompt,
        "response": meta.response,
        "model": meta.model,
        "timestamp": meta.timestamp,
        "input_ids": sample.input_ids,
        "output_ids": sample.output_ids,
        "activations": dict(sample.activations),
        "metadata": {
            "token_selection": meta.token_selection,
            "dtype": meta.dtype,
            "extra": meta.extra,
        },
    }


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
    if save_path is not None:
        _check_save_path(save_path)
    lm = load_model(model, device=device)
    spec = CaptureSpec(
        layers=layers_to_capture,
        kinds=tuple(sites),
        token_selection=token_selection,
        dtype=dtype,
        capture_generated=capture_generated,
    )
    room = context_length(lm) - max_new_tokens
    check_prompt_chars(prompt, room)  # before the template copies a text too long to fit
    text = format_prompt(lm.tokenizer, prompt, chat=chat)
    check_prompt_length(lm, text, room)
    (sample,) = run_prompts(
        lm, [text], spec, generation=GenerationOptions(max_new_tokens=max_new_tokens)
    )
    meta = SampleMeta(
        prompt=prompt,
        response=sample.response,
        model=lm.display_name,
        timestamp=utc_now(),
        token_selection=token_selection,
        dtype=spec.dtype,
        extra={"formatted_prompt": text, "capture_generated": capture_generated, **(extra or {})},
    )
    if save_path is not None:
        save_activations(
            save_path,
            sample.activations,
            meta,
            input_ids=sample.input_ids,
            output_ids=sample.output_ids,
        )
    return sample.response, sample_to_dict(sample, meta)


def _check_save_path(save_path: str | os.PathLike[str]) -> None:
    """Refuse a folder as the activation file's name, before any work is done.

    Raises:
        WriteError: When ``save_path`` is an existing folder.
    """
    if Path(save_path).is_dir():
        raise WriteError(
            f"{os.fspath(save_path)}: is a folder; save_path (CLI: --save) needs a file name, "
            f"e.g. {Path(save_path) / 'activations.safetensors'}."
        )
