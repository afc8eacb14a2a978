"""Benchmarks: sources, prompts, graders, batched answering and the evaluation runner.

The seed pipeline's one-question functions (``answer_and_grade_benchmark_question``, ...) are in
:mod:`actcap.compat`, on top of the facade.
"""

from actcap.bench.graders import GRADERS, Grade, Grader, get_grader
from actcap.bench.orchestrator import run_benchmark
from actcap.bench.prompts import build_prompt
from actcap.bench.questions import Benchmark, Question
from actcap.bench.runner import EvalOptions, EvalResult
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
    "build_prompt",
    "get_grader",
    "load_benchmark",
    "run_benchmark",
]
