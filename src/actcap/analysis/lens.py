"""Logit lens: each layer's residual stream read through the model's final norm and unembedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actcap.analysis.stats import check_has_values
from actcap.errors import (
    AnalysisError,
    IncompatibleInputsError,
    SiteShapeError,
    TokenPositionError,
)
from actcap.storage.format import SampleSource
from actcap.storage.names import is_residual_site, parse_layer_site
from actcap.storage.reader import ActivationFile


@dataclass(frozen=True)
class LensRow:
    """The top-k tokens one site's residual predicts at one position."""

    site: str
    """Site name."""
    tokens: list[str]
    """Top-k tokens, most likely first."""
    probs: list[float]
    """Their probabilities."""


@torch.inference_mode()
def logit_lens(path: SampleSource, model: Any = None, token: int = -1, k: int = 5) -> list[LensRow]:
    """Decode each residual-stream site of a file at one token position.

    Args:
        path: An activation file with ``embeddings``/``layer_<i>`` sites.
        model: A loaded model, a model spec, or None for the model named in the file
            (``"SmolLM2-135M-Instruct"`` means the built-in default).
        token: Position (for ``[tokens, hidden]`` sites); a reduced file (token selection
            ``last`` or ``mean``) holds one vector per site and takes only the default, -1.
        k: Tokens per site.

    Raises:
        ActcapError: When the file holds no residual-stream site, ``token`` is past its end or
            given for a reduced file, or
            the model does not fit it (checked before the model is loaded, where they can be).
        FormatError: When the file is unreadable or a site holds no values.
    """
    from actcap.models.builtin import DEFAULT_MODEL_NAME
    from actcap.models.loading import LoadedModel, load_model

    with ActivationFile(path) as f:
        sites = [s for s in f.sites if is_residual_site(s)]
        if not sites:
            raise SiteShapeError(
                f"{path}: no embeddings or layer_<i> site to read through the lens; capture "
                "with --layers all (the default)."
            )
        for site in sites:
            _check_position(f, site, token)
        if model is None:
            model = "default" if f.meta.model in ("", DEFAULT_MODEL_NAME) else f.meta.model
        lm = model if isinstance(model, LoadedModel) else load_model(model)
        if lm.layout.final_norm_path is None:
            raise AnalysisError(
                "This model has no final norm module, so the logit lens is not defined for it."
            )
        norm = dict(lm.model.named_modules())[lm.layout.final_norm_path]
        head: Any = lm.model.get_output_embeddings()  # type: ignore[operator]
        rows = []
        for site in sites:
            t = f.get(site)
            vec = t[token] if t.dim() == 2 else t
            if vec.shape[-1] != head.weight.shape[1]:
                raise IncompatibleInputsError(
                    f"{path}: site {site} has hidden size {vec.shape[-1]}, the model {head.weight.shape[1]}; pass the model the file was made with."
                )
            h = vec.to(head.weight.device, head.weight.dtype)[None, None]
            probs = torch.softmax(head(norm(h))[0, 0].float(), dim=-1)
            top = probs.topk(min(k, probs.numel()))
            rows.append(
                LensRow(
                    site,
                    [lm.tokenizer.decode([i]) for i in top.indices.tolist()],
                    top.values.tolist(),
                )
            )
    return rows


def _check_position(f: ActivationFile, site: str, token: int) -> None:
    """Refuse a site without values, or a token position past the end of a ``[tokens, hidden]`` site.

    Raises:
        FormatError: When the site holds no values.
        SiteShapeError: When the file holds one vector per site and ``token`` is not -1.
        TokenPositionError: When ``token`` is out of range.
    """
    shape = check_has_values(f, site)
    n = shape[0]
    if len(shape) == 1 and token != -1:
        raise SiteShapeError(
            f"{f.label}: the file holds one vector per site (token selection "
            f"{f.meta.token_selection!r}), not one per token, so --token (token=) does not apply; "
            "capture with --token-selection all to read other positions."
        )
    if len(shape) == 2 and not -n <= token < n:
        raise TokenPositionError(
            f"{f.label}: token position {token} is past the end; the file holds {n} tokens, "
            f"so --token (token=) takes 0 to {n - 1}, or -{n} to -1."
        )


def lens_position(path: SampleSource, token: int = -1) -> str:
    """Which vector :func:`logit_lens` reads, in words: a token position, or the stored reduction.

    Raises:
        FormatError: When the file is unreadable.
    """
    with ActivationFile(path) as f:
        site = next((s for s in f.sites if is_residual_site(s) or parse_layer_site(s)), None)
        shape = f.shape(site) if site is not None else ()
        if len(shape) != 2:
            return f"the {f.meta.token_selection} vector of each site (the file holds one per site)"
        n = shape[0]
        return f"token position {token % n if n else token} of {n} (0-based)"
