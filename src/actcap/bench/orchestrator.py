"""One evaluation, local or on Ray: setup, progress and finalisation shared, execution apart.

Every run goes through the same three steps (:func:`orchestrate`):

1. **setup**: the ``--limit``, the capture sites, the storage layout, the run record
   (``run.json``), the run writer (opened, or resumed; a :class:`~actcap.storage.writers.NullWriter`
   when nothing is stored), the records already finished, and the plan of the questions left;
2. **execution**, the one part that differs: :class:`LocalExecution` answers batches in this
   process and hands each sample to the writer (in a background thread, or inline); the Ray
   execution (:class:`actcap.bench.distributed.RayExecution`) ships the plan to actors that
   write into the run themselves;
3. **finalisation**: flush, merge the writers' manifest segments, verify, ``results.json``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from actcap.bench import runner
from actcap.bench.prefixes import shared_prefixes
from actcap.bench.questions import Benchmark, Question
from actcap.bench.run_stats import open_stats, stats_sites, write_stats
from actcap.bench.runner import DEFAULT_CAPTURE, EvalOptions, EvalResult, Planned
from actcap.bench.verify import verify_after_run
from actcap.capture.spec import CaptureSpec
from actcap.capture.stats import StatsCollector
from actcap.models.loading import LoadedModel
from actcap.storage.background import BackgroundWriter, InlineWriter, SampleSink
from actcap.storage.layout import SHARD_BYTES, Storage, resolve_storage
from actcap.storage.manifest import ManifestEntry
from actcap.storage.writers import NullWriter, SampleWriter, open_writer


@dataclass
class RunState:
    """A run once set up: what an execution needs to answer the questions left."""

    lm: LoadedModel
    """The model the plan was made with (on Ray, a skeleton without weights)."""
    bench: Benchmark
    """The questions of this run (after ``--limit``)."""
    capture: CaptureSpec | None
    options: EvalOptions
    sites: list[Any]
    """The capture sites (none without capture)."""
    writer: SampleWriter
    """The run's main writer (a ``NullWriter`` when nothing is stored)."""
    shard_bytes: int
    records: dict[str, dict[str, Any]]
    """Manifest records by question id: the finished ones, then each one answered."""
    todo: list[Question]
    """The questions not yet finished, in question order."""
    plan: list[Planned]
    """``todo`` with modes and prompts, in the order they will be batched."""
    prefixes: dict[str, tuple[int, ...]]
    """Question id to the token ids its prompt shares with its group, stored once per run."""
    stats: StatsCollector | None = None
    """Statistics over every token (``--stats``), seeded from a resumed run's file."""


@dataclass(frozen=True)
class Executed:
    """What an execution reports back."""

    answered: int
    """Samples answered in this call."""
    waited: float = 0.0
    """Seconds the model waited on a full write queue."""


class Progress:
    """The progress bar of a run: questions done, and the running accuracy when records are seen."""

    def __init__(self, run: RunState, enabled: bool, label: str) -> None:
        """Start the bar at the questions already finished (nothing shown when not ``enabled``)."""
        self._bar: Any = None
        # Running counts (summarising every record per sample would be quadratic).
        _, self.graded, self.right, _ = runner.summarize(list(run.records.values()))
        if enabled:
            from tqdm.auto import tqdm

            done = len(run.bench.questions) - len(run.plan)
            self._bar = tqdm(
                total=len(run.bench.questions),
                initial=done,
                desc=label,
                unit="q",
                dynamic_ncols=True,
            )

    def add(self, record: Mapping[str, Any]) -> None:
        """One more question answered, with its record (updates the accuracy shown)."""
        if self._bar is None:
            return
        if record["correct"] is not None:
            self.graded += 1
            self.right += bool(record["correct"])
        self._bar.update(1)
        self._bar.set_postfix(
            acc=f"{self.right / self.graded if self.graded else 0.0:.3f}", n=self.graded
        )

    def advance(self, n: int) -> None:
        """``n`` more questions done, their records not at hand."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """End the bar's line (again: a no-op)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Execution(Protocol):
    """How a run's planned questions get answered and written."""

    label: str
    """The progress bar's label."""
    model_name: str
    """The model as the summary names it."""

    def execute(self, run: RunState, progress: Progress) -> Executed:
        """Answer ``run.plan`` and write every sample through the run's writer(s)."""
        ...

    def final_records(self, run: RunState) -> dict[str, dict[str, Any]]:
        """Every finished record of the run, once its writers' segments are merged."""
        ...

    def verify(self, run: RunState, count: int | None) -> dict[str, Any] | None:
        """The ``verification`` field of the finished run (None: not run)."""
        ...

    def extra(self) -> dict[str, Any]:
        """What this execution adds to ``results.json``."""
        ...


