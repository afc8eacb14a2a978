"""Evaluation on Ray Data: many workers (GPUs, machines), one run directory.

The driver plans the run without the model's weights (a ``meta``-device skeleton gives the
tokenizer, the config and the capture sites), holds the run's lock, and turns the planned
questions into a Ray Dataset. ``map_batches`` answers them over an actor pool, one model per
actor. Each actor writes its samples into the run directory as an extra writer: its own manifest
segment and its own shards or files. The driver merges the segments into ``manifest.jsonl`` and
writes ``results.json``.

Ray restarts a killed actor and retries its batch. Before each batch an actor rereads what any
writer has finished (only the bytes appended since its last look) and skips those samples, so a
retried or resumed batch does not write a sample twice; were two actors ever to race on one
sample, readers and the merge keep its first manifest line. ``--resume`` works across workers
because every segment counts as finished work.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from actcap.bench.orchestrator import Executed, Progress, RunState, orchestrate
from actcap.bench.questions import Benchmark
from actcap.bench.run_stats import stats_sites
from actcap.bench.runner import (
    DEFAULT_CAPTURE,
    EvalOptions,
    EvalResult,
    Planned,
    answer_batch,
    finished_sample,
    run_sites,
)
from actcap.bench.verify import verify_after_run
from actcap.capture.spec import CaptureSpec
from actcap.capture.stats import StatsCollector
from actcap.errors import RunError, require
from actcap.models.builtin import DEFAULT_MODEL_NAME
from actcap.models.loading import load_model, load_skeleton
from actcap.storage.durable import atomic_write_bytes
from actcap.storage.layout import SHARD_BYTES, WORKERS, Storage, new_writer_id
from actcap.storage.location import is_url, local_path
from actcap.storage.manifest import DoneIndex, read_all_manifests
from actcap.storage.stats_file import decode_stats, encode_stats
from actcap.storage.writers import attach_writer


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run goes."""

    workers: int = 2
    """Actors, each holding one copy of the model."""
    gpus_per_worker: float = 0.0
    """GPUs each actor reserves (0: CPU workers)."""
    cpus_per_worker: float = 1.0
    """CPUs each actor reserves; also its torch thread count."""
    address: str | None = None
    """An existing cluster (``auto``, ``ray://host:10001``); None starts a local one."""
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    """How each actor loads the model: ``device``, ``dtype``, ``device_map``, ..."""


