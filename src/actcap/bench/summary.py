"""What an evaluation prints once it is finished, as lines.

``actcap eval``, ``main.py`` and ``actcap eval --task`` all print these (through
:func:`actcap.api.print_summary`).

Accuracy overall and per category, the speed, where the files are, then the run's checks (values
the storage dtype could not hold, the verification verdict), so that a failed check is the last
line. A failed check is marked ``warning`` (printed in red on stderr).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actcap.bench.verify import nonfinite_message, nonfinite_summary, verification_from_json
from actcap.storage.layout import PREFIXES, SAMPLES, SHARDS
from actcap.storage.location import is_url, local_path
from actcap.storage.stats_file import STATS_FILE

if TYPE_CHECKING:
    from actcap.bench.runner import EvalResult


@dataclass(frozen=True)
class SummaryLine:
    """One line of an evaluation's printed summary."""

    text: str
    warning: bool = False
    """A failed check: printed in red on stderr."""


def summary_lines(result: EvalResult, benchmark: str, model: str) -> list[SummaryLine]:
    """The summary of ``result``, naming the benchmark and the model as given."""
    lines = [
        SummaryLine(
            f"{model} on {benchmark}: accuracy {result.accuracy:.3f} "
            f"({result.n_correct}/{result.n})"
        )
    ]
    for cat, r in result.per_category.items():
        lines.append(
            SummaryLine(
                f"  {cat or '(none)':<28} {r['accuracy']:.3f}  ({int(r['n_correct'])}/{int(r['n'])})"
            )
        )
    if result.answered and result.wall_seconds > 0:
        lines.append(
            SummaryLine(
                f"answered {result.answered} questions in {result.wall_seconds:.1f} s "
                f"({result.answered / result.wall_seconds:.2f} q/s)"
            )
        )
    if result.out is not None:
        lines.append(
            SummaryLine(
                f"run directory: {result.out}  (manifest.jsonl, results.json, "
                f"{activation_layout(result.out)})"
            )
        )
    return lines + check_lines(result)


def check_lines(result: EvalResult) -> list[SummaryLine]:
    """The run's checks: values the storage dtype could not hold, the verification verdict."""
    lines: list[SummaryLine] = []
    nonfinite = nonfinite_summary(result.records)
    if nonfinite is not None:
        message = nonfinite_message(nonfinite, "float16")
        lines.append(SummaryLine(f"WARNING: {message}", warning=True))
    verification = result.verification
    if not verification:
        return lines
    if verification.get("passed") is None:
        problems = "; ".join(verification.get("problems") or []) or "nothing to check"
        return [*lines, SummaryLine(f"verification: not run ({problems})")]
    line = verification_from_json(verification).summary()
    if verification["passed"]:
        return [*lines, SummaryLine(line)]
    return [*lines, SummaryLine(f"WARNING: {line}", warning=True)]


def activation_layout(out: Any) -> str:
    """Where a run's activations are: ``samples/``, ``shards/``, both, or none (no capture).

    Both appear when a resume changed the layout; ``prefixes/`` and ``stats.safetensors`` are
    named when the run has them.
    """
    if is_url(os.fspath(out)):
        return f"{SHARDS}/"
    root = local_path(out)
    used = [
        f"{name}/"
        for name in (SAMPLES, SHARDS)
        if (root / name).is_dir() and any(True for _ in (root / name).iterdir())
    ]
    if not used:
        return "no activation files: captured nothing"
    shared = (root / PREFIXES).is_dir() and any(True for _ in (root / PREFIXES).iterdir())
    extra = [f"{PREFIXES}/ (the shared prompt prefixes its samples need)"] if shared else []
    extra += [STATS_FILE] if (root / STATS_FILE).is_file() else []
    return ", ".join([" and ".join(used), *extra])
