"""lm-evaluation-harness with capture: an lm-eval model backed by actcap, and ``--task`` runs.

- :class:`ActcapLM`: an lm-eval ``LM`` (registered as ``actcap``) that answers every request type
  with actcap's batched engine and stores each document's activations in a run directory.
- :func:`run_tasks`: what ``actcap eval --task`` runs: lm-eval's tasks (its library and local
  YAMLs), prompts, few-shot sampling, filters and metrics, with actcap's run directory.

Needs the optional extra: ``pip install 'actcap[lm-eval]'``. Importing this package works without
it; using either name raises :class:`~actcap.errors.MissingDependencyError`. Using
:class:`ActcapLM` also wraps ``lm_eval.simple_evaluate`` so that runs get their per-document
metrics (see :func:`actcap.lm_eval.model.install_finish_hook`).
"""

from __future__ import annotations

from typing import Any

from actcap.errors import require

__all__ = ["ActcapLM", "run_tasks"]


def require_lm_eval(feature: str = "lm-evaluation-harness support") -> None:
    """Check that lm-eval is installed.

    Raises:
        MissingDependencyError: Saying to install ``actcap[lm-eval]``.
    """
    require("lm_eval", "lm-eval", feature)


def __getattr__(name: str) -> Any:
    """Import ``ActcapLM`` and ``run_tasks`` only when asked for (they import lm-eval)."""
    if name == "ActcapLM":
        require_lm_eval("actcap.lm_eval.ActcapLM")
        from actcap.lm_eval.model import ActcapLM

        return ActcapLM
    if name == "run_tasks":
        from actcap.lm_eval.runner import run_tasks

        return run_tasks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
