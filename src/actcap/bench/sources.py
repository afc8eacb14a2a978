"""Benchmark sources: generic JSONL/JSON/CSV, MMLU, GSM8K, TruthfulQA, HF datasets, the demo set.

``load_benchmark("mmlu:path/astronomy_test.csv")`` picks the loader from the prefix (or from the
file name when there is none). Every loader names the file and line of any bad input.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from actcap.bench.graders import parse_number
from actcap.bench.questions import LETTERS, Benchmark, Question
from actcap.errors import BenchmarkError, UnknownNameError, require

DEFAULT_FIELDS = {
    "question": "question",
    "answer": "answer",
    "choices": "choices",
    "id": "id",
    "category": "category",
}
SOURCES = ("demo", "jsonl", "json", "csv", "mmlu", "gsm8k", "truthfulqa", "truthfulqa-gen", "hf")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: no such benchmark file.") from None
    except IsADirectoryError:
        raise BenchmarkError(f"{path}: is a folder; this source expects a file.") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise BenchmarkError(
            f"{path}: line {line}: not valid UTF-8 ({e.reason} at byte {e.start}). Re-save the file as UTF-8."
        ) from None
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read ({e.strerror or e}).") from e


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` from a JSONL, JSON (a list) or CSV (with a header) file.

    Raises:
        BenchmarkError: For malformed input, naming the file and line.
    """
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}: line {number}: malformed JSON ({e.msg}).") from None
            if not isinstance(record, dict):
                raise BenchmarkError(
                    f"{path}: line {number}: expected a JSON object, got {type(record).__name__}."
                )
            yield number, record
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: line {e.lineno}: malformed JSON ({e.msg}).") from None
        if isinstance(data, dict):
            data = data.get("questions", data.get("data"))
        if not isinstance(data, list):
            raise BenchmarkError(f"{path}: expected a JSON list of question objects.")
        for number, record in enumerate(data, start=1):
            if not isinstance(record, dict):
                raise BenchmarkError(f"{path}: item {number}: expected a JSON object.")
            yield number, record
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        for number, record in enumerate(reader, start=2):
            yield number, {k: v for k, v in record.items() if k is not None}
    else:
        raise BenchmarkError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .csv.")


def load_generic(
    path: str | Path, fields: Mapping[str, str] | None = None, name: str | None = None
) -> Benchmark:
    """Load a JSONL/JSON/CSV file of questions with configurable field names.

    Args:
        path: The file.
        fields: Our field (``question``, ``answer``, ``choices``, ``id``, ``category``) to the
            file's column name.
        name: The benchmark's name.

    Raises:
        BenchmarkError: For missing fields, empty files or duplicate ids.
    """
    p = Path(path)
    mapping = {**DEFAULT_FIELDS, **(fields or {})}
    questions: list[Question] = []
    for number, record in read_records(p):
        choices = record.get(mapping["choices"])
        if isinstance(choices, str):
            try:
                choices = (
                    json.loads(choices)
                    if choices.strip().startswith("[")
                    else [c for c in choices.split("|") if c]
                )
            except json.JSONDecodeError:
                raise BenchmarkError(f"{p}: line {number}: 'choices' is not a JSON list.") from None
        data = {
            "question": record.get(mapping["question"]),
            "answer": record.get(mapping["answer"]),
            "choices": choices or None,
            "id": record.get(mapping["id"], f"q{len(questions):05d}"),
            "category": record.get(mapping["category"], ""),
            "grader": record.get("grader"),
        }
        if isinstance(data["answer"], int | float) and not isinstance(data["answer"], bool):
            data["answer"] = str(data["answer"])
        if data["choices"] is not None and not isinstance(data["choices"], list):
            raise BenchmarkError(f"{p}: line {number}: 'choices' must be a list.")
        try:
            questions.append(Question.from_dict(data, len(questions)))
        except BenchmarkError as e:
            raise BenchmarkError(
                f"{p}: line {number}: {str(e).split(': ', 1)[-1]} (fields: {mapping})"
            ) from None
    if not questions:
        raise BenchmarkError(f"{p}: the benchmark file holds no questions.")
    return Benchmark(name or str(p), questions, description=f"questions from {p.name}")


