"""Benchmarks: sources, prompts, graders, batched answering and the evaluation runner."""

from actcap.bench.api import (
    answer_and_grade_benchmark_question,
    answer_benchmark_question_with_activations,
    as_question,
)
from actcap.bench.graders import GRADERS, Grade, Grader, get_grader
from actcap.bench.prompts import build_prompt
from actcap.bench.questions import Benchmark, Question
from actcap.bench.runner import EvalOptions, EvalResult, run_benchmark
from actcap.bench.sources import SOURCES, load_benchmark

__all__ = [
    "GRADERS",
    "SOURCES",
    "Benchmark",
    "EvalOptions",
    "EvalResult",
    "Grade",
    "Grader",
    "Question",
    "answer_and_grade_benchmark_question",
    "answer_benchmark_question_with_activations",
    "as_question",
    "build_prompt",
    "get_grader",
    "load_benchmark",
    "run_benchmark",
]
