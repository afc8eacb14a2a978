"""actcap: capture a language model's activations while it answers benchmark questions.

The verbs a user needs are importable from here: the facade's (:mod:`actcap.api`:
``evaluate``, ``analyse``, ``export``, and ``capture`` as ``actcap.api.capture``, since
``actcap.capture`` is the subpackage) and the seed pipeline's (:mod:`actcap.compat`). Everything
else lives in the subpackages (``actcap.models``, ``actcap.capture``, ``actcap.storage``,
``actcap.bench``, ``actcap.analysis``). Imports are lazy, so ``import actcap`` (and
``actcap --help``) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "evaluate": "actcap.api",
    "analyse": "actcap.api",
    "export": "actcap.api",
    "generate_inference_with_activations": "actcap.compat",
    "load_activations": "actcap.storage.files",
    "save_activations": "actcap.storage.files",
    "ActivationFile": "actcap.storage.files",
    "SampleMeta": "actcap.storage.format",
    "load_model": "actcap.models.loading",
    "CaptureSpec": "actcap.capture.spec",
    "run_prompts": "actcap.capture.collect",
    "ActcapError": "actcap.errors",
    "answer_benchmark_question_with_activations": "actcap.compat",
    "answer_and_grade_benchmark_question": "actcap.compat",
    "load_benchmark": "actcap.bench.sources",
    "run_benchmark": "actcap.bench.orchestrator",
}

__all__ = [
    "ActcapError",
    "ActivationFile",
    "CaptureSpec",
    "SampleMeta",
    "__version__",
    "analyse",
    "answer_and_grade_benchmark_question",
    "answer_benchmark_question_with_activations",
    "evaluate",
    "export",
    "generate_inference_with_activations",
    "load_activations",
    "load_benchmark",
    "load_model",
    "run_benchmark",
    "run_prompts",
    "save_activations",
]

if TYPE_CHECKING:
    from actcap.api import analyse, evaluate, export
    from actcap.bench.orchestrator import run_benchmark
    from actcap.bench.sources import load_benchmark
    from actcap.capture.collect import run_prompts
    from actcap.capture.spec import CaptureSpec
    from actcap.compat import (
        answer_and_grade_benchmark_question,
        answer_benchmark_question_with_activations,
        generate_inference_with_activations,
    )
    from actcap.errors import ActcapError
    from actcap.models.loading import load_model
    from actcap.storage.files import load_activations, save_activations
    from actcap.storage.format import SampleMeta
    from actcap.storage.reader import ActivationFile


def __getattr__(name: str) -> Any:
    """Import public names on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'actcap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the public names."""
    return __all__
