"""Capture: named activation sites, hooks that record them, and batched runs that use them."""

from actcap.capture.collect import (
    CapturedSample,
    GenerationOptions,
    accepts_argument,
    encode,
    forward_kwargs,
    make_recorder,
    position_ids_for,
    run_prompts,
    select_tokens,
    split_nonfinite,
    split_samples,
)
from actcap.capture.hooks import Recorder, recording
from actcap.capture.sites import SITE_KINDS, Site, SiteKind, layer_indices, resolve_sites
from actcap.capture.spec import TOKEN_SELECTIONS, CaptureSpec, TokenSelection

__all__ = [
    "SITE_KINDS",
    "TOKEN_SELECTIONS",
    "CaptureSpec",
    "CapturedSample",
    "GenerationOptions",
    "Recorder",
    "Site",
    "SiteKind",
    "TokenSelection",
    "accepts_argument",
    "encode",
    "forward_kwargs",
    "layer_indices",
    "make_recorder",
    "position_ids_for",
    "recording",
    "resolve_sites",
    "run_prompts",
    "select_tokens",
    "split_nonfinite",
    "split_samples",
]
