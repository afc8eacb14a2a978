"""Shared machinery of the benchmark suite: interleaved timing, tables, recorded figures."""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parents[1] / "data"
MMLU_FILE = DATA / "mmlu" / "test" / "high_school_geography_test.csv"

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours and say which two make green when mixed.",
    "Explain in one sentence why the sky is blue during the day and red at sunset, in plain words.",
    "What is 17 times 23? Show the steps of the multiplication one line at a time.",
    "Which planet in our solar system has the most moons, and roughly how many have been found so far? "
    "Mention who found the most recent ones and how they were seen.",
    "Translate 'good morning, how did you sleep?' into Spanish, French and German.",
    "Summarise the plot of Romeo and Juliet in two sentences, mentioning both families, the "
    "secret marriage, the banishment, the sleeping potion and how the story ends for the two "
    "young lovers and for the feud between their houses in Verona.",
    "Who wrote 'Pride and Prejudice', and in which year was it first published? Name two other "
    "novels by the same author and one film adaptation of each of them, with its year.",
] * 2


@dataclass
class Figures:
    """Figures measured in a run, printed as tables and saved as JSON."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, section: str, name: str, **values: Any) -> None:
        self.rows.append({"section": section, "name": name, **values})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.rows, indent=2, default=str))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    variants: dict[str, Callable[[], Any]],
    baseline: str,
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Time every variant in shuffled rounds after a warm-up; ratios are to the baseline of the same round.

    Returns name -> {median_s, min_s, max_s, ratio} (ratio = median over rounds of t / t_baseline).
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        this: dict[str, float] = {}
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            this[name] = time.perf_counter() - t0
        for name, t in this.items():
            times[name].append(t)
            ratios[name].append(t / this[baseline])
    return {
        k: {
            "median_s": statistics.median(times[k]),
            "min_s": min(times[k]),
            "max_s": max(times[k]),
            "ratio": statistics.median(ratios[k]),
        }
        for k in variants
    }


def print_table(title: str, results: dict[str, dict[str, float]], baseline: str) -> None:
    print(f"\n## {title}  (ratio to '{baseline}', same round)")
    print(f"{'variant':<44} {'median ms':>10} {'min-max ms':>19} {'ratio':>8}")
    for name, r in results.items():
        print(
            f"{name:<44} {r['median_s'] * 1000:>10.1f} {r['min_s'] * 1000:>8.1f}-{r['max_s'] * 1000:<10.1f} {r['ratio']:>7.3f}x"
        )


def skip(section: str, why: str) -> None:
    print(f"  [{section}] skipped: {why}")
