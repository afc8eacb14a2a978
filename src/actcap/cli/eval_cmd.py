"""``actcap eval``: answer a benchmark, grade it, and store every sample's activations.

Click's parameters become one typed :class:`EvalArgs`; :func:`run_eval` turns it into the
facade's :func:`actcap.api.evaluate` call (locally or on Ray) and prints the summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import click

from actcap.cli.common import (
    apply_options,
    capture_spec,
    device_option,
    dtype_option,
    interrupted_message,
    layers_option,
    model_option,
    parse_size,
    placement_kwargs,
    placement_options,
    reports_errors,
    sites_option,
    token_option,
)
from actcap.cli.verify_cmd import checks_printed_not_warned

scale_options = [
    click.option(
        "--storage",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "files", "shards"]),
        help="One file per sample, or shards of many samples (~1 GB each, with an index); "
        "auto: shards above 10,000 questions and at URLs.",
    ),
    click.option(
        "--shard-size",
        default="1GiB",
        show_default=True,
        help="Size at which a shard is closed and the next begun.",
    ),
    click.option(
        "--ray",
        "use_ray",
        is_flag=True,
        help="Answer on Ray Data: an actor pool with one model per worker (pip install 'actcap[ray]').",
    ),
    click.option(
        "--ray-address",
        default=None,
        help="With --ray: an existing cluster ('auto', 'ray://HOST:10001'); default: start a local one.",
    ),
    click.option(
        "--workers",
        default=2,
        show_default=True,
        type=click.IntRange(min=1),
        help="With --ray: actors, one model each.",
    ),
    click.option(
        "--gpus-per-worker",
        default=0.0,
        show_default=True,
        type=click.FloatRange(min=0),
        help="With --ray: GPUs each actor reserves.",
    ),
    click.option(
        "--cpus-per-worker",
        default=1.0,
        show_default=True,
        type=click.FloatRange(min=0.5),
        help="With --ray: CPUs each actor reserves (and its torch threads).",
    ),
]


@dataclass(frozen=True)
class EvalArgs:
    """``actcap eval``'s options, one field per option, as click parsed them."""

    model: str
    benchmark: str
    task: str | None
    tasks_path: str | None
    num_fewshot: int | None
    apply_chat_template: bool
    out: str | None
    resume: bool
    few_shot: int
    mode: Literal["auto", "generate", "loglik"]
    grader: str | None
    choice_format: Literal["letter", "text"]
    batch_size: int
    max_new_tokens: int
    limit: int | None
    layers: str | None
    kinds: str
    token_selection: str
    dtype: str
    capture_generated: bool
    stats: str | None
    no_capture: bool
    overflow: Literal["error", "truncate"]
    share_prefixes: bool
    fields: tuple[str, ...]
    device: str
    device_map: str | None
    max_memory: str | None
    offload_folder: str | None
    storage: Literal["auto", "files", "shards"]
    shard_size: str
    use_ray: bool
    ray_address: str | None
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    verify: int | None
    quiet: bool

    def capture_spec(self) -> Any:
        """The capture spec of ``--layers``, ``--sites``, ...; None with ``--no-capture``."""
        return capture_spec(vars(self))

    def load_kwargs(self) -> dict[str, Any]:
        """``load_model``'s keyword arguments from ``--device``, ``--device-map``, ..."""
        return placement_kwargs(vars(self))

    def eval_options(self) -> Any:
        """The answering and grading options (:class:`~actcap.bench.EvalOptions`)."""
        from actcap.bench.runner import EvalOptions

        return EvalOptions(
            mode=self.mode,
            few_shot=self.few_shot,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            grader=self.grader,
            choice_format=self.choice_format,
            limit=self.limit,
            overflow=self.overflow,
            share_prefixes=self.share_prefixes,
        )

    def ray_options(self) -> Any:
        """The Ray workers (:class:`~actcap.bench.distributed.RayOptions`), or None without ``--ray``."""
        if not self.use_ray:
            return None
        from actcap.bench.distributed import RayOptions

        return RayOptions(
            workers=self.workers,
            gpus_per_worker=self.gpus_per_worker,
            cpus_per_worker=self.cpus_per_worker,
            address=self.ray_address,
            load_kwargs=self.load_kwargs(),
        )


def parse_fields(values: tuple[str, ...]) -> dict[str, str]:
    """``--field question=prompt --field answer=target`` into a mapping."""
    out = {}
    for v in values:
        key, sep, column = v.partition("=")
        if not sep or not key or not column:
            raise click.BadParameter(
                f"{v!r}: use OUR_NAME=COLUMN, e.g. question=prompt", param_hint="--field"
            )
        out[key.strip()] = column.strip()
    return out


