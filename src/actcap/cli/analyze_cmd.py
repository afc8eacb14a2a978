"""``actcap analyze | plot | probe | report | lens``: numbers and pictures from stored activations."""

from __future__ import annotations

from typing import Any

import click

from actcap.cli.common import reports_errors


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def print_stats(rows: list[Any]) -> None:
    """A per-site table of statistics."""
    width = max([len(r.site) for r in rows] + [4])
    click.echo(
        f"{'site'.ljust(width)}  {'shape':<14} {'mean':>10} {'std':>10} {'min':>10} {'max':>10} {'norm/tok':>10} {'zeros':>7}"
    )
    for r in rows:
        click.echo(
            f"{r.site.ljust(width)}  {str(list(r.shape)):<14} {_fmt(r.mean):>10} {_fmt(r.std):>10} {_fmt(r.min):>10} "
            f"{_fmt(r.max):>10} {_fmt(r.mean_norm):>10} {r.frac_zero:>7.2%}"
        )


def parse_tokens(text: str | None) -> slice | None:
    """``--tokens -5:`` into a slice."""
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            i = int(text)
            return slice(i, i + 1 if i != -1 else None)
        return slice(int(lo) if lo else None, int(hi) if hi else None)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a token range; give N, A:B, -5: or :10.", param_hint="'--tokens'"
        ) from None


@click.command("analyze", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False),
    help="One activation file: per-site statistics.",
)
@click.option(
    "--directory",
    type=click.Path(file_okay=False),
    help="A run directory or folder of files: summary across samples.",
)
@click.option(
    "--compare",
    nargs=2,
    type=click.Path(dir_okay=False),
    help="Two files: per-site cosine similarity.",
)
@click.option("--sites", default=None, help="Only these sites, comma-separated.")
@click.option("--tokens", default=None, help="Token range for --file, e.g. '-5:' or '0:10'.")
@reports_errors
def analyze(
    file: str | None,
    directory: str | None,
    compare: tuple[str, str] | None,
    sites: str | None,
    tokens: str | None,
) -> None:
    """Statistics of one file, a summary of a directory, or a comparison of two files."""
    from actcap.api import analyse_file, analyse_run
    from actcap.api import compare as compare_files

    chosen = [s.strip() for s in sites.split(",")] if sites else None
    if sum(bool(x) for x in (file, directory, compare)) != 1:
        raise click.UsageError("Give exactly one of --file, --directory or --compare.")
    if file:
        print_stats(analyse_file(file, sites=chosen, tokens=parse_tokens(tokens)))
    elif directory:
        s = analyse_run(directory, sites=chosen)
        click.echo(f"{directory}: {s.n_files} files read, {len(s.skipped)} skipped")
        for path, why in s.skipped.files[:10]:
            click.echo(f"  skipped {path}: {why}")
        if s.accuracy is not None:
            click.echo(
                f"graded {s.n_graded}: accuracy {s.accuracy:.3f} ({s.n_correct}/{s.n_graded})"
            )
        print_stats(s.sites)
        for label, rows in s.by_correct.items():
            click.echo(f"\n{label} samples:")
            print_stats(rows)
        print_run_statistics(directory)
    else:
        assert compare is not None
        comparisons = compare_files(*compare)
        width = max(len(r.site) for r in comparisons)
        click.echo(
            "cosine similarity per site (1 = same direction, 0 = unrelated, -1 = opposite) "
            "of the last token's vectors, of the mean vectors, and token by token:"
        )
        click.echo(
            f"{'site'.ljust(width)}  {'last token':>10} {'mean':>8} {'per token (min/mean)':>22}"
        )
        for r in comparisons:
            per = (
                f"{min(r.per_token):.3f}/{sum(r.per_token) / len(r.per_token):.3f}"
                if r.per_token
                else "tokens differ"
            )
            click.echo(
                f"{r.site.ljust(width)}  {r.last_token:>10.4f} {r.mean_tokens:>8.4f} {per:>22}"
            )


def print_run_statistics(directory: str) -> None:
    """Print a run's statistics over every token (``eval --stats``), when it has them."""
    from actcap.analysis.run_stats import run_statistics, statistics_lines

    found = run_statistics(directory)
    if found is not None:
        click.echo("")
        for line in statistics_lines(*found):
            click.echo(line)


TARGET_HELP = (
    "The label a probe decodes: correct (the grade), category, or any manifest or metadata "
    "field. Classes with a single sample are left out (and named)."
)
SITE_HELP = "Site for the similarity and PCA pictures, e.g. layer_12 (the middle layer by default)."


@click.command("plot")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--out",
    default="plots",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the PNG files.",
)
@click.option("--site", default=None, help=SITE_HELP)
@click.option(
    "--target", default="correct", show_default=True, help=TARGET_HELP + " For the probe curve."
)
@reports_errors
def plot(directory: str, out: str, site: str | None, target: str) -> None:
    """Write PNG pictures of a run: histograms, heatmaps, norms, probes, PCA.

    Bounded memory on runs of any size: pictures of many samples show a subsample, and say so.
    """
    from actcap.analysis import make_figures

    figs = make_figures(directory, out, site, target)
    for f in figs.figures:
        click.echo(f"{f.path}  {f.title}")
    for note in figs.notes:
        click.echo(f"note: {note}")
    if figs.skipped_files:
        click.echo(f"{figs.skipped_files} unreadable file(s) skipped")


