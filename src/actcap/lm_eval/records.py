"""Manifest records of lm-eval documents: what is written at answer time, and what scoring adds.

A document's sample is written as soon as its batch is answered (activations, context,
continuations or generated text, log-likelihoods), with ``correct`` still None: lm-eval scores a
document only after every request of every task has been answered. Once it has, the run's
manifest is rewritten whole, atomically, with each document's metrics (:func:`attach_metrics`).
So a crash loses no answered document, and a resume, which answers finished documents from
their records, lets lm-eval score them and attaches the metrics then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

from actcap.bench.runner import summarize as summarize_records
from actcap.errors import RunError

RESERVED = frozenset(
    {
        "id",
        "file",
        "offset",
        "length",
        "task",
        "doc_id",
        "category",
        "question",
        "prompt",
        "response",
        "reference",
        "correct",
        "score",
        "metrics",
        "main_metric",
        "filter",
        "extracted",
    }
)
"""Record fields a metric of the same name never overwrites (it stays in ``metrics``)."""


def lm_eval_version() -> str:
    """The installed lm-eval's version, for the run record."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "not installed"


def sample_id(task: str, doc_id: int) -> str:
    """A document's sample id: ``<task>/<doc_id>``."""
    return f"{task}/{doc_id}"


def prompt_hash(text: str) -> str:
    """lm-eval's ``prompt_hash`` of a logged sample (SHA-256 of its first request's context)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plain(value: Any) -> Any:
    """A JSON-ready copy: tuples as lists, numpy numbers as Python numbers, the rest as text."""

    def default(o: Any) -> Any:
        item = getattr(o, "item", None)
        if callable(item):
            try:
                return item()
            except (TypeError, ValueError):
                pass
        if isinstance(o, set | frozenset):
            return sorted(o, key=str)
        return str(o)

    return json.loads(json.dumps(value, default=default, ensure_ascii=False))


def base_record(task: str, doc_id: int, request_type: str, prompt: str) -> dict[str, Any]:
    """The fields every document's record has before lm-eval scores it."""
    return {
        "task": task,
        "doc_id": doc_id,
        "category": task,
        "request_type": request_type,
        "prompt": prompt,
        "prompt_hash": prompt_hash(prompt),
        "correct": None,
        "score": None,
    }


def check_resumed(
    record: Mapping[str, Any],
    root: Any,
    contexts: Sequence[str],
    expected: Mapping[str, Any],
    answers: tuple[str, int],
) -> None:
    """Refuse to reuse a finished document answered for other requests than lm-eval asks now.

    Args:
        record: The document's manifest line.
        root: The run (for the message).
        contexts: The context of each request now, in order.
        expected: Record fields and what they must hold (the continuations, the generation
            settings).
        answers: The record field holding the answers, and how many it must have.

    Raises:
        RunError: When anything differs (the task, its few-shot examples, the chat template or
            the generation settings changed since the run was written).
    """
    stored = record.get("contexts") or [record.get("prompt")] * len(contexts)
    field, count = answers
    held = record.get(field)
    same = (
        list(stored) == list(contexts)
        and all(plain(record.get(k)) == plain(v) for k, v in expected.items())
        and isinstance(held, list)
        and len(held) == count
    )
    if not same:
        raise RunError(
            f"{root}: sample {record.get('id')!r} was answered for other requests than lm-eval "
            "asks now (the task, its few-shot examples, the chat template or the generation "
            "settings changed). Resume with the run's settings, or choose another --out."
        )


def _main_metric(config: Mapping[str, Any], names: Sequence[str]) -> str:
    """The task's first metric (its ``metric_list``), else the first one lm-eval reported."""
    listed = config.get("metric_list")
    if isinstance(listed, list) and listed and isinstance(listed[0], dict):
        first = listed[0].get("metric")
        if isinstance(first, str) and first in names:
            return first
    return names[0]


def _reference(target: Any, record: Mapping[str, Any]) -> Any:
    """The gold answer as text: a choice index becomes that choice."""
    choices = record.get("continuations")
    if isinstance(target, int) and isinstance(choices, list) and 0 <= target < len(choices):
        return str(choices[target]).strip()
    return plain(target)


