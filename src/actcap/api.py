"""actcap's facade: the verbs a user (and every front end) calls.

- :func:`capture`: answer prompts and keep the activations read on the way;
- :func:`evaluate`: answer and grade a benchmark, storing every sample's activations in a run
  directory, in this process or on Ray (``ray=RayOptions(...)``): one entry for both;
- :func:`analyse` (and :func:`analyse_file`, :func:`analyse_run`, :func:`compare`): statistics
  of a file or a run, and the comparison of two files;
- :func:`export`: one site of a run in a layout training code reads (Parquet, HF, npy);
- :func:`load_model` and :func:`load_benchmark`, re-exported;
- :func:`print_summary`: what ``actcap eval`` and ``main.py`` print once a run is finished.

The command line (``actcap``), ``main.py``, ``example_activation_capture.py`` and
``analyze_activations.py`` call these; the seed pipeline's functions
(``generate_inference_with_activations`` and the benchmark ones) are built on them in
:mod:`actcap.compat`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from actcap.bench.distributed import RayOptions
from actcap.bench.orchestrator import run_benchmark
from actcap.bench.questions import Benchmark
from actcap.bench.runner import DEFAULT_CAPTURE, EvalOptions, EvalResult
from actcap.bench.sources import load_benchmark
from actcap.capture.collect import GenerationOptions, run_prompts
from actcap.capture.sites import LayerRequest, SiteKind
from actcap.capture.spec import CaptureSpec, TokenSelection
from actcap.errors import RunError, WriteError
from actcap.models.chat import format_prompt
from actcap.models.context import check_prompt_chars, check_prompt_length, context_length
from actcap.models.loading import LoadedModel, load_model
from actcap.storage.files import save_activations
from actcap.storage.format import SampleMeta, utc_now
from actcap.storage.layout import SHARD_BYTES, Storage
from actcap.storage.location import PathOrUrl
from actcap.storage.records import activation_dict

if TYPE_CHECKING:  # analysis and export are imported when used: evaluating needs neither
    from actcap.analysis.compare import SiteComparison
    from actcap.analysis.stats import DirectorySummary, SiteStats
    from actcap.data.export import ExportFormat, ExportResult, Reduce, Rows

__all__ = [
    "Captured",
    "analyse",
    "analyse_file",
    "analyse_run",
    "capture",
    "compare",
    "evaluate",
    "export",
    "load_benchmark",
    "load_model",
    "print_summary",
]


@dataclass(frozen=True)
class Captured:
    """One prompt answered, with the activations recorded while the model read it."""

    prompt: str
    """The user's message, as given."""
    text: str
    """The exact text the model read (the chat template applied)."""
    response: str
    """The model's answer."""
    activations: Mapping[str, Tensor]
    """Site name to tensor (``tokens x hidden``, or ``hidden`` for ``last``/``mean``)."""
    input_ids: Tensor
    """The prompt's token ids."""
    output_ids: Tensor | None
    """The answer's token ids."""
    meta: SampleMeta
    """The activation file's metadata."""
    file: Path | None = None
    """The activation file written (``save=``), or None."""

    def to_dict(self) -> dict[str, Any]:
        """The seed pipeline's dictionary, as :func:`actcap.load_activations` returns it."""
        return activation_dict(
            self.meta,
            self.activations,
            self.input_ids,
            self.output_ids,
            {
                "token_selection": self.meta.token_selection,
                "dtype": self.meta.dtype,
                "extra": self.meta.extra,
            },
        )


