"""What to capture: the model-independent description of a capture request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from actcap.capture.sites import SITE_KINDS, LayerRequest, SiteKind
from actcap.errors import UnknownNameError
from actcap.models.loading import parse_dtype

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
    """Storage dtype: ``float32``, ``float16`` or ``bfloat16``."""
    capture_generated: bool = False
    """Also record every generated token's activations (prefill plus each decode step)."""
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
        parse_dtype(self.dtype)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The storage dtype as a torch dtype."""
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
        }
