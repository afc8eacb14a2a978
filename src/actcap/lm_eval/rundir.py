"""The run directory of an lm-eval evaluation: samples as they are answered, metrics once scored.

Each document is written (activations, then its manifest line) by a background thread as soon as
its batch is answered, exactly as ``actcap eval`` writes a question, so the lock, the crash
guarantees and ``--resume`` are those of actcap's own runs. lm-eval scores documents only once
every request is answered; :meth:`LmEvalRun.finish` then rewrites the manifest whole (written
under a temporary name, fsynced, renamed into place) with each document's metrics, and writes
``results.json``. A crash before that leaves every answered document in the manifest with
``correct`` still None; a resume answers them from their records and attaches the metrics.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from actcap.capture import CaptureSpec
from actcap.lm_eval import records
from actcap.lm_eval.engine import Row
from actcap.storage import utc_now
from actcap.storage.background import BackgroundWriter
from actcap.storage.format import SampleMeta
from actcap.storage.layout import SHARD_BYTES
from actcap.storage.records import FinishedSample
from actcap.storage.run import RunWriter

RESULTS_KEPT = (
    "results",
    "groups",
    "group_subtasks",
    "n-shot",
    "n-samples",
    "higher_is_better",
    "versions",
    "configs",
)
"""What of lm-eval's results goes into ``results.json["lm_eval"]`` (not the samples)."""


class LmEvalRun:
    """One open run directory (locked until :meth:`close`)."""

    def __init__(
        self,
        out: str,
        config: Mapping[str, Any],
        *,
        resume: bool,
        capture: CaptureSpec | None,
        model_name: str,
        shard_bytes: int = SHARD_BYTES,
    ) -> None:
        """Open (or resume) ``out``.

        Raises:
            RunError: The run is locked, holds another run, or a resume differs in a setting.
        """
        # A local run only (its manifest is rewritten with the metrics at the end).
        self.writer = RunWriter.open(
            out, config, resume=resume, storage=config["storage"], shard_bytes=shard_bytes
        )
        self.background = BackgroundWriter(self.writer)
        self.capture = capture
        self.model_name = model_name
        self.answered = 0
        """Documents answered in this session."""
        self.seconds = 0.0
        """Time spent answering in this session."""

    @property
    def root(self) -> Any:
        """The run directory."""
        return self.writer.root

    def done(self, sample_id: str) -> dict[str, Any] | None:
        """The record of a document finished in an earlier session, if any."""
        entry = self.writer.done.get(sample_id)
        return entry.record if entry is not None else None

    def submit(
        self,
        sample_id: str,
        record: dict[str, Any],
        row: Row,
        response: str,
        output_ids: torch.Tensor | None = None,
    ) -> None:
        """Queue one document's sample: its activations (with capture) and its record."""
        if row.nonfinite:
            record["nonfinite"] = row.nonfinite
        self.answered += 1
        if self.capture is None:
            self.background.submit(FinishedSample(sample_id, record))
            return
        meta = SampleMeta(
            prompt=str(record["prompt"]),
            response=response,
            model=self.model_name,
            token_selection=self.capture.token_selection,
            dtype=self.capture.dtype,
            extra={
                "benchmark": "lm-eval",
                "task": record["task"],
                "doc_id": record["doc_id"],
                "request_type": record["request_type"],
            },
        )
        self.background.submit(
            FinishedSample(
                sample_id, record, row.activations, meta, row.input_ids.to(torch.long), output_ids
            )
        )

    def timed(self, t0: float) -> None:
        """Count the time since ``t0`` as answering time."""
        self.seconds += time.perf_counter() - t0

    def finish(
        self,
        results: Mapping[str, Any],
        doc_text: Callable[[str, Any], str | None] | None = None,
    ) -> dict[str, Any]:
        """Attach lm-eval's per-document metrics to the manifest; write ``results.json``.

        Returns:
            What ``results.json`` now holds.
        """
        self.background.flush()
        samples = results.get("samples")
        if not samples:
            warnings.warn(
                f"{self.root}: lm-eval's results hold no per-document samples "
                "(log_samples=False), so every document keeps correct=None; pass "
                "log_samples=True.",
                stacklevel=3,
            )
            samples = {}
        lines = sorted((dict(e.record) for e in self.writer.done.values()), key=records.doc_order)
        records.attach_metrics(lines, samples, results.get("configs") or {}, doc_text)
        self.writer.rewrite_manifest(lines)
        summary = self._results_json(lines, results)
        self.writer.write_results(summary)
        return summary

    def _results_json(
        self, lines: list[dict[str, Any]], results: Mapping[str, Any]
    ) -> dict[str, Any]:
        wall = self.seconds
        bad: dict[str, int] = {}
        for r in lines:
            for site, n in (r.get("nonfinite") or {}).items():
                bad[site] = bad.get(site, 0) + int(n)
        dtype = self.capture.dtype if self.capture is not None else None
        return {
            **records.summarize(lines),
            "n_questions": len(lines),
            "answered_this_session": self.answered,
            "wall_seconds": round(wall, 3),
            "questions_per_second": round(self.answered / wall, 3)
            if wall > 0 and self.answered
            else None,
            "write_wait_seconds": round(self.background.blocked_seconds, 3),
            **({"nonfinite": {"dtype": dtype, "sites": bad}} if bad else {}),
            "lm_eval": records.plain(
                {"version": records.lm_eval_version()}
                | {k: results[k] for k in RESULTS_KEPT if k in results}
            ),
            "finished": utc_now(),
        }

    def close(self) -> None:
        """Write what is queued and release the lock (the writer's error, if any, is raised)."""
        try:
            self.background.close()
        finally:
            self.writer.close()


def close_quietly(run: LmEvalRun) -> None:
    """Close a run left open (at garbage collection or exit): nothing is left to tell anyone."""
    with contextlib.suppress(Exception):
        run.close()