class LocalExecution:
    """Answer in this process, batch by batch; write each sample as its batch ends."""

    label = "eval"

    def __init__(
        self, lm: LoadedModel, on_sample: Callable[[ManifestEntry], None] | None = None
    ) -> None:
        """Answer with ``lm``; call ``on_sample`` after each sample is written."""
        self.lm = lm
        self.model_name = lm.display_name
        self.on_sample = on_sample

    def _sink(self, run: RunState) -> SampleSink:
        if run.options.background_write:
            return BackgroundWriter(run.writer, on_written=self.on_sample)
        return InlineWriter(run.writer, on_written=self.on_sample)

    def execute(self, run: RunState, progress: Progress) -> Executed:
        """Answer the plan's batches and hand each sample to the writer."""
        sink = self._sink(run)
        try:
            for batch in runner.plan_batches(run.plan, run.options.batch_size):
                answered = runner.answer_batch(
                    self.lm, run.bench, batch, run.capture, run.sites, run.options, run.stats
                )
                for q, a, record in answered:
                    run.records[q.id] = record
                    sink.submit(
                        runner.finished_sample(
                            self.lm.display_name,
                            run.bench,
                            q,
                            a,
                            record,
                            run.capture,
                            run.prefixes.get(q.id, ()),
                        )
                    )
                    progress.add(record)
            sink.close()
        finally:
            with contextlib.suppress(BaseException):
                sink.close()  # on an error path: finish what is queued, keep the first error
        return Executed(len(run.todo), sink.blocked_seconds)

    def final_records(self, run: RunState) -> dict[str, dict[str, Any]]:
        """The records kept while answering."""
        return run.records

    def verify(self, run: RunState, count: int | None) -> dict[str, Any] | None:
        """Re-check stored samples against this process's model (when something was captured)."""
        root = run.writer.root if run.capture is not None else None
        return verify_after_run(self.lm, root, count, len(run.records))

    def extra(self) -> dict[str, Any]:
        """Nothing more for ``results.json``."""
        return {}


def orchestrate(
    lm: LoadedModel,
    benchmark: Benchmark,
    execution: Execution,
    *,
    capture: CaptureSpec | None,
    options: EvalOptions,
    out: str | os.PathLike[str] | None,
    resume: bool,
    progress: bool,
    storage: Storage,
    shard_bytes: int,
    verify: int | None,
) -> EvalResult:
    """Set a run up, let ``execution`` answer it, and finish it.

    Args:
        lm: The model to plan with (its tokenizer and config; a skeleton will do).
        benchmark: The questions, before ``options.limit``.
        execution: Answers and writes the planned questions.
        capture: What to capture; None evaluates only.
        options: Answering and grading options.
        out: The run directory or URL; None keeps everything in memory.
        resume: Continue a run in ``out`` that has finished samples.
        progress: Show a progress bar.
        storage: ``files``, ``shards`` or ``auto``.
        shard_bytes: Size at which a shard is closed and the next begun.
        verify: Samples to re-check once finished (None: the default count; 0: off).

    Returns:
        Accuracy overall and per category, and the records.

    Raises:
        RunError: The run directory is locked, holds another run, or cannot be written.
        BenchmarkError: A question cannot be answered as asked.
    """
    bench = benchmark.limited(options.limit)
    sites = runner.run_sites(lm, capture)
    stats_sites(lm, capture, sites)  # an unknown or uncaptured --stats site: refused before writing
    layout = resolve_storage(storage, len(bench.questions), out)
    config = runner.run_config(lm, bench, capture, sites, options, layout, benchmark.questions)
    writer: SampleWriter = (
        open_writer(out, config, resume=resume, storage=layout, shard_bytes=shard_bytes)
        if out is not None
        else NullWriter()
    )
    try:
        records = {qid: e.record for qid, e in writer.done.items()}
        todo = [q for q in bench.questions if q.id not in records]
        plan = runner.plan_questions(lm, bench, todo, options)
        share = capture is not None and capture.token_selection == "all" and options.share_prefixes
        prefixes = (
            shared_prefixes(lm, plan, benchmark, options) if share and out is not None else {}
        )
        run = RunState(
            lm, bench, capture, options, sites, writer, shard_bytes, records, todo, plan, prefixes
        )
        root = writer.root if out is not None else None
        run.stats = open_stats(lm, capture, sites, root, done=records)
        return _finish(run, execution, progress, verify)
    finally:
        writer.close()


