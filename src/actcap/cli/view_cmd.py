"""``actcap view RUN [RUN2]``: explore one run, or compare two, in the browser (served locally)."""

from __future__ import annotations

import webbrowser
from typing import Any

import click

from actcap.cli.common import device_option, reports_errors

VIEW_PORT = 8765


@click.command("view", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN2]")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but localhost lets other machines read the runs "
    "(there is no login): a warning is printed.",
)
@click.option(
    "--port",
    default=VIEW_PORT,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on; 0 picks any free port.",
)
@click.option(
    "--model",
    default=None,
    help="The model for token text and the logit lens (default: the one run.json names). "
    "A hub id, model folder or .gguf file.",
)
@click.option(
    "--no-model",
    is_flag=True,
    help="Load no model: tokens show as ids and the logit lens is off.",
)
@device_option
@click.option(
    "--max-samples",
    default=300,
    show_default=True,
    type=click.IntRange(10, 20_000),
    help="Questions read for run-wide statistics (directions, averages, probes, similarity).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a web browser.")
@reports_errors
def view_command(runs: tuple[str, ...], **kw: Any) -> None:
    """Explore a run (or two side by side) in the browser, served on this machine.

    Accuracy, the questions, token-by-layer heatmaps, the logit lens, probes by layer and the
    similarity of questions; with RUN2, both runs' answers and per-layer cosine on their shared
    questions. Serves on 127.0.0.1 (this machine only) until Ctrl-C, and opens nothing unless --open.
    """
    from actcap.view import ViewApp, ViewServer, is_loopback

    if len(runs) > 2:
        raise click.UsageError(f"give one or two runs, not {len(runs)}.")
    app = ViewApp(*_open_runs(runs, kw), max_samples=kw["max_samples"])
    server = ViewServer(app, kw["host"], kw["port"])
    app.start_models()
    shown = ", ".join(f"{r.label} ({len(r.entries):,} questions)" for r in app.runs)
    click.echo(f"actcap view: {shown}")
    if not is_loopback(kw["host"]):
        click.secho(
            f"WARNING: listening on {kw['host']}: anyone who can reach this machine on port "
            f"{server.port} can read these runs (prompts, answers, activations); there is no "
            "login. Use the default --host 127.0.0.1 unless you mean it.",
            fg="red",
            bold=True,
            err=True,
        )
    click.echo(f"serving at {server.url} (Ctrl-C to stop)")
    if kw["open_browser"]:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped.")
    finally:
        server.server_close()


def _open_runs(runs: tuple[str, ...], kw: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The runs, opened, and one model holder per run (shared when they name the same model)."""
    from actcap.view import ModelHolder, RunView, label_for, model_spec

    labels = [label_for(r) for r in runs]
    if len(set(labels)) < len(labels):
        labels = list(runs)  # two folders of one name: show the paths as given
    views = [RunView(r, label) for r, label in zip(runs, labels, strict=True)]
    holders: dict[str | None, ModelHolder] = {}
    chosen: list[ModelHolder | None] = []
    for v in views:
        if kw["no_model"]:
            chosen.append(None)
            continue
        spec = model_spec(v.config, kw["model"])
        if spec not in holders:
            why = f"{v.label}: run.json names no model; pass --model to read token text and the logit lens."
            holders[spec] = ModelHolder(spec, kw["device"], why)
        chosen.append(holders[spec])
    return views, chosen
