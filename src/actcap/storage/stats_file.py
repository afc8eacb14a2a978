"""``stats.safetensors``: a run's statistics over every token (``actcap eval --stats``).

One safetensors file in the run directory. Each site's statistics are tensors named
``<site>/<statistic>`` (a ``/`` appears in no site name): ``count`` (int64, shape ``(1,)``),
``mean``, ``m2``, ``max_abs`` (float64 ``(hidden,)``; variance = ``m2 / count``), ``norm_hist``
(int64, the bins of :data:`actcap.capture.stats.NORM_EDGES`), ``norm_sum`` (float64 ``(1,)``),
and the largest activations ``top_value``, ``top_sample``, ``top_position``, ``top_dim``. The
metadata holds ``format`` (``actcap-stats``), ``version``, ``sites`` (JSON list), ``samples``
(JSON list of sample ids: ``top_sample`` indexes it) and ``n_samples`` (samples counted).

It is written once, at the end of a session, atomically (a crash leaves the earlier file or none).
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

SiteTensors = dict[str, dict[str, Tensor]]


class StatsContents(NamedTuple):
    """A statistics file read back."""

    sites: SiteTensors
    """Per site its named tensors."""
    samples: list[str]
    """Ids of the samples ``top_sample`` refers to."""
    n_samples: int
    """How many samples the statistics count."""


def encode_stats(
    sites: Mapping[str, Mapping[str, Tensor]], samples: Sequence[str], n_samples: int
) -> bytes:
    """The bytes of a statistics file.

    Per site its named tensors, the sample ids ``top_sample`` refers to, and how many samples
    were counted.
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
    return save(tensors, metadata=metadata)


def decode_stats(data: bytes, where: str) -> StatsContents:
    """Per site its tensors, and the sample ids, from a statistics file's bytes.

    Raises:
        FormatError: ``where`` is no actcap statistics file.
    """
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        sites = json.loads(metadata["sites"])
        samples = json.loads(metadata["samples"])
        n_samples = int(metadata["n_samples"])
    except Exception as err:  # noqa: BLE001 - any damage reads the same to a user
        raise FormatError(
            f"{where}: not a readable statistics file ({err}); delete it and run "
            "`actcap eval --stats ... --resume` again to recompute it."
        ) from None
    if metadata.get("format") != STATS_FORMAT:
        raise FormatError(
            f"{where}: not an actcap statistics file (format {metadata.get('format')!r})."
        )
    out: SiteTensors = {site: {} for site in sites}
    for key, t in tensors.items():
        site, _, name = key.rpartition("/")
        out.setdefault(site, {})[name] = t
    return StatsContents(out, [str(s) for s in samples], n_samples)


def read_stats(root: PathOrUrl) -> StatsContents | None:
    """A run's statistics file, or None when it has none."""
    if is_url(root):
        location = join(str(root), STATS_FILE)
        if not exists(location):
            return None
        return decode_stats(read_bytes(location), location)
    path = Path(root) / STATS_FILE
    if not path.is_file():
        return None
    return decode_stats(path.read_bytes(), str(path))