@click.command("probe")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--target", default="correct", show_default=True, help=TARGET_HELP)
@click.option("--sites", default=None, help="Only these sites, comma-separated.")
@click.option(
    "--folds",
    default=5,
    show_default=True,
    type=click.IntRange(min=2),
    help="Cross-validation folds (fewer when the smallest class is smaller).",
)
@click.option(
    "--reduce",
    "how",
    default="last",
    show_default=True,
    type=click.Choice(["last", "mean"]),
    help="Each sample's vector: its last token, or the mean over its tokens.",
)
@click.option(
    "--max-samples",
    default=20_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Probe at most this many samples: a stratified subsample spread over the run. "
    "0 probes every sample (memory holds one site's vectors at a time either way).",
)
@reports_errors
def probe(
    directory: str, target: str, sites: str | None, folds: int, how: str, max_samples: int
) -> None:
    """Per-layer logistic-regression probe accuracy, cross-validated, against the majority baseline."""
    from actcap.analysis import probe_layers
    from actcap.analysis.figures import probe_notes

    chosen = [s.strip() for s in sites.split(",")] if sites else None
    results = probe_layers(
        directory,
        target,
        chosen,
        how,  # type: ignore[arg-type]
        folds,
        max_samples=max_samples or None,
    )
    first = results[0]
    of = f" of {first.labelled:,}" if first.labelled > first.n else ""
    click.echo(
        f"probe for {target!r}: {first.n:,}{of} samples, {first.folds}-fold, "
        f"majority baseline {first.baseline:.3f}"
    )
    for note in probe_notes(results):
        click.echo(f"note: {note}")
    for r in results:
        bar = "#" * round(r.accuracy * 40)
        click.echo(f"  {r.site:<14} {r.accuracy:.3f} ± {r.std:.3f}  {bar}")


@click.command("report")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "-o",
    "--out",
    default="report.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The HTML file to write.",
)
@click.option("--site", default=None, help=SITE_HELP)
@click.option("--target", default="correct", show_default=True, help=TARGET_HELP)
@reports_errors
def report(directory: str, out: str, site: str | None, target: str) -> None:
    """Write one self-contained HTML page about a run (pictures embedded, every value escaped)."""
    from actcap.analysis import build_report

    click.echo(f"wrote {build_report(directory, out, site, target)}")


@click.command("lens")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--model", default=None, help="The model the file was made with (default: the one it names)."
)
@click.option("--token", default=-1, show_default=True, type=int, help="Token position.")
@click.option(
    "-k",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many of the most likely tokens to show per site.",
)
@reports_errors
def lens(file: str, model: str | None, token: int, k: int) -> None:
    """Logit lens: each layer's residual at one token through the final norm and unembedding."""
    from actcap.analysis import logit_lens
    from actcap.analysis.lens import lens_position

    rows = logit_lens(file, model, token, k)
    click.echo(f"Logit lens of {file}: {lens_position(file, token)}; top {k} tokens per layer.")
    for row in rows:
        click.echo(
            f"{row.site:<12} "
            + "  ".join(f"{t!r} {p:.2f}" for t, p in zip(row.tokens, row.probs, strict=True))
        )


@click.command("export")
@click.argument("run")
@click.option(
    "--to",
    "to",
    default="parquet",
    show_default=True,
    type=click.Choice(["parquet", "hf-dataset", "npy"]),
    help="Parquet files, a Hugging Face dataset (save_to_disk), or .npy arrays.",
)
@click.option("--site", required=True, help="The site to export, e.g. layer_12 or layer_3.mlp.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--rows",
    default="tokens",
    show_default=True,
    type=click.Choice(["tokens", "samples"]),
    help="One row per token (SAE training) or one vector per sample (probing).",
)
@click.option(
    "--reduce",
    default="last",
    show_default=True,
    type=click.Choice(["last", "mean"]),
    help="With --rows samples: the last token's vector, or the mean over tokens.",
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "float16"]),
    help="Activation dtype of the export.",
)
@click.option(
    "--rows-per-file",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Parquet rows per file.",
)
@reports_errors
def export(**kw: Any) -> None:
    """Export one site of a run (streaming, bounded memory) for SAE training or probes."""
    from actcap.api import export

    result = export(
        kw["run"],
        kw["site"],
        kw["out"],
        to=kw["to"],
        rows=kw["rows"],
        reduce=kw["reduce"],
        dtype=kw["dtype"],
        rows_per_file=kw["rows_per_file"],
    )
    click.echo(
        f"exported {result.n_rows} rows x {result.hidden} of {kw['site']} from "
        f"{result.n_samples} samples to {result.out} ({kw['to']})"
    )
    if result.skipped.files:
        click.echo(f"skipped {len(result.skipped.files)} unreadable samples:", err=True)
        for path, why in result.skipped.files[:10]:
            click.echo(f"  {path}: {why}", err=True)
