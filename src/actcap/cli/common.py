"""Helpers shared by the subcommands: error conversion and option parsing."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from actcap.errors import ActcapError

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(fn: F) -> F:
    """Turn actcap's own errors into ``Error: ...`` and exit status 1 (tracebacks mean bugs)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ActcapError as e:
            raise click.ClickException(str(e)) from e

    return wrapper  # type: ignore[return-value]


def one_line_warnings() -> None:
    """Print warnings as ``Warning: message`` lines on stderr, without Python's source echo."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        click.echo(f"Warning: {message}", err=True)

    warnings.showwarning = show  # type: ignore[assignment]


def parse_layers(text: str | None) -> str | None:
    """``--layers``: None and ``all`` mean embeddings plus every layer; the rest is passed on."""
    if text is None or text.strip() == "all":
        return None
    return text


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--sites resid,attn,mlp`` into a tuple."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def capture_spec(kw: dict[str, Any]) -> Any:
    """The ``CaptureSpec`` of an eval command's options, or None with ``--no-capture``.

    Raises:
        click.UsageError: ``--stats`` with ``--no-capture`` (statistics are of captured sites).
    """
    stats = kw.get("stats")
    if kw["no_capture"]:
        if stats:
            raise click.UsageError(
                "--stats needs capture: its sites are captured sites. Leave out --no-capture "
                "(add --token-selection last to store one vector per site) or --stats."
            )
        return None
    from actcap.capture.spec import CaptureSpec

    return CaptureSpec(
        layers=parse_layers(kw["layers"]),
        kinds=parse_kinds(kw["kinds"]),  # type: ignore[arg-type]
        token_selection=kw["token_selection"],
        dtype=kw["dtype"],
        capture_generated=kw["capture_generated"],
        stats=(stats.strip(),) if stats else (),
    )


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


layers_option = click.option(
    "--layers",
    default=None,
    help="Layers to capture: 'all' (embeddings + every layer, the default), '0-3,-1', "
    "'-4:', or site names such as 'embeddings,layer_2.mlp,final_norm'.",
)
sites_option = click.option(
    "--sites",
    "kinds",
    default="resid",
    show_default=True,
    help="Which sites of each layer: any of resid, attn, mlp, comma-separated.",
)
dtype_option = click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "float16", "bfloat16", "float8"]),
    help="Storage dtype of the activations (float8: e4m3 with a float32 scale per token "
    "vector, half of bfloat16's size; read back as float32).",
)
token_option = click.option(
    "--token-selection",
    default="all",
    show_default=True,
    type=click.Choice(["all", "last", "mean"]),
    help="Keep every token, the last one, or their mean.",
)
model_option = click.option(
    "--model",
    default="default",
    show_default=True,
    help="'default' (built-in SmolLM2-135M-Instruct), a hub id, a model folder or a .gguf file.",
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."
)


def parse_size(text: str) -> int:
    """``1GB``, ``512MiB``, ``200000`` into bytes.

    Raises:
        click.BadParameter: For text that is no size.
    """
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise click.BadParameter(f"{text!r} is no size; write e.g. 1GB, 512MB or 200000.")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``0=70GiB,1=70GiB,cpu=200GiB`` into accelerate's ``max_memory``.

    Raises:
        click.BadParameter: For an entry without ``DEVICE=SIZE``.
    """
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        key, sep, size = part.partition("=")
        if not sep or not key.strip() or not size.strip():
            raise click.BadParameter(
                f"{part!r}: use DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB", param_hint="--max-memory"
            )
        k = key.strip()
        out[int(k) if k.isdigit() else k] = size.strip()
    return out


def apply_options(options: list[Any]) -> Callable[[F], F]:
    """Apply a list of click options to a command, in the order listed."""

    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


placement_options = [
    click.option(
        "--device-map",
        default=None,
        help="Spread the model over devices with accelerate: 'auto', 'balanced', "
        "'sequential' (layers that fit nowhere are offloaded to the CPU, then to disk).",
    ),
    click.option(
        "--max-memory",
        default=None,
        help="With --device-map: the most each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB.",
    ),
    click.option(
        "--offload-folder",
        default=None,
        type=click.Path(file_okay=False),
        help="With --device-map: where weights offloaded to disk go.",
    ),
]


def placement_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """``load_model`` keyword arguments from ``--device``, ``--device-map`` and friends."""
    out: dict[str, Any] = {"device": kw["device"]}
    if kw.get("device_map"):
        out["device_map"] = kw["device_map"]
        out["max_memory"] = parse_max_memory(kw.get("max_memory"))
        out["offload_folder"] = kw.get("offload_folder")
    elif kw.get("max_memory") or kw.get("offload_folder"):
        raise click.BadParameter("needs --device-map", param_hint="--max-memory/--offload-folder")
    return out


def interrupted_message(out: str, out_flag: str = "--out") -> str:
    """What to tell a user who pressed Ctrl-C: finished samples are kept, and how to go on."""
    return (
        f"Interrupted. Every sample finished so far is safe in {out}. To continue, run the same "
        f"command with --resume (and the same {out_flag} {out}): finished samples are skipped."
    )