def _mmlu_rows(path: Path) -> list[list[str]]:
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(_read_text(path))), start=1):
        if not row:
            continue
        if len(row) != 6:
            raise BenchmarkError(
                f"{path}: line {number}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}."
            )
        if row[5].strip().upper() not in ("A", "B", "C", "D"):
            raise BenchmarkError(f"{path}: line {number}: answer {row[5]!r} is not A, B, C or D.")
        rows.append(row)
    return rows


def _mmlu_subject(path: Path) -> str:
    return re.sub(r"_(test|dev|val)$", "", path.stem)


def _mmlu_questions(path: Path, prefix: str) -> list[Question]:
    subject = _mmlu_subject(path)
    return [
        Question(
            id=f"{prefix}{subject}-{i:04d}",
            question=row[0],
            answer=row[5].strip().upper(),
            choices=tuple(row[1:5]),
            category=subject,
        )
        for i, row in enumerate(_mmlu_rows(path))
    ]


def load_mmlu(path: str | Path) -> Benchmark:
    """Load MMLU CSVs: one ``<subject>_test.csv`` or a folder of them (``test/`` beside ``dev/``).

    Few-shot examples come from ``dev/<subject>_dev.csv`` when it exists beside the test folder.
    """
    p = Path(path)
    if p.is_dir():
        test_dir = p / "test" if (p / "test").is_dir() else p
        files = sorted(test_dir.glob("*.csv"))
        if not files:
            raise BenchmarkError(
                f"{p}: no MMLU .csv files here (expected test/<subject>_test.csv)."
            )
    elif p.is_file():
        files = [p]
    else:
        raise BenchmarkError(f"{p}: no such MMLU file or folder.")
    questions: list[Question] = []
    few_shot: dict[str, list[Question]] = {}
    for f in files:
        questions.extend(_mmlu_questions(f, ""))
        subject = _mmlu_subject(f)
        for dev in (
            f.parent.parent / "dev" / f"{subject}_dev.csv",
            f.parent / f"{subject}_dev.csv",
        ):
            if dev.is_file() and dev != f:
                few_shot[subject] = _mmlu_questions(dev, "dev-")
                break
    return Benchmark(
        f"mmlu:{p}",
        questions,
        few_shot,
        default_grader=None,
        description=f"MMLU, {len(files)} subject(s)",
    )


def gsm8k_reference(path: Path, number: int, solution: str) -> str:
    """The reference of a GSM8K solution: the number after its last ``####``, without commas or ``$``.

    Whole numbers, decimals, negatives and fractions (``1,234``, ``-3``, ``2.5``, ``3/4``) are
    references the numeric grader can match.

    Raises:
        BenchmarkError: When there is no ``####`` or what follows is no number (empty, words),
            naming the file and line.
    """
    _, sep, after = solution.rpartition("####")
    if not sep:
        raise BenchmarkError(f"{path}: line {number}: answer has no '#### <number>' line.")
    reference = after.strip().replace(",", "").replace("$", "").replace(" ", "")
    if parse_number(reference) is None:
        raise BenchmarkError(
            f"{path}: line {number}: the reference after '####' is {after.strip()[:40]!r}, not a "
            "number (write e.g. 42, 1,234, -3, 2.5 or 3/4), so no answer could be graded right. "
            "Fix or remove this line."
        )
    return reference


def load_gsm8k(path: str | Path) -> Benchmark:
    """Load GSM8K JSONL (``question``, ``answer``); the reference is the number after ``####``.

    Raises:
        BenchmarkError: For a line without string fields, or whose reference is no number.
    """
    p = Path(path)
    questions: list[Question] = []
    for number, record in read_records(p):
        q, a = record.get("question"), record.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            raise BenchmarkError(
                f"{p}: line {number}: needs string 'question' and 'answer' fields."
            )
        questions.append(
            Question(
                id=str(record.get("id", f"gsm8k-{len(questions):05d}")),
                question=q,
                answer=gsm8k_reference(p, number, a),
                category="gsm8k",
                extra={"solution": a},
            )
        )
    if not questions:
        raise BenchmarkError(f"{p}: the benchmark file holds no questions.")
    return Benchmark(f"gsm8k:{p}", questions, default_grader="numeric", description="GSM8K")


