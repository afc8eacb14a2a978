"""Activation sites: parsing of layer requests, and resolution of site names onto modules.

The names follow the grammar of :mod:`actcap.storage.names` (which parses, formats and orders them):

Canonical names, used as hook keys, tensor names on disk and plot labels alike:

- ``embeddings``: the input of decoder block 0 (token plus, where the model has them, position
  embeddings, after any scaling), which equals ``hidden_states[0]`` of ``output_hidden_states``;
- ``layer_<i>``: the residual stream leaving decoder block ``i``;
- ``layer_<i>.attn`` / ``layer_<i>.mlp``: the output of block ``i``'s attention / MLP module;
- ``final_norm``: the output of the norm after the last block;
- any other dotted module path of the model (its output).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from actcap.errors import UnknownNameError
from actcap.models.layout import Layout
from actcap.storage.names import (
    EMBEDDINGS,
    FINAL_NORM,
    SITE_KINDS,
    SiteKind,
    layer_site,
    layer_sites,
    parse_layer_site,
    site_names,
)

LayerRequest = None | str | int | Sequence[int | str]

__all__ = [
    "SITE_KINDS",
    "LayerRequest",
    "Site",
    "SiteKind",
    "layer_indices",
    "nearest_sites",
    "resolve_sites",
    "site_names",
]
"""``SiteKind``, ``SITE_KINDS`` and ``site_names`` belong to the grammar in :mod:`actcap.storage.names`;
capture offers them with the rest of its site vocabulary."""

_RANGE = re.compile(r"^(-?\d+)\s*(?:-|\.\.)\s*(-?\d+)$")
_SLICE = re.compile(r"^(-?\d*)\s*:\s*(-?\d*)$")


@dataclass(frozen=True)
class Site:
    """One place in the model whose activation is recorded."""

    name: str
    """Canonical name (``layer_3.mlp``)."""
    module_path: str
    """Dotted path of the module hooked."""
    hook: Literal["input", "output"] = "output"
    """Whether the module's first input or its output is recorded."""


def layer_indices(spec: str | int, num_layers: int) -> list[int]:
    """Parse a layer request such as ``"0-3,-1"``, ``"all"``, ``"-4:"`` or ``5`` into indices.

    Ranges ``a-b`` include both ends; slices ``a:b`` follow Python; negative numbers count from
    the end.

    Raises:
        UnknownNameError: For text that is no layer request, or an index out of range.
    """
    if isinstance(spec, int):
        return [_check_index(spec, num_layers)]
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "all":
            out.extend(range(num_layers))
        elif re.fullmatch(r"-?\d+", part):
            out.append(_check_index(int(part), num_layers))
        elif m := _RANGE.match(part):
            lo, hi = (_check_index(int(x), num_layers) for x in m.groups())
            if lo > hi:
                raise UnknownNameError(f"Layer range {part!r} is empty: {lo} comes after {hi}.")
            out.extend(range(lo, hi + 1))
        elif m := _SLICE.match(part):
            lo_s, hi_s = m.groups()
            out.extend(
                range(num_layers)[slice(int(lo_s) if lo_s else None, int(hi_s) if hi_s else None)]
            )
        else:
            raise UnknownNameError(
                f"Cannot read layer request {part!r}. Use indices and ranges such as "
                "'0-3,-1', '5', '-4:' or 'all'."
            )
    return _unique(out)


def _check_index(index: int, num_layers: int) -> int:
    if not -num_layers <= index < num_layers:
        raise UnknownNameError(
            f"Layer {index} is out of range: this model has {num_layers} layers, so valid "
            f"indices are 0..{num_layers - 1} (or -{num_layers}..-1)."
        )
    return index % num_layers


def _unique(items: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(items))


def resolve_sites(
    model: nn.Module,
    layout: Layout,
    layers: LayerRequest = None,
    kinds: Sequence[SiteKind] = ("resid",),
) -> list[Site]:
    """Turn a user's request into the sites to hook, in a stable order.

    Args:
        model: The model whose modules are hooked.
        layout: Its layout (decoder blocks, final norm).
        layers: ``None`` or ``"all"`` for the embeddings plus every layer; layer indices and
            ranges (``[0, 5, -1]``, ``"0-3,-1"``); or names (``["embeddings", "layer_2.mlp",
            "final_norm", "model.layers.0.self_attn.o_proj"]``), freely mixed.
        kinds: For layers given by index, which sites of each: ``resid`` (the block's output),
            ``attn``, ``mlp``.

    Returns:
        The sites, without duplicates.

    Raises:
        UnknownNameError: For an unknown site or an out-of-range layer; the message lists what is
            valid.
    """
    n = layout.num_layers
    for kind in kinds:
        if kind not in SITE_KINDS:
            close = difflib.get_close_matches(kind, SITE_KINDS, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"Unknown site kind {kind!r} (--sites).{hint} Choose from: {', '.join(SITE_KINDS)}."
            )
    if layers is None or layers == "all":
        names = [EMBEDDINGS, *layer_sites(range(n), kinds)]
    elif isinstance(layers, int | str):
        names = _names_from_item(layers, n, kinds)
    else:
        names = [name for item in layers for name in _names_from_item(item, n, kinds)]
    modules = dict(model.named_modules())
    return [_site(name, layout, modules) for name in dict.fromkeys(names)]


def _names_from_item(item: int | str, n: int, kinds: Sequence[SiteKind]) -> list[str]:
    if isinstance(item, int):
        return layer_sites(layer_indices(item, n), kinds)
    text = item.strip()
    if text == "all":
        return [EMBEDDINGS, *layer_sites(range(n), kinds)]
    if re.fullmatch(r"[-\d\s,:.]+", text) and re.search(r"\d|:", text):
        return layer_sites(layer_indices(text, n), kinds)
    if "," in text:
        return [name for part in text.split(",") for name in _names_from_item(part, n, kinds)]
    return [text]


def _site(name: str, layout: Layout, modules: dict[str, nn.Module]) -> Site:
    n = layout.num_layers
    if name == EMBEDDINGS:
        return Site(name, layout.block_path(0), "input")
    if name == FINAL_NORM:
        if layout.final_norm_path is None:
            raise UnknownNameError(
                "This model has no final norm module, so 'final_norm' cannot be captured."
            )
        return Site(name, layout.final_norm_path)
    if parsed := parse_layer_site(name):
        index, kind = _check_index(parsed[0], n), parsed[1]
        path = layout.block_path(index) if kind == "resid" else layout.child_path(index, kind)
        return Site(layer_site(index, kind), path)
    if name in modules and name:
        return Site(name, name)
    close = nearest_sites(name, n, list(modules))
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownNameError(
        f"Unknown site {name!r}.{hint} Valid sites: embeddings, layer_0..layer_{n - 1} "
        f"(each also .attn and .mlp), final_norm, or a module path such as "
        f"{layout.block_path(0)!r}."
    )


def nearest_sites(name: str, num_layers: int, module_paths: Sequence[str] = ()) -> list[str]:
    """The names closest to a misspelled ``name``, best first: site names, or module paths for a path.

    ``layer_2.mpl`` gives ``layer_2.mlp``; ``model.layers.0.mlpp`` gives ``model.layers.0.mlp``.
    """
    candidates = [*site_names(num_layers), *(p for p in module_paths if p)]
    return difflib.get_close_matches(name, candidates, n=3)
