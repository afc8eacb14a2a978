"""A run's statistics over every token (``actcap eval --stats``), summarised for people.

``analyze --directory`` prints :func:`statistics_lines`; the HTML report shows
:func:`statistics_html`. Both read ``stats.safetensors`` (:mod:`actcap.storage.stats_file`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from actcap.capture.stats import SiteStats
from actcap.storage.location import PathOrUrl
from actcap.storage.names import site_sort_key
from actcap.storage.stats_file import read_stats

TOP_DIMS = 5
"""Dimensions listed by largest |activation|."""
LARGEST = 5
"""Largest activations listed per site."""


@dataclass(frozen=True)
class Largest:
    """One of a site's largest activations and where it is."""

    value: float
    sample: str
    """The sample's id (question id)."""
    position: int
    """Token position in the sample (prompt tokens, then generated ones)."""
    dim: int


@dataclass(frozen=True)
class SiteSummary:
    """One site's statistics over every token, in brief."""

    site: str
    tokens: int
    """Tokens counted."""
    mean_norm: float
    """Mean L2 norm of the token vectors."""
    mean_std: float
    """Standard deviation per dimension, averaged over dimensions."""
    top_dims: list[tuple[int, float]]
    """``(dimension, max |activation|)``, largest first."""
    largest: list[Largest]


def run_statistics(root: PathOrUrl) -> tuple[int, list[SiteSummary]] | None:
    """Samples counted and per-site summaries of a run's statistics; None when it has none."""
    contents = read_stats(root)
    if contents is None:
        return None
    out = []
    for site in sorted(contents.sites, key=site_sort_key):
        s = SiteStats.from_tensors(contents.sites[site])
        count = int(s.count)
        dims = s.max_abs.argsort(descending=True)[:TOP_DIMS].tolist()
        largest = [
            Largest(
                float(s.top_value[i]),
                contents.samples[int(s.top_sample[i])],
                int(s.top_position[i]),
                int(s.top_dim[i]),
            )
            for i in range(min(LARGEST, len(s.top_value)))
        ]
        out.append(
            SiteSummary(
                site,
                count,
                float(s.norm_sum) / max(count, 1),
                float(s.variance.sqrt().mean()),
                [(d, float(s.max_abs[d])) for d in dims],
                largest,
            )
        )
    return contents.n_samples, out


def statistics_lines(n_samples: int, sites: list[SiteSummary]) -> list[str]:
    """The text ``analyze --directory`` prints."""
    lines = [f"statistics over every token (--stats), {n_samples:,} samples:"]
    for s in sites:
        dims = ", ".join(f"{d}:{v:.3g}" for d, v in s.top_dims)
        lines.append(
            f"  {s.site}: {s.tokens:,} tokens, mean norm {s.mean_norm:.4g}, "
            f"mean std {s.mean_std:.4g}; top dims by max |x|: {dims}"
        )
        for a in s.largest:
            lines.append(
                f"    {a.value:+.4g} at dim {a.dim}, token {a.position} of sample {a.sample}"
            )
    return lines


def statistics_html(n_samples: int, sites: list[SiteSummary]) -> list[str]:
    """The report's section (every value from the run escaped)."""
    e = html.escape
    rows = []
    for s in sites:
        dims = ", ".join(f"{d} ({v:.3g})" for d, v in s.top_dims)
        largest = "<br>".join(
            f"{a.value:+.4g} at dim {a.dim}, token {a.position} of {e(a.sample)}" for a in s.largest
        )
        rows.append(
            f"<tr><td>{e(s.site)}</td><td>{s.tokens:,}</td><td>{s.mean_norm:.4g}</td>"
            f"<td>{s.mean_std:.4g}</td><td>{e(dims)}</td><td>{largest}</td></tr>"
        )
    return [
        f"<h2>Statistics over every token</h2><p>{n_samples:,} samples (--stats).</p>",
        "<table id='stats'><tr><th>site</th><th>tokens</th><th>mean norm</th><th>mean std</th>"
        "<th>top dims by max |x|</th><th>largest activations</th></tr>",
        *rows,
        "</table>",
    ]