def load_truthfulqa(path: str | Path, generation: bool = False) -> Benchmark:
    """Load TruthfulQA's CSV (``Question``, ``Best Answer``, ``Correct Answers``, ``Incorrect Answers``).

    Multiple choice: the best answer against the incorrect ones, in an order fixed per question.
    Generation (``generation=True``): graded against the correct answers.
    """
    p = Path(path)
    questions: list[Question] = []
    for number, record in read_records(p):
        try:
            text, best = record["Question"], record["Best Answer"]
            correct = [
                a.strip() for a in (record.get("Correct Answers") or "").split(";") if a.strip()
            ]
            incorrect = [
                a.strip() for a in (record.get("Incorrect Answers") or "").split(";") if a.strip()
            ]
        except KeyError as e:
            raise BenchmarkError(f"{p}: line {number}: missing column {e.args[0]!r}.") from None
        if not text or not best:
            raise BenchmarkError(f"{p}: line {number}: empty question or best answer.")
        qid = f"truthfulqa-{len(questions):04d}"
        category = record.get("Category", "") or ""
        if generation:
            questions.append(
                Question(
                    qid,
                    text,
                    best,
                    None,
                    category,
                    "contains",
                    tuple(dict.fromkeys([best, *correct])),
                )
            )
            continue
        if not incorrect:
            raise BenchmarkError(
                f"{p}: line {number}: no incorrect answers to build a multiple choice from."
            )
        options = [best, *incorrect[: len(LETTERS) - 1]]
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        order = list(range(len(options)))
        random.Random(seed).shuffle(order)
        choices = tuple(options[i] for i in order)
        questions.append(Question(qid, text, LETTERS[order.index(0)], choices, category))
    if not questions:
        raise BenchmarkError(f"{p}: the benchmark file holds no questions.")
    return Benchmark(f"truthfulqa:{p}", questions, description="TruthfulQA")


def load_hf(spec: str, fields: Mapping[str, str] | None = None) -> Benchmark:
    """Load a Hugging Face dataset: ``name[:config[:split]]``, e.g. ``cais/mmlu:astronomy:test``.

    Raises:
        MissingDependencyError: When ``datasets`` is not installed.
        BenchmarkError: When the dataset cannot be fetched (offline, wrong name).
    """
    require("datasets", "hf", "Loading Hugging Face datasets")
    import datasets

    parts = spec.split(":")
    name, config, split = (
        parts[0],
        (parts[1] if len(parts) > 1 and parts[1] else None),
        (parts[2] if len(parts) > 2 else "test"),
    )
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (
        Exception
    ) as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        raise BenchmarkError(
            f"Cannot load Hugging Face dataset {spec!r}: {e}. Check the name, config and split, and "
            "that the hub is reachable (or download the files and use a local path)."
        ) from e
    mapping = {**DEFAULT_FIELDS, **(fields or {})}
    questions: list[Question] = []
    for i, row in enumerate(ds):
        answer = row.get(mapping["answer"])
        choices = row.get(mapping["choices"])
        if choices and isinstance(answer, int):
            answer = LETTERS[answer]
        data = {
            "question": row.get(mapping["question"]),
            "answer": answer,
            "choices": choices,
            "id": row.get(mapping["id"], f"{name.replace('/', '_')}-{i:05d}"),
            "category": row.get(mapping["category"]) or row.get("subject") or (config or ""),
        }
        questions.append(Question.from_dict(data, i))
    return Benchmark(f"hf:{spec}", questions, description=f"Hugging Face dataset {spec}")


