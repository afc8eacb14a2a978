"""The site-name grammar: how activation sites are named, parsed and ordered.

The names are hook keys, tensor names on disk and plot labels alike (``docs/format.md``):

- ``embeddings``: the input of decoder block 0;
- ``layer_<i>``: the residual stream leaving decoder block ``i`` (``i`` from 0);
- ``layer_<i>.attn`` / ``layer_<i>.mlp``: the output of block ``i``'s attention / MLP module;
- ``final_norm``: the output of the norm after the last block;
- any other dotted module path of the model (its output).

Capture (:mod:`actcap.capture.sites`), storage and analysis all parse and order names here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

EMBEDDINGS = "embeddings"
FINAL_NORM = "final_norm"
SiteKind = Literal["resid", "attn", "mlp"]
"""Which site of a decoder block: its output (the residual stream), its attention or its MLP."""
SITE_KINDS: tuple[SiteKind, ...] = ("resid", "attn", "mlp")
_SUFFIX: dict[SiteKind, str] = {"resid": "", "attn": ".attn", "mlp": ".mlp"}
_LAYER_NAME = re.compile(r"^layer_(-?\d+)(?:\.(attn|mlp))?$")
_LAYER_PREFIX = re.compile(r"^layer_(\d+)(.*)$")


def layer_site(index: int, kind: SiteKind = "resid") -> str:
    """The name of a block's site: ``layer_3``, ``layer_3.attn`` or ``layer_3.mlp``."""
    return f"layer_{index}{_SUFFIX[kind]}"


def layer_sites(indices: Iterable[int], kinds: Sequence[SiteKind] = ("resid",)) -> list[str]:
    """The names of ``kinds`` sites of each block in ``indices``, block by block."""
    return [layer_site(i, k) for i in indices for k in kinds]


def parse_layer_site(name: str) -> tuple[int, SiteKind] | None:
    """``(index, kind)`` of a ``layer_<i>[.attn|.mlp]`` name; None for any other name.

    ``i`` may be negative here: a request counts such layers from the end.
    """
    m = _LAYER_NAME.match(name)
    if m is None:
        return None
    kind: SiteKind = "attn" if m.group(2) == "attn" else "mlp" if m.group(2) == "mlp" else "resid"
    return int(m.group(1)), kind


def site_names(num_layers: int) -> list[str]:
    """Every canonical site name of a model with ``num_layers`` decoder blocks, in network order."""
    return [EMBEDDINGS, *layer_sites(range(num_layers), SITE_KINDS), FINAL_NORM]


def is_residual_site(name: str) -> bool:
    """``embeddings`` or ``layer_<i>``: a site on the residual stream."""
    return name == EMBEDDINGS or (name.startswith("layer_") and "." not in name)


def residual_sites(sites: Iterable[str]) -> list[str]:
    """The residual-stream sites among ``sites``, in network order."""
    return sorted((s for s in sites if is_residual_site(s)), key=site_sort_key)


def site_sort_key(name: str) -> tuple[int, int, str]:
    """Order sites as they sit in the network: embeddings, layer_0, layer_0.attn, ..., final_norm.

    Module paths come last, by name.
    """
    m = _LAYER_PREFIX.match(name)
    if name == EMBEDDINGS:
        return (0, 0, "")
    if m:
        return (1, int(m.group(1)), m.group(2))
    if name == FINAL_NORM:
        return (2, 0, "")
    return (3, 0, name)
