"""``--dtype float8``: activations stored as float8 e4m3 values with a float32 scale per row.

A site tensor ``t`` of shape ``(..., hidden)`` (a token vector per row) is stored as two tensors:

- ``<site>`` (``F8_E4M3``, torch's ``float8_e4m3fn``): ``t / scale`` rounded to e4m3;
- ``<site>@scale`` (``F32``, shape ``(..., 1)``): ``scale = max|row| / 448``, 448 being e4m3's
  largest value (1 for a row of zeros). ``@`` appears in no site name (they are dotted module
  paths), so the names cannot collide.

Readers give back ``stored.float() * scale`` (:func:`dequantize`), in float32 unless asked for
another dtype. Error: e4m3 has 3 mantissa bits, so a value whose scaled magnitude is a normal
e4m3 number (at least ``max|row| / 448 * 2**-6``) comes back within ``2**-4`` of itself,
relative; smaller values of the row within ``2**-10 * scale`` absolute. The measured error on the
built-in model is in ``docs/performance.md``. A stored file is half the size of bfloat16's.

Non-finite values: e4m3fn has no infinity. The scale is taken over the row's finite values, and
inf or nan is stored as nan (so it stays visibly non-finite when read back).

Damage: a scale whose shape is not the values' with a last dimension of 1, or that is not finite
and positive, and a float8 site without its scale (an ``F8_E4M3`` tensor, or any float tensor of
a file whose ``dtype`` is ``float8``) are :class:`~actcap.errors.FormatError`, never values read
unscaled.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from actcap.errors import FormatError

FLOAT8 = "float8"
"""The storage dtype name (``--dtype float8``, ``dtype`` in a file's metadata)."""
FLOAT8_DTYPE = torch.float8_e4m3fn
FLOAT8_MAX = 448.0
"""The largest e4m3fn value."""
SCALE_SUFFIX = "@scale"
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""Safetensors dtypes of floating-point tensors."""


def scale_name(site: str) -> str:
    """The name of a site's scale tensor."""
    return site + SCALE_SUFFIX


def is_scale_name(name: str) -> bool:
    """Whether a tensor name is a float8 scale (not a site)."""
    return name.endswith(SCALE_SUFFIX)


def quantize(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t`` as float8 e4m3 values and a float32 scale per row (last dimension)."""
    x = t.detach().float()
    finite = torch.isfinite(x)
    amax = torch.where(finite, x.abs(), 0).amax(dim=-1, keepdim=True) if x.numel() else x[..., :1]
    scale = torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax))
    scaled = torch.where(finite, x / scale, torch.nan)
    return scaled.to(FLOAT8_DTYPE), scale.contiguous()


def needs_scale(stored_dtype: str, file_dtype: str) -> bool:
    """Whether a tensor stored as ``stored_dtype`` in a file of ``file_dtype`` must have a scale.

    True for an ``F8_E4M3`` tensor, and for any float tensor of a ``float8`` file: read without
    its scale, it would give values up to 448 times off.
    """
    return stored_dtype == "F8_E4M3" or (file_dtype == FLOAT8 and stored_dtype in _FLOAT_DTYPES)


def check_scale(values: Tensor, scale: Tensor, where: str = "float8 tensor") -> None:
    """Check that ``scale`` is one finite, positive number per row of ``values``.

    Raises:
        FormatError: Naming ``where`` (the file and site) when it is not.
    """
    want = (*values.shape[:-1], 1)
    if values.dim() < 1 or tuple(scale.shape) != want:
        raise FormatError(
            f"{where}: its float8 scale has shape {list(scale.shape)}, not {list(want)} (one per "
            "row); the file is damaged: capture this sample again."
        )
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        raise FormatError(
            f"{where}: its float8 scale must be finite and positive, but {int(bad.sum())} of "
            f"{scale.numel()} are not; the file is damaged: capture this sample again."
        )


def dequantize(
    values: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32, *, where: str = ""
) -> Tensor:
    """The tensor ``quantize`` was given, to float8 precision, in ``dtype``.

    Raises:
        FormatError: When ``scale`` is not one finite, positive number per row (``where``, the
            file and site, names it in the message).
    """
    scale = scale.float()
    check_scale(values, scale, where or "float8 tensor")
    return (values.float() * scale).to(dtype)


def quantize_sites(tensors: Mapping[str, Tensor], sites: set[str]) -> dict[str, Tensor]:
    """``tensors`` with each of ``sites`` replaced by its float8 values and scale."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name in sites and t.is_floating_point():
            out[name], out[scale_name(name)] = quantize(t)
        else:
            out[name] = t
    return out