def load_demo() -> Benchmark:
    """The built-in demo benchmark: 42 questions written for actcap (multiple choice, short facts, arithmetic)."""
    text = resources.files("actcap.bench").joinpath("data/demo.jsonl").read_text(encoding="utf-8")
    questions = [
        Question.from_dict(json.loads(line), i)
        for i, line in enumerate(text.splitlines())
        if line.strip()
    ]
    return Benchmark("demo", questions, description="actcap's built-in demo set")


LM_EVAL_SPELLINGS = {"truthfulqa_mc1": "truthfulqa", "truthfulqa_gen": "truthfulqa-gen"}
"""lm-evaluation-harness task names read by a source of ours (also ``mmlu_<subject>``, ``gsm8k``)."""


def _lm_eval_spelling(source: str, rest: str) -> tuple[str, str]:
    """lm-eval's task names as our sources; other specs as they are.

    ``mmlu_<subject>:DIR`` is that subject of an MMLU folder; ``truthfulqa_mc1:FILE`` and
    ``truthfulqa_gen:FILE`` are ``truthfulqa`` and ``truthfulqa-gen``.

    Raises:
        BenchmarkError: When the MMLU folder has no such subject.
    """
    if source.startswith("mmlu_") and rest:
        subject = source.removeprefix("mmlu_")
        folder = Path(rest)
        for f in (folder / "test" / f"{subject}_test.csv", folder / f"{subject}_test.csv"):
            if f.is_file():
                return "mmlu", str(f)
        raise BenchmarkError(
            f"{source}:{rest}: no {subject}_test.csv in {folder} or {folder / 'test'}. Give the "
            "MMLU folder, or --task for lm-eval's own task of that name."
        )
    return LM_EVAL_SPELLINGS.get(source, source), rest


def load_benchmark(spec: str, fields: Mapping[str, str] | None = None) -> Benchmark:
    """Load a benchmark from a spec such as ``demo``, ``mmlu:dir``, ``gsm8k:test.jsonl`` or ``data.csv``.

    Args:
        spec: ``SOURCE:PATH`` with SOURCE one of demo, jsonl, json, csv, mmlu, gsm8k, truthfulqa,
            truthfulqa-gen, hf, or lm-eval's spellings ``mmlu_<subject>:DIR``,
            ``truthfulqa_mc1``, ``truthfulqa_gen``; or a bare path (the type from its suffix).
        fields: Column names for generic files.

    Raises:
        UnknownNameError: For an unknown source.
        BenchmarkError: For unreadable or malformed input.
    """
    if spec == "demo":
        return load_demo()
    source, sep, rest = spec.partition(":")
    if not sep or (len(source) == 1 and source.isalpha()):  # a bare path (or a Windows drive)
        source, rest = "file", spec
    source, rest = _lm_eval_spelling(source, rest)
    loaders: dict[str, Callable[[str], Benchmark]] = {
        "file": lambda r: load_generic(r, fields, spec),
        "jsonl": lambda r: load_generic(r, fields, spec),
        "json": lambda r: load_generic(r, fields, spec),
        "csv": lambda r: load_generic(r, fields, spec),
        "mmlu": load_mmlu,
        "gsm8k": load_gsm8k,
        "truthfulqa": load_truthfulqa,
        "truthfulqa-gen": lambda r: load_truthfulqa(r, generation=True),
        "hf": lambda r: load_hf(r, fields),
    }
    if source not in loaders:
        import difflib

        close = difflib.get_close_matches(source, SOURCES, n=1)
        raise UnknownNameError(
            f"Unknown benchmark source {source!r}.{f' Did you mean {close[0]!r}?' if close else ''} "
            f"Available: {', '.join(SOURCES)} (as SOURCE:PATH), or a .jsonl/.json/.csv path."
        )
    return loaders[source](rest)


__all__ = [
    "DEFAULT_FIELDS",
    "SOURCES",
    "gsm8k_reference",
    "load_benchmark",
    "load_demo",
    "load_generic",
    "load_gsm8k",
    "load_hf",
    "load_mmlu",
    "load_truthfulqa",
    "read_records",
]
