"""What to capture: the model-independent description of a capture request."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from actcap.capture.sites import SITE_KINDS, LayerRequest, Site, SiteKind
from actcap.errors import CaptureError, UnknownNameError
from actcap.models.loading import parse_dtype
from actcap.storage.float8 import FLOAT8

TokenSelection = Literal["all", "last", "mean"]
TOKEN_SELECTIONS: tuple[TokenSelection, ...] = ("all", "last", "mean")


@dataclass(frozen=True)
class CaptureSpec:
    """A capture request, independent of any model (so it can be stored in ``run.json``)."""

    layers: LayerRequest = None
    """``None``/``"all"`` for embeddings plus every layer, or indices, ranges and site names."""
    kinds: tuple[SiteKind, ...] = ("resid",)
    """Which sites of each layer given by index: ``resid``, ``attn``, ``mlp``."""
    token_selection: TokenSelection = "all"
    """``all`` keeps ``[tokens, hidden]``; ``last`` and ``mean`` reduce to ``[hidden]``."""
    dtype: str = "float32"
    """Storage dtype: ``float32``, ``float16``, ``bfloat16`` or ``float8`` (e4m3 with a float32
    scale per token vector, :mod:`actcap.storage.float8`; captured in float32, quantized when
    stored)."""
    capture_generated: bool = False
    """Also record every generated token's activations (prefill plus each decode step)."""
    stats: tuple[str, ...] = ()
    """Sites whose statistics over every token are accumulated (:mod:`actcap.capture.stats`):
    ``("all",)`` for every captured site, or items in the syntax of ``layers``; empty for none."""
    offload_device: str = "cpu"
    """Where hooks copy activations to as soon as they are produced."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Free-form notes carried into the run record."""

    def __post_init__(self) -> None:
        """Check option values early, with messages that list the valid ones."""
        if self.token_selection not in TOKEN_SELECTIONS:
            raise UnknownNameError(
                f"Unknown token selection {self.token_selection!r}. Choose one of: "
                f"{', '.join(TOKEN_SELECTIONS)}."
            )
        for kind in self.kinds:
            if kind not in SITE_KINDS:
                raise UnknownNameError(
                    f"Unknown site kind {kind!r}. Choose from: {', '.join(SITE_KINDS)}."
                )
        if self.dtype != FLOAT8:
            parse_dtype(self.dtype)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "stats", _stats_items(self.stats))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype activations are copied in (float32 for ``float8``, quantized when stored)."""
        if self.dtype == FLOAT8:
            return torch.float32
        dtype = parse_dtype(self.dtype)
        return dtype if dtype is not None else torch.float32

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description, for run records."""
        layers: Any = (
            list(self.layers)
            if isinstance(self.layers, Sequence) and not isinstance(self.layers, str)
            else self.layers
        )
        return {
            "layers": layers,
            "kinds": list(self.kinds),
            "token_selection": self.token_selection,
            "dtype": self.dtype,
            "capture_generated": self.capture_generated,
            **({"stats": list(self.stats)} if self.stats else {}),
        }

    def stats_sites(
        self, captured: Sequence[Site], resolve: Callable[[LayerRequest], Sequence[Site]]
    ) -> list[str]:
        """The names of the captured sites :attr:`stats` asks for (``all``: every one).

        Raises:
            UnknownNameError: A site asked for is not captured.
        """
        names = [s.name for s in captured]
        if not self.stats:
            return []
        if "all" in self.stats:
            return names
        wanted = [s.name for s in resolve(list(self.stats))]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise UnknownNameError(
                f"--stats {','.join(self.stats)}: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not captured; add "
                f"{'it' if len(missing) == 1 else 'them'} to --layers/--sites or choose among: "
                f"{', '.join(names)}."
            )
        return wanted


def _stats_items(stats: object) -> tuple[str, ...]:
    """``stats`` as a tuple of site requests.

    Raises:
        CaptureError: ``stats`` is not a string or a sequence of strings.
    """
    if isinstance(stats, str):
        return (stats,)
    if isinstance(stats, Sequence) and all(isinstance(s, str) for s in stats):
        return tuple(stats)
    raise CaptureError(
        f"stats={stats!r}: give the statistics sites as a string or a sequence of strings: "
        "'all' (every captured site), or items in the syntax of layers ('0', '0-3,-1', "
        "'layer_3.mlp'); () for none."
    )
