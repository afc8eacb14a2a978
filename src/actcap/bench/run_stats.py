"""Statistics over every token for a benchmark run (``actcap eval --stats``).

The statistics sites are captured sites; their accumulators live on the model's device for the
session and are written to ``stats.safetensors`` (:mod:`actcap.storage.stats_file`) when it
ends. A resumed run starts from the file its earlier sessions wrote, so the statistics count
every finished sample once; samples finished in a session that ended before writing the file
(a crash, Ctrl-C) are not in them, which the file's ``n_samples`` and a warning show.

Statistics cannot be subtracted (max |x|, the largest activations), so when the earlier file
cannot be continued, its statistics are discarded and restart with this session, with one
warning at the end that says why and how many of the run's samples they cover. That happens
when a sample it counted is answered again (its file was damaged or missing, or a shared prefix
it used: the resume drops it and answers it again), when the file is damaged, or when it does
not fit the run (other sites, other widths). A resume never fails on the statistics file.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from typing import Any

from actcap.capture.sites import Site, resolve_sites
from actcap.capture.spec import CaptureSpec
from actcap.capture.stats import StatsCollector
from actcap.errors import FormatError
from actcap.models.loading import LoadedModel
from actcap.storage.location import PathOrUrl
from actcap.storage.stats_file import (
    STATS_FILE,
    UNREADABLE_ADVICE,
    StatsContents,
    encode_stats,
    read_stats,
)


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
    done: Collection[str] = (),
) -> StatsCollector | None:
    """A collector for the run's statistics sites, seeded from ``root``'s file when it has one.

    ``done`` holds the ids of the run's finished samples as the session starts: a sample the
    file counted that is not among them is answered again, and the file's statistics are
    discarded (see the module docstring).
    """
    names = stats_sites(lm, capture, sites)
    if not names:
        return None
    collector = StatsCollector(names)
    if root is None:
        return collector
    try:
        earlier = read_stats(root)
    except FormatError as err:
        collector.restarted = str(err).replace(UNREADABLE_ADVICE, "").strip().rstrip(".")
        return collector
    if earlier is not None:
        collector.resume_from(earlier)
        reason = _cannot_continue(earlier, names, done)
        if reason is not None:
            collector.discard_resumed(reason)
    return collector


def _cannot_continue(
    earlier: StatsContents, names: Sequence[str], done: Collection[str]
) -> str | None:
    """Why the earlier statistics cannot be continued by this session, or None."""
    if earlier.n_samples and sorted(earlier.sites) != sorted(names):
        return (
            f"{STATS_FILE} holds the sites {', '.join(sorted(earlier.sites))}, not this run's "
            f"{', '.join(sorted(names))}"
        )
    counted = earlier.counted if earlier.counted is not None else earlier.samples
    again = [s for s in counted if s not in done]
    if again or earlier.n_samples > len(done):
        n = max(len(again), earlier.n_samples - len(done))
        return (
            f"{n} sample{'s' if n != 1 else ''} counted in {STATS_FILE} "
            f"{'are' if n != 1 else 'is'} answered again (damaged or missing)"
        )
    return None


def write_stats(writer: Any, collector: StatsCollector | None, n_finished: int) -> dict[str, Any]:
    """Write the statistics file; what ``results.json`` records of it (empty without stats)."""
    if collector is None:
        return {}
    contents = collector.to_file()
    writer.write_stats(encode_stats(*contents))
    n = contents.n_samples
    if collector.restarted is not None:
        warnings.warn(
            f"{collector.restarted}; the earlier statistics (--stats) cannot be corrected, so they "
            f"restart with this session and cover {n} of the run's {n_finished} samples."
            + (_ADVICE if n != n_finished else ""),
            stacklevel=2,
        )
    elif n != n_finished:
        warnings.warn(
            f"The statistics (--stats) count {n} of the run's {n_finished} samples: a session "
            f"ended before writing them.{_ADVICE}",
            stacklevel=2,
        )
    return {"stats": {"sites": sorted(contents.sites), "n_samples": n}}


_ADVICE = " Run again without --resume, into a new --out, for statistics over every sample."