class EvalActor:
    """A Ray Data actor: loads the model once, then answers and writes batches of questions."""

    def __init__(
        self,
        model: str,
        load_kwargs: Mapping[str, Any],
        bench: Benchmark,
        capture: CaptureSpec | None,
        options: EvalOptions,
        out: str,
        storage: str,
        shard_bytes: int,
        threads: int,
        prefixes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        """Load the model and attach to the run as an extra writer."""
        import torch

        torch.set_num_threads(max(1, threads))
        self.lm = load_model(model, **load_kwargs)
        self.bench = bench
        self.questions = {q.id: q for q in bench.questions}
        self.capture = capture
        self.options = options
        self.sites = run_sites(self.lm, capture)
        self.stats_sites = stats_sites(self.lm, capture, self.sites)
        self.prefixes = dict(prefixes or {})
        self.writer_id = new_writer_id()
        self.out = out
        self.writer = attach_writer(
            out,
            self.writer_id,
            storage=storage,  # type: ignore[arg-type]
            shard_bytes=shard_bytes,
        )
        self.index = None if is_url(out) else DoneIndex(local_path(out))
        if not is_url(out):
            record = {
                "writer_id": self.writer_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "device": str(self.lm.device),
                "started": time.time(),
            }
            folder = local_path(out) / WORKERS
            folder.mkdir(exist_ok=True)
            atomic_write_bytes(folder / f"{self.writer_id}.json", json.dumps(record).encode())

    def _done(self) -> set[str]:
        if self.index is not None:
            return self.index.refresh()
        return {e.id for e in read_all_manifests(self.out)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Answer the batch's questions not yet done by any writer; write each sample."""
        import numpy as np

        ids = [str(i) for i in batch["id"]]
        done = self._done()
        todo = [
            Planned(self.questions[i], str(m), str(p))  # type: ignore[arg-type]
            for i, m, p in zip(ids, batch["mode"], batch["prompt"], strict=True)
            if i not in done
        ]
        written = set()
        stats = StatsCollector(self.stats_sites) if self.stats_sites else None
        for q, a, record in answer_batch(
            self.lm, self.bench, todo, self.capture, self.sites, self.options, stats
        ):
            self.writer.write(
                finished_sample(
                    self.lm.display_name,
                    self.bench,
                    q,
                    a,
                    record,
                    self.capture,
                    self.prefixes.get(q.id, ()),
                )
            )
            written.add(q.id)
        self.writer.flush()
        # This batch's statistics ride on its first row; the driver merges them (exactly).
        blobs = [b""] * len(ids)
        if stats is not None and stats.counted and blobs:
            blobs[0] = encode_stats(*stats.to_file())
        return {
            "id": np.array(ids),
            "written": np.array([i in written for i in ids]),
            "stats": np.array(blobs, dtype=object),
        }


def run_benchmark_ray(
    model: str,
    benchmark: Benchmark,
    out: str | os.PathLike[str],
    *,
    capture: CaptureSpec | None = DEFAULT_CAPTURE,
    options: EvalOptions | None = None,
    ray_options: RayOptions | None = None,
    resume: bool = False,
    progress: bool = True,
    storage: Storage = "auto",
    shard_bytes: int = SHARD_BYTES,
    verify: int = 0,
) -> EvalResult:
    """Answer and grade a benchmark on a Ray cluster, writing one run directory.

    Args:
        model: What each worker loads (``"default"``, a hub id, a folder, a ``.gguf`` file);
            on a cluster, a path must exist on every node.
        benchmark: The questions.
        out: The run directory, on storage every worker reaches (a shared file system, or an
            fsspec URL such as ``s3://bucket/run``).
        capture: What to capture; None evaluates only.
        options: Answering and grading options, as for :func:`run_benchmark`.
        ray_options: Workers, GPUs and CPUs per worker, cluster address, loading options.
        resume: Continue a run that has finished samples (from any number of workers).
        progress: Show a progress bar.
        storage: ``files``, ``shards`` or ``auto``, as for :func:`run_benchmark`.
        shard_bytes: Size at which a shard is closed and the next begun.
        verify: Once merged, re-check this many random samples on the driver, which then loads
            the model (``ray_options.load_kwargs``); 0 (the default) leaves it to
            ``actcap verify`` on a machine that holds the model.

    Returns:
        Accuracy overall and per category, and the records, as :func:`run_benchmark`.

    Raises:
        MissingDependencyError: Ray is not installed (``pip install 'actcap[ray]'``).
        RunError: The run cannot be written, the cluster lacks the GPUs or CPUs the workers
            ask for, or the Ray job failed (finished samples are kept: rerun with ``resume=True``).
    """
    require("ray", "ray", "Evaluation on Ray (--ray)")
    ray_options = ray_options or RayOptions()
    if ray_options.workers < 1:
        raise RunError(f"--workers must be at least 1, not {ray_options.workers}.")
    return orchestrate(
        load_skeleton(model),
        benchmark,
        RayExecution(model, ray_options),
        capture=capture,
        options=options or EvalOptions(),
        out=out,
        resume=resume,
        progress=progress,
        storage=storage,
        shard_bytes=shard_bytes,
        verify=verify,
    )


class RayExecution:
    """Answer a run's plan over a Ray actor pool; each actor writes its own samples."""

    label = "eval (ray)"

    def __init__(self, model: str, ray_options: RayOptions) -> None:
        """What each actor loads (``model``), and how many actors of what size."""
        self.model = model
        self.model_name = DEFAULT_MODEL_NAME if model == "default" else model
        self.ray_options = ray_options

    def execute(self, run: RunState, progress: Progress) -> Executed:
        """Ship the plan to the actors; count the samples they wrote."""
        return Executed(_run_on_ray(run, self.model, self.ray_options, progress))

    def final_records(self, run: RunState) -> dict[str, dict[str, Any]]:
        """Every record, read back from the merged manifest (the actors wrote them)."""
        return {e.id: e.record for e in read_all_manifests(run.writer.root)}

    def verify(self, run: RunState, count: int | None) -> dict[str, Any] | None:
        """Re-check ``count`` samples on the driver, which then loads the model (0 or None: off)."""
        if not count or run.capture is None:
            return None
        lm = load_model(self.model, **self.ray_options.load_kwargs)
        return verify_after_run(lm, run.writer.root, count, len(run.records))

    def extra(self) -> dict[str, Any]:
        """The worker pool, for ``results.json["ray"]``."""
        return {
            "ray": {
                "workers": self.ray_options.workers,
                "gpus_per_worker": self.ray_options.gpus_per_worker,
                "cpus_per_worker": self.ray_options.cpus_per_worker,
            }
        }


def missing_resources(available: Mapping[str, float], ray_options: RayOptions) -> list[str]:
    """What the actor pool needs that the cluster lacks, one line per resource (empty: all there).

    Ray would otherwise wait forever for actors it cannot place, e.g. GPU workers on a machine
    without a GPU.
    """
    need = {
        "GPU": ray_options.workers * ray_options.gpus_per_worker,
        "CPU": ray_options.workers * ray_options.cpus_per_worker,
    }
    return [
        f"{amount:g} {name} needed ({ray_options.workers} x {amount / ray_options.workers:g}), "
        f"{float(available.get(name, 0.0)):g} in the cluster"
        for name, amount in need.items()
        if amount > float(available.get(name, 0.0)) + 1e-9
    ]


def _run_on_ray(run: RunState, model: str, ray_options: RayOptions, progress: Progress) -> int:
    """Answer the plan over an actor pool; return how many samples were written."""
    if not run.plan:
        return 0
    import ray
    import ray.data

    started_here = not ray.is_initialized()
    if started_here:
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if ray_options.address is None:
            # A private local cluster: no auth token written under the home folder.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            # A local cluster with room for the actors and for Ray Data's own small tasks.
            need = ray_options.workers * ray_options.cpus_per_worker + 1
            init["num_cpus"] = max(int(need + 0.999), os.cpu_count() or 1)
        else:
            init["address"] = ray_options.address
        ray.init(**init)
    try:
        missing = missing_resources(ray.cluster_resources(), ray_options)
        if missing:
            raise RunError(
                f"The Ray cluster cannot hold {ray_options.workers} worker(s): {'; '.join(missing)}. "
                "Ask for less (--workers, --gpus-per-worker, --cpus-per-worker), or connect to a "
                "cluster that has it (--ray-address). Nothing was submitted."
            )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        rows = [{"id": p.question.id, "mode": p.mode, "prompt": p.prompt} for p in run.plan]
        # Prompts are built; actors only need the questions themselves (and no few-shot pool).
        part = replace(run.bench, questions=list(run.todo), few_shot={})
        batch_size = run.options.batch_size
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch_size))
        answered = ds.map_batches(
            EvalActor,
            fn_constructor_kwargs={
                "model": model,
                "load_kwargs": ray_options.load_kwargs,
                "bench": part,
                "capture": run.capture,
                "options": run.options,
                "out": os.fspath(run.writer.root),
                "storage": run.writer.storage,
                "shard_bytes": run.shard_bytes,
                "threads": int(ray_options.cpus_per_worker),
                "prefixes": {
                    q.id: run.prefixes[q.id] for q in part.questions if q.id in run.prefixes
                },
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=ray_options.workers),
            num_cpus=ray_options.cpus_per_worker,
            num_gpus=ray_options.gpus_per_worker or None,
        )
        written = 0
        try:
            for out in answered.iter_batches(batch_size=None, batch_format="numpy"):
                written += int(out["written"].sum())
                if run.stats is not None:
                    for blob in out["stats"]:
                        if blob:
                            run.stats.absorb(decode_stats(bytes(blob), "a Ray worker's statistics"))
                progress.advance(len(out["id"]))
        except Exception as e:  # Ray wraps the worker's error; keep it as the cause
            raise RunError(
                f"{run.writer.root}: the Ray job failed ({type(e).__name__}: {str(e)[:500]}). "
                "Finished samples are kept; fix the cause and rerun with --resume."
            ) from e
        return written
    finally:
        if started_here:
            ray.shutdown()
