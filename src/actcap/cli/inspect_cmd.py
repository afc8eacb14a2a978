"""``actcap inspect``: what an activation file holds, without loading its tensors."""

from __future__ import annotations

import json
from pathlib import Path

import click

from actcap.cli.common import human_bytes, reports_errors


@click.command("inspect")
@click.argument("path")
@click.option(
    "--sample",
    default=None,
    help="With a run directory or URL (either layout, files or shards): the sample id to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
@reports_errors
def inspect_file(path: str, sample: str | None, as_json: bool) -> None:
    """Show the sites, shapes, dtypes, metadata and size of an activation file or run sample."""
    from actcap.storage.format import ShardSlice
    from actcap.storage.location import is_url
    from actcap.storage.reader import ActivationFile
    from actcap.storage.runinfo import open_run

    source: str | ShardSlice = path
    if sample is not None or is_url(path) or Path(path).is_dir():
        info = open_run(path)
        if sample is None:
            shown = ", ".join(e.id for e in info.entries[:5])
            raise click.UsageError(
                f"{path} is a run of {len(info.entries)} samples ({shown}, ...); pass --sample ID."
            )
        found = info.find(sample).source(info.root)
        if found is None:
            raise click.UsageError(f"sample {sample!r} was run without capture.")
        source = found if isinstance(found, ShardSlice) else str(found)
    with ActivationFile(source) as f:
        size = source.length if isinstance(source, ShardSlice) else Path(source).stat().st_size
        path = f.label
        rows = [
            (name, f.shape(name), f.dtype(name))
            for name in [*f.sites, *(n for n in ("input_ids", "output_ids") if n in f.names)]
        ]
        meta = dict(f.raw_metadata)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": path,
                    "size_bytes": size,
                    "tensors": {n: {"shape": list(s), "dtype": d} for n, s, d in rows},
                    "metadata": meta,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    click.echo(f"{path}  ({human_bytes(size)} on disk, {len(rows)} tensors)")
    width = max((len(n) for n, _, _ in rows), default=4)
    click.echo(f"  {'name'.ljust(width)}  {'shape':<16} dtype")
    for name, shape, dtype in rows:
        click.echo(f"  {name.ljust(width)}  {str(list(shape)):<16} {dtype}")
    click.echo("metadata:")
    for key, value in meta.items():
        shown = value if len(value) <= 200 else value[:197] + "..."
        click.echo(f"  {key}: {shown!r}" if "\n" in shown else f"  {key}: {shown}")