def capture(
    prompts: str | Sequence[str],
    model: str | LoadedModel = "default",
    *,
    layers: LayerRequest = None,
    sites: Sequence[SiteKind] = ("resid",),
    token_selection: TokenSelection = "all",
    dtype: str = "float32",
    max_new_tokens: int = 128,
    capture_generated: bool = False,
    chat: bool | None = None,
    device: str = "auto",
    save: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[Captured]:
    """Answer each prompt and return it with the activations recorded while reading it.

    Args:
        prompts: One user message or several; the model's chat template is applied when it
            has one.
        model: ``"default"`` (built-in SmolLM2-135M-Instruct), a hub id, a local folder, a
            ``.gguf`` file, or an already loaded model. Loaded once per process.
        layers: ``None`` for embeddings plus every layer; indices (``[0, 5, -1]``), ranges
            (``"0-3"``) or site names (``["layer_2", "layer_2.mlp"]``).
        sites: For layers given by index: ``resid``, ``attn``, ``mlp``.
        token_selection: ``all`` tokens, the ``last`` one, or their ``mean``.
        dtype: Storage dtype: ``float32``, ``float16`` or ``bfloat16``.
        max_new_tokens: Upper bound on each answer's length.
        capture_generated: Also capture the answer's tokens (one tensor covers both).
        chat: Force the chat template on or off (default: use it when the model has one).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        save: Also write a ``.safetensors`` activation file: one path per prompt (a single
            path for a single prompt).
        extra: Anything to store in each file's ``extra`` metadata.

    Returns:
        One :class:`Captured` per prompt, in order.

    Raises:
        WriteError: When a ``save`` path is a folder, or their number is not the prompts'
            (checked before the model is loaded).
        CaptureError: When a prompt is longer than the model's context less
            ``max_new_tokens`` (a prompt far too long is refused before it is tokenised).
    """
    messages = [prompts] if isinstance(prompts, str) else list(prompts)
    files = _save_paths(save, len(messages))
    lm = load_model(model, device=device)
    spec = CaptureSpec(
        layers=layers,
        kinds=tuple(sites),
        token_selection=token_selection,
        dtype=dtype,
        capture_generated=capture_generated,
    )
    room = context_length(lm) - max_new_tokens
    texts = []
    for message in messages:
        check_prompt_chars(message, room)  # before the template copies a text too long to fit
        texts.append(format_prompt(lm.tokenizer, message, chat=chat))
        check_prompt_length(lm, texts[-1], room)
    samples = run_prompts(
        lm, texts, spec, generation=GenerationOptions(max_new_tokens=max_new_tokens)
    )
    out = []
    for message, text, sample, file in zip(messages, texts, samples, files, strict=True):
        meta = SampleMeta(
            prompt=message,
            response=sample.response,
            model=lm.display_name,
            timestamp=utc_now(),
            token_selection=token_selection,
            dtype=spec.dtype,
            extra={
                "formatted_prompt": text,
                "capture_generated": capture_generated,
                **(extra or {}),
            },
        )
        if file is not None:
            save_activations(
                file,
                sample.activations,
                meta,
                input_ids=sample.input_ids,
                output_ids=sample.output_ids,
            )
        out.append(
            Captured(
                message,
                text,
                sample.response,
                dict(sample.activations),
                sample.input_ids,
                sample.output_ids,
                meta,
                file,
            )
        )
    return out


def _save_paths(
    save: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None, n: int
) -> list[Path | None]:
    """One file name (or None) per prompt; refuse folders before any work is done.

    Raises:
        WriteError: When a path is an existing folder, or the number of paths is not ``n``.
    """
    if save is None:
        return [None] * n
    paths = [save] if isinstance(save, str | os.PathLike) else list(save)
    if len(paths) != n:
        raise WriteError(
            f"save: {len(paths)} file name(s) for {n} prompt(s); give one file per prompt."
        )
    for path in paths:
        if Path(path).is_dir():
            raise WriteError(
                f"{os.fspath(path)}: is a folder; save_path (CLI: --save) needs a file name, "
                f"e.g. {Path(path) / 'activations.safetensors'}."
            )
    return [Path(p) for p in paths]


def evaluate(
    benchmark: str | Benchmark,
    model: str | LoadedModel = "default",
    *,
    out: str | os.PathLike[str] | None = None,
    capture: CaptureSpec | None = DEFAULT_CAPTURE,
    options: EvalOptions | None = None,
    resume: bool = False,
    storage: Storage = "auto",
    shard_bytes: int = SHARD_BYTES,
    ray: RayOptions | None = None,
    progress: bool = True,
    verify: int | None = None,
    fields: Mapping[str, str] | None = None,
    load: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Answer and grade a benchmark, storing every sample's activations in a run directory.

    One entry for both executions: in this process (batches, a background writer), or on a
    Ray actor pool when ``ray`` is given (each actor loads the model and writes its samples).

    Args:
        benchmark: A loaded benchmark, or what :func:`load_benchmark` takes (``demo``,
            ``mmlu:PATH``, ``gsm8k:PATH``, ``hf:NAME``, a ``.jsonl``/``.json``/``.csv`` file).
        model: ``"default"``, a hub id, a folder, a ``.gguf`` file, or a loaded model (not on
            Ray: each actor loads its own copy from the name).
        out: The run directory, or an fsspec URL; None keeps everything in memory (not on Ray).
        capture: What to capture; None evaluates only.
        options: Answering and grading options (:class:`~actcap.bench.EvalOptions`).
        resume: Continue a run in ``out`` that has finished samples.
        storage: ``files`` (one per sample), ``shards`` (~1 GB files with an index), or ``auto``.
        shard_bytes: Size at which a shard is closed and the next begun.
        ray: A :class:`~actcap.bench.distributed.RayOptions`: answer on Ray with these workers.
        progress: Show a progress bar with the running accuracy.
        verify: Once finished, re-check this many random samples against the model run on each
            prompt alone; None: 0.5% of the samples, 1 to 8 (on Ray: 0); 0: off.
        fields: For a generic file: our field name to its column (``question``, ``answer``, ...).
        load: How to load the model (``load_model``'s keyword arguments: ``device``,
            ``device_map``, ...); on Ray, each actor's (unless ``ray.load_kwargs`` is given).

    Returns:
        Accuracy overall and per category, the records, and where the run is
        (:meth:`~actcap.bench.runner.EvalResult.summary_lines` tells it).

    Raises:
        BenchmarkError: The benchmark cannot be read, or a question cannot be answered as asked.
        UnknownNameError: ``options.grader`` names no grader (checked before the model loads).
        ModelLoadError: The model cannot be loaded.
        RunError: The run directory is locked, holds another run, or cannot be written; on Ray,
            no ``out``, a loaded model, a cluster too small, or a failed job.
    """
    bench = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark, fields)
    options = options or EvalOptions()
    if options.grader:
        from actcap.bench.graders import get_grader

        get_grader(options.grader)  # fail before loading the model
    load_kwargs = dict(load or {})
    if ray is not None:
        return _evaluate_on_ray(
            bench, model, out, capture, options, resume, storage, shard_bytes, ray, progress,
            verify, load_kwargs,
        )  # fmt: skip
    lm = model if isinstance(model, LoadedModel) else load_model(model, **load_kwargs)
    return run_benchmark(
        lm,
        bench,
        capture=capture,
        options=options,
        out=out,
        resume=resume,
        progress=progress,
        storage=storage,
        shard_bytes=shard_bytes,
        verify=verify,
    )


def _evaluate_on_ray(
    bench: Benchmark,
    model: str | LoadedModel,
    out: str | os.PathLike[str] | None,
    capture: CaptureSpec | None,
    options: EvalOptions,
    resume: bool,
    storage: Storage,
    shard_bytes: int,
    ray: RayOptions,
    progress: bool,
    verify: int | None,
    load: dict[str, Any],
) -> EvalResult:
    """:func:`evaluate` on a Ray actor pool.

    Raises:
        RunError: Without ``out``, or with a loaded model (actors load their own).
    """
    from dataclasses import replace

    from actcap.bench.distributed import run_benchmark_ray

    if out is None:
        raise RunError(
            "evaluate(ray=...): the workers write into a run directory; pass out= (CLI: --out)."
        )
    if not isinstance(model, str):
        raise RunError(
            "evaluate(ray=...): each worker loads its own model; pass its name, not a loaded model."
        )
    if load and not ray.load_kwargs:
        ray = replace(ray, load_kwargs=load)
    return run_benchmark_ray(
        model,
        bench,
        out,
        capture=capture,
        options=options,
        ray_options=ray,
        resume=resume,
        progress=progress,
        storage=storage,
        shard_bytes=shard_bytes,
        verify=verify or 0,
    )


def print_summary(
    result: EvalResult, *, benchmark: str | None = None, model: str | None = None
) -> None:
    """Print an evaluation's summary as ``actcap eval`` does; failed checks in red on stderr.

    Args:
        result: What :func:`evaluate` returned.
        benchmark: The benchmark's name as shown (default: the result's).
        model: The model's name as shown (default: the result's).
    """
    import click

    for line in result.summary_lines(benchmark, model):
        if line.warning:
            click.secho(line.text, fg="red", bold=True, err=True)
        else:
            click.echo(line.text)


def analyse_file(
    path: PathOrUrl, *, sites: Sequence[str] | None = None, tokens: slice | None = None
) -> list[SiteStats]:
    """Per-site statistics of one activation file (``actcap analyze --file``).

    Args:
        path: The file (or a sample of a run).
        sites: Only these sites (all by default).
        tokens: A token range (``slice(-5, None)`` for the last five); all by default.

    Raises:
        FormatError: When the file is unreadable or a site holds no values.
    """
    from actcap.analysis.stats import file_stats

    return file_stats(path, list(sites) if sites is not None else None, tokens)


def analyse_run(
    directory: str | os.PathLike[str], *, sites: Sequence[str] | None = None
) -> DirectorySummary:
    """Summary of every activation file of a run or folder (``actcap analyze --directory``).

    Unreadable files are skipped and counted (``summary.skipped``).
    """
    from actcap.analysis.stats import directory_summary

    return directory_summary(directory, list(sites) if sites is not None else None)


def compare(a: PathOrUrl, b: PathOrUrl) -> list[SiteComparison]:
    """Per-site cosine similarity of two activation files (``actcap analyze --compare``).

    Raises:
        FormatError: When a file is unreadable.
    """
    from actcap.analysis.compare import compare_files

    return compare_files(a, b)


def analyse(
    source: PathOrUrl,
    other: PathOrUrl | None = None,
    *,
    sites: Sequence[str] | None = None,
    tokens: slice | None = None,
) -> list[SiteStats] | DirectorySummary | list[SiteComparison]:
    """Analyse what ``source`` is: compare it with ``other``, summarise a run, or a file's stats.

    Args:
        source: An activation file, or a run directory (or folder of files).
        other: A second file: compare the two (:func:`compare`).
        sites: Only these sites.
        tokens: For one file, a token range.

    Returns:
        :func:`compare`'s rows with ``other``; else :func:`analyse_run`'s summary for a folder;
        else :func:`analyse_file`'s rows.
    """
    if other is not None:
        return compare(source, other)
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        return analyse_run(source, sites=sites)
    return analyse_file(source, sites=sites, tokens=tokens)


def export(
    run: str | os.PathLike[str],
    site: str,
    out: str | os.PathLike[str],
    *,
    to: ExportFormat = "parquet",
    rows: Rows = "tokens",
    reduce: Reduce = "last",
    dtype: Literal["float32", "float16"] = "float32",
    rows_per_file: int = 1_000_000,
) -> ExportResult:
    """Write one site of a run in a layout training code reads directly (``actcap export``).

    Args:
        run: A run directory or URL, or a folder of activation files.
        site: The site, e.g. ``layer_12`` or ``layer_3.mlp``.
        out: The output folder (created; must be empty or absent).
        to: ``parquet``, ``hf-dataset`` or ``npy``.
        rows: ``tokens`` (one row per token) or ``samples`` (one vector per sample).
        reduce: With ``rows="samples"``, which vector stands for a sample stored per token.
        dtype: The export's dtype.
        rows_per_file: Parquet rows per file.

    Returns:
        Rows and samples written, the hidden size, where, and the samples skipped.

    Raises:
        WriteError: ``out`` is not empty, or cannot be written.
        FormatError: The run holds no such site.
    """
    from actcap.data.export import export_site

    return export_site(
        run, site, out, to=to, rows=rows, reduce=reduce, dtype=dtype, rows_per_file=rows_per_file
    )
