"""``actcap inspect``: what an activation file holds, without loading its tensors."""

from __future__ import annotations

import json
from pathlib import Path

import click

from actcap.cli.common import human_bytes, reports_errors


@click.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
@reports_errors
def inspect_file(path: str, as_json: bool) -> None:
    """Show the sites, shapes, dtypes, metadata and size on disk of an activation file."""
    from actcap.storage.files import ActivationFile

    with ActivationFile(path) as f:
        size = Path(path).stat().st_size
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
