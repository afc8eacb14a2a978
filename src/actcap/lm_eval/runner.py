"""``actcap eval --task``: lm-eval's tasks answered by :class:`~actcap.lm_eval.model.ActcapLM`.

Tasks are resolved by lm-eval's ``TaskManager`` (its library, and local YAMLs under
``tasks_path``); prompts, few-shot sampling, filters and metrics are lm-eval's. The run directory
is actcap's: one sample per document (``<task>/<doc_id>``), the lock, ``--resume``, and a
``results.json`` holding lm-eval's aggregated metrics with their standard errors beside actcap's
summary.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actcap.bench import EvalResult
from actcap.capture import CaptureSpec
from actcap.errors import ActcapError, BenchmarkError, UnknownNameError
from actcap.lm_eval import require_lm_eval
from actcap.models import LoadedModel
from actcap.storage.layout import SHARD_BYTES


@dataclass
class TaskRunResult(EvalResult):
    """An evaluation's result, with lm-eval's own aggregated metrics."""

    lm_eval: dict[str, Any] = field(default_factory=dict)
    """``results.json["lm_eval"]``: per task and group, each metric and its standard error."""


def task_manager(names: Sequence[str], tasks_path: str | os.PathLike[str] | None) -> Any:
    """lm-eval's task index, with the YAMLs under ``tasks_path`` (which win over the library's).

    When every name is found under ``tasks_path``, the library (about 15,000 names, several
    seconds to index) is left out; the tasks found are the same.

    Raises:
        BenchmarkError: When ``tasks_path`` does not exist.
    """
    from lm_eval.tasks import TaskManager

    if tasks_path is None:
        return TaskManager()
    path = Path(tasks_path).expanduser()
    if not path.exists():
        raise BenchmarkError(
            f"--tasks-path {os.fspath(tasks_path)}: no such file or folder. Give the folder "
            "holding your task YAMLs."
        )
    local = TaskManager(include_path=str(path), include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    return TaskManager(include_path=str(path))


def check_names(manager: Any, names: Sequence[str], tasks_path: Any) -> None:
    """Refuse task names lm-eval does not know, with the nearest ones.

    Raises:
        UnknownNameError: Naming the unknown tasks and suggesting others.
    """
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    where = f" nor under --tasks-path {tasks_path}" if tasks_path else ""
    raise UnknownNameError(
        f"Unknown lm-eval task(s) {', '.join(map(repr, unknown))}: not in lm-eval's library"
        f"{where}.{hint} `lm-eval ls tasks` lists the library."
    )


def load_tasks(manager: Any, names: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    """lm-eval's task objects: what to pass to ``simple_evaluate``, and every task by name.

    Raises:
        BenchmarkError: When lm-eval cannot build a task (a YAML error, missing data files).
    """
    try:
        loaded = manager.load(list(names))
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise anything; one line for the user
        raise BenchmarkError(
            f"lm-eval could not load task(s) {', '.join(names)}: {type(e).__name__}: "
            f"{' '.join(str(e).split())}"
        ) from e
    groups, tasks = loaded.get("groups", {}), loaded["tasks"]
    top = [groups.get(n) or tasks.get(n) for n in names]
    # A tag expands to many tasks under no single object: pass the names (built again).
    return (top if all(t is not None for t in top) else list(names)), dict(tasks)


def count_docs(tasks: dict[str, Any], limit: int | None) -> int:
    """Documents the run will answer (lm-eval's ``limit`` applies per task)."""
    total = 0
    for task in tasks.values():
        n = len(task.eval_docs)
        total += min(n, limit) if limit else n
    return total


def run_tasks(
    lm: LoadedModel,
    names: Sequence[str],
    *,
    out: str | os.PathLike[str] | None,
    capture: CaptureSpec | None = None,
    tasks_path: str | os.PathLike[str] | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    batch_size: int = 8,
    limit: int | None = None,
    resume: bool = False,
    storage: str = "auto",
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> TaskRunResult:
    """Evaluate ``lm`` on lm-eval tasks, storing each document's activations in ``out``.

    Args:
        lm: The model.
        names: lm-eval task, group or tag names.
        out: The run directory; None evaluates without writing anything.
        capture: What to capture; None writes the manifest only.
        tasks_path: A folder (or file) of task YAMLs, searched before lm-eval's library.
        num_fewshot: Few-shot examples; each task's own default when None.
        apply_chat_template: Format prompts with the model's chat template (lm-eval's option).
        batch_size: Documents per forward pass.
        limit: At most this many documents per task.
        resume: Continue a run in ``out``: finished documents are answered from it.
        storage: ``files``, ``shards`` or ``auto``.
        shard_bytes: Shard size.
        progress: Progress bars.

    Returns:
        actcap's summary (accuracy from each document's main metric, per task) and lm-eval's
        aggregated metrics.

    Raises:
        MissingDependencyError: Without lm-eval.
        UnknownNameError: For a task lm-eval does not know.
        BenchmarkError: When lm-eval cannot load a task or fails while evaluating.
        RunError: The run directory is locked, holds another run, or a resume differs.
    """
    require_lm_eval("actcap eval --task")
    import lm_eval.evaluator as evaluator

    from actcap.lm_eval.model import ActcapLM

    manager = task_manager(names, tasks_path)
    check_names(manager, names, tasks_path)
    top, tasks = load_tasks(manager, names)
    options = {
        "tasks": list(names),
        "tasks_path": os.path.abspath(tasks_path) if tasks_path is not None else None,
        "num_fewshot": num_fewshot,
        "apply_chat_template": apply_chat_template,
        "limit": limit,
    }
    spec = capture or CaptureSpec()
    model = ActcapLM(
        lm,
        capture_dir=out,
        layers=spec.layers,
        sites=spec.kinds,
        token_selection=spec.token_selection,
        dtype=spec.dtype,
        capture_generated=spec.capture_generated,
        capture=capture is not None,
        batch_size=batch_size,
        storage=storage,
        shard_bytes=shard_bytes,
        resume=resume,
        progress=progress,
        benchmark="lm-eval:" + ",".join(names),
        options=options,
        n_docs=count_docs(tasks, limit),
    )
    evaluate = getattr(evaluator.simple_evaluate, "__wrapped__", evaluator.simple_evaluate)
    try:
        results = evaluate(
            model=model,
            tasks=top,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            apply_chat_template=apply_chat_template,
            log_samples=True,
        )
    except ActcapError:
        model.close()
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval raises anything; one line for the user
        model.close()
        raise BenchmarkError(
            f"lm-eval failed on task(s) {', '.join(names)}: {type(e).__name__}: "
            f"{' '.join(str(e).split())}"
        ) from e
    except BaseException:
        model.close()  # Ctrl-C: every document answered so far is in the run
        raise
    summary = model.finish(results, tasks) or {}
    return _result(model, summary, results)


def _result(model: Any, summary: dict[str, Any], results: dict[str, Any]) -> TaskRunResult:
    """The summary as actcap's :class:`~actcap.bench.EvalResult`, with lm-eval's metrics."""
    if not summary:  # no run directory: summarise lm-eval's samples directly
        from actcap.lm_eval import records

        lines: list[dict[str, Any]] = []
        for task, examples in (results.get("samples") or {}).items():
            seen = {ex["doc_id"] for ex in examples}
            lines += [{"task": task, "doc_id": d, "prompt_hash": None} for d in sorted(seen)]
        records.attach_metrics(lines, results.get("samples") or {}, results.get("configs") or {})
        summary = {**records.summarize(lines), "answered_this_session": len(lines)}
    return TaskRunResult(
        accuracy=summary.get("accuracy", 0.0),
        n=summary.get("n", 0),
        n_correct=summary.get("n_correct", 0),
        per_category=summary.get("per_category", {}),
        out=model.capture_dir,
        wall_seconds=float(summary.get("wall_seconds") or 0.0),
        write_wait_seconds=float(summary.get("write_wait_seconds") or 0.0),
        answered=int(summary.get("answered_this_session") or 0),
        lm_eval=dict(results.get("results") or {}),
    )


def run_lm_eval_cli(argv: Sequence[str]) -> None:
    """Run lm-eval's own command line on ``argv``, with :class:`ActcapLM` registered as ``actcap``.

    Runs of ``--model actcap`` get their per-document metrics and ``results.json`` when lm-eval
    has scored them (the ``simple_evaluate`` wrapper of :mod:`actcap.lm_eval.model`).

    Raises:
        MissingDependencyError: Without lm-eval.
        BenchmarkError: When lm-eval refuses the arguments (an unknown task, a bad option value).
    """
    require_lm_eval("actcap lm-eval")
    import sys

    from lm_eval.__main__ import cli_evaluate

    import actcap.lm_eval.model  # noqa: F401 - registers 'actcap', wraps simple_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except ValueError as e:  # lm-eval's word for arguments it cannot use
        raise BenchmarkError(f"lm-eval: {e}. See 'actcap lm-eval --help'.") from e
    finally:
        sys.argv = saved