def _as_grade(value: Any) -> bool | None:
    """A 0/1 metric as a grade; any other value (a perplexity, a BLEU score) grades nothing."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    return None


def attach_metrics(
    records: Iterable[dict[str, Any]],
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
    configs: Mapping[str, Mapping[str, Any]],
    doc_text: Callable[[str, Any], str | None] | None = None,
) -> int:
    """Add lm-eval's per-document metrics to the records of the documents it scored, in place.

    Each scored record gets ``metrics`` (``"metric,filter"`` to value, every filter), the main
    filter's metrics as top-level fields (``acc``, ``acc_norm``, ``exact_match``, ...),
    ``main_metric``, ``score`` (its value), ``correct`` (the score as a grade when it is 0 or 1),
    ``reference``, ``extracted`` (the main filter's answer) and, when ``doc_text`` gives one,
    ``question``.

    Args:
        records: Manifest records (with ``task`` and ``doc_id``).
        samples: ``results["samples"]`` of ``simple_evaluate(..., log_samples=True)``.
        configs: ``results["configs"]`` (for each task's main metric).
        doc_text: ``(task, doc) -> question text``, when the tasks are at hand.

    Returns:
        How many records got metrics. A logged sample whose prompt differs from the record's
        (another document under the same id) is left out.
    """
    index = {(r.get("task"), r.get("doc_id")): r for r in records}
    scored: set[tuple[Any, Any]] = set()
    for task, examples in samples.items():
        main_filter = examples[0].get("filter", "none") if examples else "none"
        for ex in examples:
            key = (task, ex.get("doc_id"))
            record = index.get(key)
            if record is None or _other_prompt(record, ex):
                continue
            if key not in scored:
                record["metrics"] = {}
                scored.add(key)
            names = [str(m) for m in ex.get("metrics", [])]
            values = {m: plain(ex.get(m)) for m in names}
            where = str(ex.get("filter", "none"))
            record["metrics"].update({f"{m},{where}": v for m, v in values.items()})
            if where != main_filter or not names:
                continue
            _attach_main(record, task, ex, values, configs.get(task, {}), where, doc_text)
    return len(scored)


def _other_prompt(record: Mapping[str, Any], ex: Mapping[str, Any]) -> bool:
    """Whether a logged sample was asked with another prompt than the record's."""
    ours, theirs = record.get("prompt_hash"), ex.get("prompt_hash")
    return bool(ours and theirs and ours != theirs)


def _attach_main(
    record: dict[str, Any],
    task: str,
    ex: Mapping[str, Any],
    values: Mapping[str, Any],
    config: Mapping[str, Any],
    where: str,
    doc_text: Callable[[str, Any], str | None] | None,
) -> None:
    """The main filter's fields of one scored document."""
    main = _main_metric(config, list(values))
    record.update({m: v for m, v in values.items() if m not in RESERVED})
    record["main_metric"] = f"{main},{where}"
    record["score"] = values[main]
    record["correct"] = _as_grade(values[main])
    record["reference"] = _reference(ex.get("target"), record)
    record["filter"] = where
    if record.get("request_type") == "generate_until":
        filtered = plain(ex.get("filtered_resps"))
        record["extracted"] = filtered[0] if isinstance(filtered, list) and filtered else filtered
    if doc_text is not None:
        text = doc_text(task, ex.get("doc"))
        if text is not None:
            record["question"] = text


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy over the graded documents, overall and per task (as ``results.json`` has it).

    A document's category is its task, so this is the runner's own summary.
    """
    accuracy, n, right, per_task = summarize_records(records)
    return {"accuracy": accuracy, "n": n, "n_correct": right, "per_category": per_task}


def doc_order(record: Mapping[str, Any]) -> tuple[str, int, str]:
    """Sort key: task, then document number."""
    doc_id = record.get("doc_id")
    return (
        str(record.get("task", "")),
        doc_id if isinstance(doc_id, int) else -1,
        str(record.get("id")),
    )
