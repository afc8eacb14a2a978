"""Statistics over every token for a benchmark run (``actcap eval --stats``).

The statistics sites are captured sites; their accumulators live on the model's device for the
session and are written to ``stats.safetensors`` (:mod:`actcap.storage.stats_file`) when it
ends. A resumed run starts from the file its earlier sessions wrote, so the statistics count
every finished sample once; samples finished in a session that ended before writing the file
(a crash, Ctrl-C) are not in them, which the file's ``n_samples`` and a warning show.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from actcap.capture.sites import Site, resolve_sites
from actcap.capture.spec import CaptureSpec
from actcap.capture.stats import StatsCollector
from actcap.models.loading import LoadedModel
from actcap.storage.location import PathOrUrl
from actcap.storage.stats_file import encode_stats, read_stats


def stats_sites(lm: LoadedModel, capture: CaptureSpec | None, sites: Sequence[Site]) -> list[str]:
    """The names of the sites ``capture.stats`` asks for (none without capture or stats)."""
    if capture is None or not capture.stats:
        return []
    return capture.stats_sites(
        sites, lambda request: resolve_sites(lm.model, lm.layout, request, capture.kinds)
    )


def open_stats(
    lm: LoadedModel,
    capture: CaptureSpec | None,
    sites: Sequence[Site],
    root: PathOrUrl | None,
) -> StatsCollector | None:
    """A collector for the run's statistics sites, seeded from ``root``'s file when it has one."""
    names = stats_sites(lm, capture, sites)
    if not names:
        return None
    collector = StatsCollector(names)
    earlier = read_stats(root) if root is not None else None
    if earlier is not None:
        collector.absorb(earlier)
    return collector


def write_stats(writer: Any, collector: StatsCollector | None, n_finished: int) -> dict[str, Any]:
    """Write the statistics file; what ``results.json`` records of it (empty without stats)."""
    if collector is None:
        return {}
    contents = collector.to_file()
    writer.write_stats(encode_stats(*contents))
    if contents.n_samples != n_finished:
        warnings.warn(
            f"The statistics (--stats) count {contents.n_samples} of the run's {n_finished} "
            "samples: a session ended before writing them. Run again without --resume, into a "
            "new --out, for statistics over every sample.",
            stacklevel=2,
        )
    return {"stats": {"sites": sorted(contents.sites), "n_samples": contents.n_samples}}
