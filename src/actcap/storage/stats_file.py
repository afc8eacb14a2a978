"""``stats.safetensors``: a run's statistics over every token (``actcap eval --stats``).

One safetensors file in the run directory. Each site's statistics are tensors named
``<site>/<statistic>`` (a ``/`` appears in no site name): ``count`` (int64, shape ``(1,)``),
``mean``, ``m2``, ``max_abs`` (float64 ``(hidden,)``; variance = ``m2 / count``), ``norm_hist``
(int64, the :data:`N_NORM_BINS` bins of :data:`NORM_EDGES`), ``norm_sum`` (float64 ``(1,)``),
and the largest activations ``top_value``, ``top_sample``, ``top_position``, ``top_dim`` (at most
:data:`DEFAULT_TOP_K` each). The metadata holds ``format`` (``actcap-stats``), ``version``,
``sites`` (JSON list), ``samples`` (JSON list of sample ids: ``top_sample`` indexes it),
``n_samples`` (samples counted) and ``counted`` (JSON list of the ids of every sample counted,
so a resume knows which samples the file already holds).

It is written once, at the end of a session, atomically (a crash leaves the earlier file or none).
:func:`decode_stats` checks every tensor's presence, dtype and shape and the metadata's types, so
a damaged file is a one-line :class:`~actcap.errors.FormatError`, never a traceback later.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from torch import Tensor

from actcap.errors import FormatError
from actcap.storage.location import PathOrUrl, exists, is_url, join, read_bytes

STATS_FILE = "stats.safetensors"
STATS_FORMAT = "actcap-stats"
STATS_VERSION = "1"

DEFAULT_TOP_K = 16
"""How many of the largest activations each site keeps."""

NORM_BINS_PER_DECADE = 8
NORM_LOW_EXP = -3
NORM_HIGH_EXP = 5
NORM_EDGES: tuple[float, ...] = tuple(
    10 ** (NORM_LOW_EXP + i / NORM_BINS_PER_DECADE)
    for i in range((NORM_HIGH_EXP - NORM_LOW_EXP) * NORM_BINS_PER_DECADE + 1)
)
"""Fixed log-spaced edges of the norm histogram: 1e-3 to 1e5, 8 bins per decade (65 edges).