def _finish(run: RunState, execution: Execution, progress: bool, verify: int | None) -> EvalResult:
    """Execute the plan, then flush, merge, verify and write ``results.json``."""
    bar = Progress(run, progress, execution.label)
    try:
        t0 = time.perf_counter()
        executed = execution.execute(run, bar)
        run.writer.flush()
        wall = time.perf_counter() - t0
    finally:
        bar.close()  # on an error path or Ctrl-C: end the bar's line before any message
    run.writer.merge_segments([q.id for q in run.bench.questions])
    records = execution.final_records(run)
    run.records = records
    verification = execution.verify(run, verify)
    extra = {
        **write_stats(run.writer, run.stats, len(records)),
        **execution.extra(),
        **({"verification": verification} if verification is not None else {}),
    }
    result = runner.finish_run(
        run.writer,
        run.bench,
        records,
        answered=executed.answered,
        wall=wall,
        waited=executed.waited,
        extra=extra or None,
    )
    result.verification = verification
    result.model = execution.model_name
    result.benchmark = run.bench.name
    return result


def run_benchmark(
    lm: LoadedModel,
    benchmark: Benchmark,
    *,
    capture: CaptureSpec | None = DEFAULT_CAPTURE,
    options: EvalOptions | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_sample: Callable[[ManifestEntry], None] | None = None,
    storage: Storage = "auto",
    shard_bytes: int = SHARD_BYTES,
    verify: int | None = None,
) -> EvalResult:
    """Answer and grade a benchmark, writing every sample's activations into a run directory.

    Args:
        lm: The model.
        benchmark: The questions.
        capture: What to capture; None evaluates only.
        options: Answering and grading options.
        out: The run directory (or an fsspec URL); None keeps everything in memory.
        resume: Continue a run in ``out`` that has finished samples.
        progress: Show a progress bar with the running accuracy.
        on_sample: Called after each sample is written (tests use it to inject faults).
        storage: ``files`` (one per sample), ``shards`` (~1 GB files with an index), or
            ``auto`` (shards above 10,000 questions, and always at a URL).
        shard_bytes: Size at which a shard is closed and the next begun.
        verify: Once finished, re-check this many random samples, read back from the run,
            against the model run on each prompt alone (``results.json["verification"]``, a
            :class:`~actcap.bench.verify.VerificationWarning` when it fails); None: 0.5% of the
            samples, at least 1 and at most 8; 0: off. Needs ``out`` and ``capture``.

    Returns:
        Accuracy overall and per category, and the records.

    Raises:
        RunError: The run directory is locked, holds another run, or cannot be written.
        BenchmarkError: A question cannot be answered as asked.
    """
    return orchestrate(
        lm,
        benchmark,
        LocalExecution(lm, on_sample),
        capture=capture,
        options=options or EvalOptions(),
        out=out,
        resume=resume,
        progress=progress,
        storage=storage,
        shard_bytes=shard_bytes,
        verify=verify,
    )
