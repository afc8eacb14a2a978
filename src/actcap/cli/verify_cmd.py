"""``actcap verify``: re-check a finished run's activations against the model run on each prompt alone."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from actcap.cli.common import device_option, reports_errors


@click.command("verify")
@click.argument("run")
@click.option(
    "--n",
    "n",
    default=None,
    type=click.IntRange(min=1),
    help="Samples to re-check, chosen at random  [default: 0.5% of the run, at least 1, at most 8].",
)
@click.option(
    "--samples",
    default=None,
    help="Re-check these samples instead: ids from manifest.jsonl, comma-separated.",
)
@click.option(
    "--model",
    default=None,
    help="The model to run  [default: the run's own, from run.json].",
)
@device_option
@click.option("--seed", default=None, type=int, help="Seed of the random choice of samples.")
@click.option(
    "--tolerance",
    default=None,
    type=click.FloatRange(min=0),
    help="Largest relative difference per token allowed  [default: by dtype, see docs/verification.md].",
)
@click.option(
    "--no-record",
    is_flag=True,
    help="Do not write the verdict into the run's results.json.",
)
@reports_errors
def verify_command(**kw: Any) -> None:
    """Re-run samples of RUN (a directory or URL) alone and compare with what the run stored.

    Exits with status 1 when a site differs beyond the tolerance, an answer differs, or the
    storage dtype could not hold the values.
    """
    from actcap.bench.verify import record_verification, verify_run
    from actcap.models.loading import load_model
    from actcap.storage.runinfo import open_run

    info = open_run(kw["run"])
    model, dtype = run_model(info.config, kw["model"])
    lm = load_model(model, device=kw["device"], dtype=dtype)
    ids = [s.strip() for s in kw["samples"].split(",") if s.strip()] if kw["samples"] else None
    result = verify_run(
        info, lm, n=kw["n"], sample_ids=ids, seed=kw["seed"], tolerance=kw["tolerance"]
    )
    print_verification(result)
    if not kw["no_record"] and result.passed is not None:
        written = record_verification(info.root, result.to_json())
        if written:
            click.echo(f"recorded in {written}")
    if result.passed is False:
        raise click.exceptions.Exit(1)


def run_model(config: dict[str, Any], override: str | None) -> tuple[str, str | None]:
    """The model to load for a run, and the dtype it computed in (when ``run.json`` says)."""
    from actcap.models.builtin import DEFAULT_MODEL_NAME

    dtype = (config.get("compute") or {}).get("dtype")
    dtype = dtype if isinstance(dtype, str) else None
    if override:
        return override, dtype
    name = str(config.get("model") or "default")
    if name == DEFAULT_MODEL_NAME:
        return "default", dtype
    source = config.get("model_source")
    return (str(source) if source else name), dtype


def print_verification(result: Any) -> None:
    """Per site the largest differences, per sample the answer check, then the verdict."""
    if result.sites:
        click.echo(
            f"{'site':<28} {'max abs diff':>13} {'max rel diff':>13}  tolerance {result.tolerance:.1e}"
        )
        for site, d in result.sites.items():
            flag = "" if d["max_rel"] <= result.tolerance else "  <-- over"
            click.echo(f"{site:<28} {d['max_abs']:>13.3e} {d['max_rel']:>13.3e}{flag}")
    for s in result.samples:
        click.echo(f"sample {s.id}: answer {s.answer} ({s.answer_detail})")
    basis = ", ".join(f"{k} {v}" for k, v in result.basis.items())
    if basis:
        click.echo(f"basis: {basis}; seed {result.seed}")
    line = result.summary()
    if result.passed is False:
        click.secho(f"WARNING: {line}", fg="red", bold=True, err=True)
    else:
        click.echo(line)


@contextmanager
def checks_printed_not_warned() -> Iterator[None]:
    """Inside ``actcap eval``: verification warnings become summary lines (``EvalResult.check_lines``)."""
    from actcap.bench.verify import VerificationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerificationWarning)
        yield