Bin 0 counts norms below 1e-3 (zeros included), bin ``i`` (1..64) norms in
``[NORM_EDGES[i-1], NORM_EDGES[i])``, and the last bin (65) norms of 1e5 and above, inf and nan.
"""
N_NORM_BINS = len(NORM_EDGES) + 1

TENSOR_NAMES = (
    "count",
    "mean",
    "m2",
    "max_abs",
    "norm_hist",
    "norm_sum",
    "top_value",
    "top_sample",
    "top_position",
    "top_dim",
)
"""The tensors of each site, each stored as ``<site>/<name>``."""

SiteTensors = dict[str, dict[str, Tensor]]

UNREADABLE_ADVICE = (
    "The statistics can only be recomputed by answering the samples again: run `actcap eval "
    "--stats ...` into a new --out."
)
"""What to do about a damaged statistics file (a resume of a finished run answers nothing)."""


class StatsContents(NamedTuple):
    """A statistics file read back."""

    sites: SiteTensors
    """Per site its named tensors."""
    samples: list[str]
    """Ids of the samples ``top_sample`` refers to."""
    n_samples: int
    """How many samples the statistics count."""
    counted: list[str] | None = None
    """Ids of every sample counted (None in a file written before they were recorded)."""


def encode_stats(
    sites: Mapping[str, Mapping[str, Tensor]],
    samples: Sequence[str],
    n_samples: int,
    counted: Sequence[str] | None = None,
) -> bytes:
    """The bytes of a statistics file.

    Per site its named tensors, the sample ids ``top_sample`` refers to, how many samples were
    counted and, when known, their ids.
    """
    from safetensors.torch import save

    tensors = {
        f"{site}/{name}": t.detach().cpu().contiguous()
        for site, named in sites.items()
        for name, t in named.items()
    }
    metadata = {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "sites": json.dumps(list(sites)),
        "samples": json.dumps(list(samples), ensure_ascii=False),
        "n_samples": str(n_samples),
    }
    if counted is not None:
        metadata["counted"] = json.dumps(list(counted), ensure_ascii=False)
    return save(tensors, metadata=metadata)


def decode_stats(data: bytes, where: str) -> StatsContents:
    """Per site its tensors, and the sample ids, from a statistics file's bytes.

    Raises:
        FormatError: ``where`` is no actcap statistics file, or a damaged one (a tensor missing
            or of the wrong dtype or shape, an index out of range, metadata of the wrong type).
    """
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as err:  # noqa: BLE001 - any damage reads the same to a user
        raise FormatError(
            f"{where}: not a readable statistics file ({err}). {UNREADABLE_ADVICE}"
        ) from None
    if metadata.get("format") != STATS_FORMAT:
        raise FormatError(
            f"{where}: not an actcap statistics file (format {metadata.get('format')!r})."
        )
    try:
        contents = _contents(tensors, metadata)
    except ValueError as err:
        raise FormatError(
            f"{where}: a damaged statistics file: {err}. {UNREADABLE_ADVICE}"
        ) from None
    return contents


def _json_list(metadata: Mapping[str, str], key: str, required: bool = True) -> list[str] | None:
    """Metadata ``key`` as a JSON list of strings (None when absent and not required)."""
    if key not in metadata and not required:
        return None
    try:
        value = json.loads(metadata[key])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"metadata {key!r} is missing or not JSON") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"metadata {key!r} is not a JSON list of strings")
    return value


def _contents(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> StatsContents:
    """The file's contents, checked (raises ValueError naming what is wrong)."""
    sites = _json_list(metadata, "sites")
    samples = _json_list(metadata, "samples")
    counted = _json_list(metadata, "counted", required=False)
    assert sites is not None and samples is not None
    try:
        n_samples = int(metadata["n_samples"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("metadata 'n_samples' is missing or not an integer") from None
    if n_samples < 0 or (counted is not None and len(counted) != n_samples):
        raise ValueError(f"metadata 'n_samples' ({n_samples}) does not match the samples counted")
    out: SiteTensors = {site: {} for site in sites}
    for key, t in tensors.items():
        site, _, name = key.rpartition("/")
        if site not in out:
            raise ValueError(f"tensor {key!r} belongs to no site listed in the metadata")
        out[site][name] = t
    for site, named in out.items():
        _check_site(site, named, len(samples))
    return StatsContents(out, samples, n_samples, counted)


def _check_site(site: str, t: Mapping[str, Tensor], n_samples: int) -> None:
    """Raise ValueError when one site's tensors are not a site's statistics."""
    missing = [n for n in TENSOR_NAMES if n not in t]
    if missing:
        raise ValueError(f"site {site}: tensor(s) missing: {', '.join(missing)}")

    def wrong(name: str, what: str) -> ValueError:
        return ValueError(
            f"site {site}: {name} {what} (dtype {t[name].dtype}, shape {list(t[name].shape)})"
        )

    for name in TENSOR_NAMES:
        floating = name in ("mean", "m2", "max_abs", "norm_sum", "top_value")
        if t[name].is_floating_point() != floating or t[name].is_complex():
            raise wrong(name, "is not " + ("floating point" if floating else "integer"))
    for name in ("count", "norm_sum"):
        if t[name].numel() != 1:
            raise wrong(name, "is not one value")
    width = t["mean"].shape
    if len(width) != 1 or width[0] == 0:
        raise wrong("mean", "is not one non-empty vector")
    for name in ("m2", "max_abs"):
        if t[name].shape != width:
            raise wrong(name, f"is not of mean's width {width[0]}")
    if t["norm_hist"].shape != (N_NORM_BINS,):
        raise wrong("norm_hist", f"has not {N_NORM_BINS} bins")
    top = t["top_value"].shape
    for name in ("top_value", "top_sample", "top_position", "top_dim"):
        if t[name].dim() != 1 or t[name].shape != top or top[0] > DEFAULT_TOP_K:
            raise wrong(name, f"is not a list of top_value's length of at most {DEFAULT_TOP_K}")
    if int(t["count"].reshape(())) < 0 or bool((t["norm_hist"] < 0).any()):
        raise wrong("count", "or norm_hist is negative")
    _check_range(site, "top_sample", t["top_sample"], n_samples, "the samples listed")
    _check_range(site, "top_dim", t["top_dim"], width[0], "the width")
    _check_range(site, "top_position", t["top_position"], None, "")


def _check_range(site: str, name: str, t: Tensor, end: int | None, what: str) -> None:
    """Raise ValueError unless every index of ``t`` is in ``[0, end)``."""
    if t.numel() and (int(t.min()) < 0 or (end is not None and int(t.max()) >= end)):
        bound = f" or beyond {what} ({end})" if end is not None else ""
        raise ValueError(f"site {site}: {name} has an index below 0{bound}")


def read_stats(root: PathOrUrl) -> StatsContents | None:
    """A run's statistics file, or None when it has none.

    Raises:
        FormatError: The file is damaged (see :func:`decode_stats`).
    """
    if is_url(root):
        location = join(str(root), STATS_FILE)
        if not exists(location):
            return None
        return decode_stats(read_bytes(location), location)
    path = Path(root) / STATS_FILE
    if not path.is_file():
        return None
    return decode_stats(path.read_bytes(), str(path))
