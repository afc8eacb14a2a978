"""``actcap generate``: answer one prompt and save its activations."""

from __future__ import annotations

import click

from actcap.cli.common import (
    apply_options,
    device_option,
    dtype_option,
    layers_option,
    model_option,
    parse_kinds,
    parse_layers,
    placement_kwargs,
    placement_options,
    reports_errors,
    sites_option,
    token_option,
)


@click.command()
@click.argument("prompt")
@click.option(
    "--save", "save_path", type=click.Path(dir_okay=False), help="Write the activation file here."
)
@model_option
@layers_option
@sites_option
@token_option
@dtype_option
@device_option
@apply_options(placement_options)
@click.option(
    "--max-new-tokens",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most tokens the answer may have (with the prompt, within the model's context).",
)
@click.option("--capture-generated", is_flag=True, help="Also capture the answer's tokens.")
@reports_errors
def generate(
    prompt: str,
    save_path: str | None,
    model: str,
    layers: str | None,
    kinds: str,
    token_selection: str,
    dtype: str,
    device: str,
    device_map: str | None,
    max_memory: str | None,
    offload_folder: str | None,
    max_new_tokens: int,
    capture_generated: bool,
) -> None:
    """Answer PROMPT with the model and capture its activations."""
    from actcap.api import capture, load_model
    from actcap.models.loading import LoadedModel

    placed = placement_kwargs(
        {
            "device": device,
            "device_map": device_map,
            "max_memory": max_memory,
            "offload_folder": offload_folder,
        }
    )
    lm: str | LoadedModel = load_model(model, **placed) if device_map else model
    (captured,) = capture(
        prompt,
        lm,
        save=save_path,
        layers=parse_layers(layers),
        sites=parse_kinds(kinds),  # type: ignore[arg-type]
        token_selection=token_selection,  # type: ignore[arg-type]
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        capture_generated=capture_generated,
        device=device,
    )
    response = captured.response
    click.echo(response)
    acts = captured.activations
    first = next(iter(acts.values()))
    where = (
        f"saved to {save_path}"
        if save_path
        else "not saved (pass --save FILE.safetensors to keep them)"
    )
    click.echo(
        f"captured {len(acts)} sites, shape {tuple(first.shape)} each, dtype {dtype}: {where}",
        err=True,
    )
