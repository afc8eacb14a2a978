"""The typed records a sample travels in, from the answer to the writer to the reader.

- :class:`FinishedSample` is one answered question on its way to a run writer: its manifest
  fields, and (with capture) its activations, file metadata and token ids. Every writer (the run
  directory, an object store, the background thread, a Ray actor, lm-eval's bridge) takes one.
- :class:`ManifestLine` is what a line of ``manifest.jsonl`` holds: JSON is the point, so it is a
  ``TypedDict``. The reader hands it back inside a ``ManifestEntry``.

The fields are described in ``docs/format.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from torch import Tensor

from actcap.storage.format import SampleMeta


class ManifestLine(TypedDict, total=False):
    """One line of ``manifest.jsonl`` (every key but ``id`` and ``file`` is optional)."""

    id: str
    """The question id (unique in the run)."""
    file: str | None
    """The activation file (or shard) relative to the run; None when capture was off."""
    offset: int
    """In a shard: where the sample's safetensors bytes begin."""
    length: int
    """In a shard: how many bytes they take."""
    question: str
    choices: list[str] | None
    answer: str
    category: str | None
    prompt: str
    response: str
    correct: bool | None
    score: float | None
    extracted: str | None
    grader: str
    mode: str
    choice_logprobs: list[float] | None
    n_prompt_tokens: int
    n_output_tokens: int
    nonfinite: dict[str, int]
    prefix: str
    """The shared prefix holding the sample's first rows (``prefixes/<prefix>.safetensors``)."""


@dataclass(frozen=True)
class FinishedSample:
    """One answered question, ready to be written into a run.

    ``record`` becomes the manifest line (after ``id``, ``file`` and, in a shard, ``offset`` and
    ``length``, which the writer sets); ``activations`` and ``meta`` are both given or both None
    (capture off: a manifest line and no file).
    """

    id: str
    record: Mapping[str, Any]
    activations: Mapping[str, Tensor] | None = None
    meta: SampleMeta | None = None
    input_ids: Tensor | None = None
    output_ids: Tensor | None = None
    shared_prefix: tuple[int, ...] = ()
    """Token ids this prompt shares with others of its run; with every token kept, the writer
    stores their rows once for the run (:mod:`actcap.storage.prefixes`). Empty: nothing shared."""


def activation_dict(
    meta: SampleMeta,
    activations: Mapping[str, Tensor],
    input_ids: Tensor | None,
    output_ids: Tensor | None,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """The seed pipeline's activation dictionary: the one shape ``load_activations`` returns.

    ``{"prompt", "response", "model", "timestamp", "input_ids", "output_ids",
    "activations": {site: tensor}, "metadata": {...}}``; the compatibility functions of
    :mod:`actcap.compat` return it too.
    """
    return {
        "prompt": meta.prompt,
        "response": meta.response,
        "model": meta.model,
        "timestamp": meta.timestamp,
        "input_ids": input_ids,
        "output_ids": output_ids,
        "activations": dict(activations),
        "metadata": dict(metadata),
    }
