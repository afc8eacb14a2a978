"""lm-evaluation-harness from the command line: ``actcap eval --task`` and ``actcap lm-eval``.

- ``actcap eval --task NAME[,NAME] [--tasks-path DIR] [--num-fewshot K] [--apply-chat-template]``:
  lm-eval's tasks with actcap's run directory (see :mod:`actcap.lm_eval.runner`).
- ``actcap lm-eval ARGS``: lm-eval's own command line, with actcap's model registered as
  ``actcap`` (``--model actcap --model_args pretrained=default,capture_dir=runs/x``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import click

from actcap.cli.common import (
    interrupted_message,
    parse_size,
    reports_errors,
)

if TYPE_CHECKING:
    from actcap.cli.eval_cmd import EvalArgs

TASK_ONLY = ("tasks_path", "num_fewshot", "apply_chat_template")
"""Options of ``eval`` that mean something with ``--task`` only."""
NOT_WITH_TASK = (
    "benchmark",
    "few_shot",
    "mode",
    "grader",
    "choice_format",
    "max_new_tokens",
    "overflow",
    "fields",
    "use_ray",
    "verify",
    "stats",
)
"""Options of ``eval`` for actcap's own sources, which lm-eval's tasks replace (``--stats``: the
lm-eval bridge does not accumulate statistics)."""
SUBSTITUTES = {
    "benchmark": "--task",
    "few_shot": "--num-fewshot",
    "max_new_tokens": "the task's generation_kwargs",
}


def _given(names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` given on the command line, as the user spelled them."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return [
        "--" + ("ray" if n == "use_ray" else "field" if n == "fields" else n.replace("_", "-"))
        for n in names
        if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)
    ]


def dispatch_task(args: EvalArgs) -> bool:
    """Run ``actcap eval --task`` when ``--task`` is given; refuse its options without it.

    Returns:
        Whether the command was handled here.

    Raises:
        click.UsageError: For options that do not go together.
    """
    if not args.task:
        stray = _given(TASK_ONLY)
        if stray:
            raise click.UsageError(
                f"{', '.join(stray)} {'needs' if len(stray) == 1 else 'need'} --task "
                "(lm-evaluation-harness tasks)."
            )
        return False
    wrong = _given(NOT_WITH_TASK)
    if wrong:
        hints = [
            SUBSTITUTES[n]
            for n in NOT_WITH_TASK
            if f"--{n.replace('_', '-')}" in wrong and n in SUBSTITUTES
        ]
        instead = f" (with --task use {', '.join(hints)})" if hints else ""
        raise click.UsageError(
            f"{', '.join(wrong)} cannot go with --task: lm-eval's tasks set their own prompts, "
            f"few-shot examples, answering and metrics{instead}."
        )
    run_task_eval(args)
    return True


def task_names(text: str) -> list[str]:
    """``--task a,b`` into names.

    Raises:
        click.BadParameter: When no name is given.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("give at least one task name, e.g. arc_easy", param_hint="--task")
    return names


def default_task_out(names: list[str]) -> str:
    """``runs/<first task>`` (and ``+N`` when there are more)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", names[0])
    return f"runs/{stem}" + (f"+{len(names) - 1}" if len(names) > 1 else "")


def run_task_eval(args: EvalArgs) -> None:
    """Load the model, answer the tasks, print actcap's summary and lm-eval's metrics."""
    names = task_names(args.task or "")
    out = args.out or default_task_out(names)
    try:
        _run(args, names, out)
    except KeyboardInterrupt:
        click.echo(interrupted_message(out), err=True)
        raise click.exceptions.Exit(130) from None


def _run(args: EvalArgs, names: list[str], out: str) -> None:
    from actcap.lm_eval import require_lm_eval

    require_lm_eval("actcap eval --task")  # before the model loads
    from actcap.api import print_summary
    from actcap.lm_eval import run_tasks
    from actcap.models import load_model

    capture = args.capture_spec()
    lm = load_model(args.model, **args.load_kwargs())
    result = run_tasks(
        lm,
        names,
        out=out,
        capture=capture,
        tasks_path=args.tasks_path,
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
        batch_size=args.batch_size,
        limit=args.limit,
        resume=args.resume,
        storage=args.storage,
        shard_bytes=parse_size(args.shard_size),
        progress=not args.quiet,
    )
    print_lm_eval_metrics(result.lm_eval)
    print_summary(result, benchmark="lm-eval:" + ",".join(names), model=lm.display_name)


def print_lm_eval_metrics(results: dict[str, Any]) -> None:
    """lm-eval's aggregated metrics: one line per task and metric, with its standard error."""
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, where = key.partition(",")
            if not where or "_stderr" in metric or not isinstance(value, int | float):
                continue
            err = metrics.get(f"{metric}_stderr,{where}")
            shown = f" ± {err:.4f}" if isinstance(err, int | float) else ""
            click.echo(f"  {task:<28} {metric},{where:<18} {value:.4f}{shown}")


@click.command(
    "lm-eval",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@reports_errors
def lm_eval_command(args: tuple[str, ...]) -> None:
    """lm-evaluation-harness's own command line, with actcap's model as 'actcap'.

    For example: actcap lm-eval --model actcap --model_args
    pretrained=default,capture_dir=runs/x,layers=all --tasks arc_easy. Everything after
    'lm-eval' goes to lm-eval ('actcap lm-eval --help' shows its options).
    Needs pip install 'actcap[lm-eval]'.
    """
    from actcap.lm_eval import require_lm_eval

    require_lm_eval("actcap lm-eval")
    from actcap.lm_eval.runner import run_lm_eval_cli

    run_lm_eval_cli(list(args))
