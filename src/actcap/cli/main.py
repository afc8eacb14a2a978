"""The ``actcap`` command group. Subcommands import torch only when they run."""

from __future__ import annotations

import click

from actcap import __version__
from actcap.cli.analyze_cmd import analyze, export, lens, plot, probe, report
from actcap.cli.common import one_line_warnings
from actcap.cli.eval_cmd import eval_command
from actcap.cli.generate import generate
from actcap.cli.inspect_cmd import inspect_file
from actcap.cli.lm_eval_cmd import lm_eval_command
from actcap.cli.verify_cmd import verify_command
from actcap.cli.view_cmd import view_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="actcap")
def cli() -> None:
    """Capture a language model's activations while it answers, store them, analyse them."""


cli.add_command(generate)
cli.add_command(inspect_file)
cli.add_command(eval_command)
cli.add_command(lm_eval_command)
cli.add_command(verify_command)
cli.add_command(view_command)
for command in (analyze, plot, probe, report, lens, export):
    cli.add_command(command)


def main() -> None:
    """Entry point of the ``actcap`` console script."""
    one_line_warnings()
    cli()