@click.command("eval")
@model_option
@click.option(
    "--benchmark",
    default="demo",
    show_default=True,
    help="demo, mmlu:PATH, gsm8k:PATH, truthfulqa:PATH, truthfulqa-gen:PATH, hf:NAME[:CONFIG[:SPLIT]], or a .jsonl/.json/.csv file.",
)
@click.option(
    "--task",
    default=None,
    help="lm-evaluation-harness task(s), group(s) or tag(s), comma-separated, instead of "
    "--benchmark: lm-eval's prompts, few-shot examples, filters and metrics "
    "(pip install 'actcap[lm-eval]').",
)
@click.option(
    "--tasks-path",
    default=None,
    type=click.Path(),
    help="With --task: a folder of task YAMLs, searched before lm-eval's library.",
)
@click.option(
    "--num-fewshot",
    default=None,
    type=click.IntRange(min=0),
    help="With --task: few-shot examples (default: each task's own).",
)
@click.option(
    "--apply-chat-template",
    is_flag=True,
    help="With --task: format prompts with the model's chat template (lm-eval's option).",
)
@click.option(
    "--out",
    "out",
    default=None,
    help="Run directory, or an fsspec URL such as s3://bucket/run (default runs/<benchmark>: runs/demo, runs/mmlu-test for mmlu:data/mmlu/test).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue a run in --out: skip finished samples, clean up leftovers.",
)
@click.option(
    "--few-shot",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Solved examples before each question (MMLU: from dev/).",
)
@click.option(
    "--mode",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "generate", "loglik"]),
    help="auto: log-likelihood for multiple choice, generation for the rest.",
)
@click.option(
    "--grader",
    default=None,
    help="Override the grader: exact, contains, mc_letter, numeric, choice, regex:PATTERN.",
)
@click.option(
    "--choice-format",
    default="letter",
    show_default=True,
    type=click.Choice(["letter", "text"]),
    help="Log-likelihood of the letters or of the choice texts.",
)
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Questions per forward pass (left padded: the answers do not depend on it).",
)
@click.option(
    "--max-new-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most tokens a generated answer may have (generation mode).",
)
@click.option(
    "--limit", default=None, type=click.IntRange(min=1), help="Answer only the first N questions."
)
@layers_option
@sites_option
@token_option
@dtype_option
@click.option("--capture-generated", is_flag=True, help="Also capture the generated tokens.")
@click.option(
    "--stats",
    default=None,
    metavar="all|SITES",
    help="Also accumulate, over every token of every prompt (and generated token with "
    "--capture-generated), whatever --token-selection keeps: per-dimension mean, variance and "
    "max |x|, a histogram of token norms and the largest activations, into stats.safetensors "
    "(shown by analyze --directory and report). 'all' = every captured site, or sites as for "
    "--layers (they must be captured).",
)
@click.option("--no-capture", is_flag=True, help="Evaluate only: no activation files.")
@click.option(
    "--share-prefixes/--no-share-prefixes",
    default=True,
    show_default=True,
    help="With --token-selection all: store the token prefix prompts share (few-shot examples, "
    "a system prompt) once per run; readers join it back.",
)
@click.option(
    "--overflow",
    default="error",
    show_default=True,
    type=click.Choice(["error", "truncate"]),
    help="A prompt longer than the model's context: refuse, or keep its last tokens.",
)
@click.option(
    "--field",
    "fields",
    multiple=True,
    help="Column names for generic files: question=COL, answer=COL, choices=COL, id=COL, category=COL.",
)
@device_option
@apply_options(placement_options)
@apply_options(scale_options)
@click.option(
    "--verify",
    "verify",
    default=None,
    type=click.IntRange(min=0),
    help="Once finished, re-check N random samples against the model run on each prompt alone "
    "(results.json 'verification'; a failure is a red WARNING)  [default: 0.5% of the samples, "
    "1 to 8; with --ray: 0; 0: off].",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def eval_command(**kw: Any) -> None:
    """Evaluate a model on a benchmark, capturing activations for every question."""
    from actcap.cli.lm_eval_cmd import dispatch_task

    args = EvalArgs(**kw)
    if dispatch_task(args):  # --task: lm-evaluation-harness tasks
        return
    refuse_ray_options_without_ray(args.use_ray)
    out = args.out or default_out(args.benchmark)
    try:
        with checks_printed_not_warned():
            run_eval(args, out)
    except KeyboardInterrupt:
        click.echo(interrupted_message(out), err=True)
        raise click.exceptions.Exit(130) from None


RAY_ONLY = ("workers", "gpus_per_worker", "cpus_per_worker", "ray_address")
"""Options that only mean something with ``--ray``."""


def refuse_ray_options_without_ray(use_ray: bool) -> None:
    """Refuse ``--workers`` and the other Ray options when ``--ray`` is not given.

    Raises:
        click.UsageError: Naming the options given without ``--ray``.
    """
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [
        "--" + name.replace("_", "-")
        for name in RAY_ONLY
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    ]
    if given and not use_ray:
        raise click.UsageError(
            f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --ray (they size the "
            "Ray workers); add --ray, or leave them out to answer in this process."
        )


def run_eval(args: EvalArgs, out: str) -> None:
    """Evaluate through the facade, then print the summary (the body of ``actcap eval``)."""
    from actcap.api import evaluate, print_summary

    result = evaluate(
        args.benchmark,
        args.model,
        out=out,
        capture=args.capture_spec(),
        options=args.eval_options(),
        resume=args.resume,
        storage=args.storage,
        shard_bytes=parse_size(args.shard_size),
        ray=args.ray_options(),
        progress=not args.quiet,
        verify=args.verify,
        fields=parse_fields(args.fields),
        load=args.load_kwargs(),
    )
    print_summary(result)


def default_out(benchmark: str) -> str:
    """The default run folder: ``runs/<benchmark>``, unsafe characters replaced.

    ``runs/demo``, ``runs/questions`` (of questions.jsonl), ``runs/mmlu-test`` (of
    ``mmlu:data/mmlu/test``).
    """
    import re
    from pathlib import Path

    kind, _, where = benchmark.partition(":")
    stem = Path(where or benchmark).stem or benchmark
    # mmlu:data/mmlu/test and gsm8k:data/gsm8k/test.jsonl both end in "test": keep the kind.
    name = f"{kind}-{stem}" if where and stem != kind else stem
    return f"runs/{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def report(result: Any, benchmark: str, model: str) -> None:
    """Print accuracy overall and per category, where the files are, and the run's checks."""
    from actcap.api import print_summary

    print_summary(result, benchmark=benchmark, model=model)
