"""A background writer: the model thread hands samples over and goes on computing.

Writes keep their order and their guarantees (file first, then the manifest line), in one worker
thread behind a bounded queue, so memory stays bounded when the disk is slower than the model.
Time the model spends waiting on a full queue is measured. An error in the worker is raised in
the caller at its next ``submit`` or at ``close``.

:class:`InlineWriter` offers the same calls (``submit``, ``flush``, ``close``,
``blocked_seconds``) and writes in the caller's thread, so the runner hands samples to a
:class:`SampleSink` without knowing which one it has.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from actcap.storage.manifest import ManifestEntry
from actcap.storage.records import FinishedSample
from actcap.storage.writers import SampleWriter

_STOP = object()


class SampleSink(Protocol):
    """Where the runner hands finished samples: written inline or by a background thread."""

    blocked_seconds: float
    """Time ``submit`` spent waiting (always 0 inline)."""

    def submit(self, item: FinishedSample) -> None:
        """Hand over one sample to write."""
        ...

    def flush(self) -> None:
        """Wait until every sample handed over is written (and durable)."""
        ...

    def close(self) -> None:
        """Write what is pending and stop; the writer itself stays open (its owner closes it)."""
        ...


class InlineWriter:
    """Write each sample in the caller's thread as it is submitted."""

    def __init__(
        self, writer: SampleWriter, on_written: Callable[[ManifestEntry], None] | None = None
    ) -> None:
        """Wrap ``writer`` (owned by the caller, closed by it).

        Args:
            writer: The run writer.
            on_written: Called after each sample is in the manifest.
        """
        self.writer = writer
        self.on_written = on_written
        self.blocked_seconds = 0.0

    def submit(self, item: FinishedSample) -> None:
        """Write one sample now."""
        entry = self.writer.write(item)
        if self.on_written is not None:
            self.on_written(entry)

    def flush(self) -> None:
        """Nothing is pending: every sample was written in :meth:`submit`."""

    def close(self) -> None:
        """Nothing to stop."""


class BackgroundWriter:
    """Run a writer's :meth:`~actcap.storage.run.RunWriter.write` calls in a worker thread, in order."""

    def __init__(
        self,
        writer: SampleWriter,
        max_queue: int = 32,
        on_written: Callable[[ManifestEntry], None] | None = None,
    ) -> None:
        """Start the worker.

        Args:
            writer: The run directory writer (owned by the caller, closed by it).
            max_queue: Samples waiting at most; ``submit`` blocks beyond that.
            on_written: Called in the worker after each sample is in the manifest.
        """
        self.writer = writer
        self.on_written = on_written
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self.blocked_seconds = 0.0
        """Time ``submit`` spent waiting for room in the queue."""
        self.written = 0
        """Samples written so far."""
        self._thread = threading.Thread(target=self._work, name="actcap-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is not None:
                    continue  # drain: after a failure nothing more is written
                entry = self.writer.write(item)
                self.written += 1
                if self.on_written is not None:
                    self.on_written(entry)
            except BaseException as e:  # handed to the caller's thread, never swallowed
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, item: FinishedSample) -> None:
        """Queue one sample to write (blocks while the queue is full)."""
        self._raise_pending()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            t0 = time.perf_counter()
            self._queue.put(item)
            self.blocked_seconds += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every queued sample is written; raise the worker's error if any."""
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        """Write what is queued, stop the worker, and raise its error if it had one."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_pending()
