"""Pictures of stored activations (matplotlib, headless). Needs the ``plot`` extra.

Every function writes one PNG and returns a :class:`Figure` with the path and the numbers plotted,
so a caller (or a test) can check that the picture shows the data.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch

from actcap.analysis.compare import MeanDifference, SimilarityMatrix
from actcap.analysis.probes import ProbeResult
from actcap.analysis.stats import as_tokens
from actcap.analysis.vectors import spread
from actcap.errors import SiteShapeError, require
from actcap.storage.durable import atomic_write_bytes
from actcap.storage.format import SampleSource, ShardSlice
from actcap.storage.names import residual_sites, site_sort_key
from actcap.storage.reader import ActivationFile

DPI = 100
SIZE = (8.0, 5.0)
"""Figure size in inches: 800 x 500 pixels at ``DPI``."""


@dataclass(frozen=True)
class Figure:
    """A written picture and the numbers it shows."""

    path: Path
    """The PNG."""
    title: str
    """Its title."""
    data: dict[str, Any] = field(default_factory=dict)
    """What was plotted (arrays and labels)."""


def _pyplot() -> Any:
    require("matplotlib", "plot", "Plotting")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


P = ParamSpec("P")
R = TypeVar("R")


def _plain_text(fn: Callable[P, R]) -> Callable[P, R]:
    """Draw titles and labels as plain text, never as mathtext.

    They hold site names and ids from files: a ``$`` in one must not be parsed (an error).
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _pyplot()
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)

    return wrapper


def _plain_log_ticks(minor: bool = False) -> Any:
    """Log-axis tick labels as plain numbers (``1000``, ``0.01``).

    Matplotlib's default log labels are mathtext (``$10^{3}$``), which :func:`_plain_text` turns
    off, so they would show as raw code. Minor ticks stay unlabelled.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    return NullFormatter() if minor else FuncFormatter(lambda v, _pos: f"{v:g}")


def _stem(file: SampleSource) -> str:
    """A short name for a sample in a title: the file's stem, or the shard's stem and offset."""
    if isinstance(file, ShardSlice):
        return f"{Path(file.shard).stem}@{file.offset}"
    return Path(file).stem


def _save(fig: Any, path: str | os.PathLike[str], title: str, data: dict[str, Any]) -> Figure:
    """Render ``fig`` to PNG and write it atomically at ``path``.

    The picture goes to a new temporary file beside ``path`` and is renamed over it, so a
    symlink at ``path`` is replaced by the picture, never followed (its target is untouched).
    """
    plt = _pyplot()
    out = Path(path)
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
    return Figure(out, title, data)


@_plain_text
def histogram(
    file: SampleSource,
    out: str | os.PathLike[str],
    sites: Sequence[str] | None = None,
    bins: int = 60,
) -> Figure:
    """Histograms of activation values for a few sites of one sample, one panel per site.

    Each panel spans the 0.1-99.9 percentile range of its site (a handful of massive outliers
    would otherwise squeeze the rest into one bar); the title counts the values outside it.
    """
    plt = _pyplot()
    with ActivationFile(file) as f:
        chosen = list(sites) if sites else _spread(residual_sites(f.sites) or f.sites, 4)
        values = {s: as_tokens(f.get(s)).flatten().numpy() for s in chosen}
    cols = 2 if len(values) > 1 else 1
    rows = (len(values) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=SIZE, squeeze=False)
    counts, outside, edges_by_site = {}, {}, {}
    for ax, (s, v) in zip(axes.flat, values.items(), strict=False):
        lo, hi = np.percentile(v, [0.1, 99.9])
        if hi <= lo:
            lo, hi = float(v.min()) - 0.5, float(v.max()) + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        counts[s], _ = np.histogram(v, bins=edges)
        outside[s] = int(v.size - counts[s].sum())
        edges_by_site[s] = edges
        ax.hist(v, bins=edges, color="tab:blue")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_plain_log_ticks())
        ax.yaxis.set_minor_formatter(_plain_log_ticks(minor=True))
        ax.set_title(f"{s} ({outside[s]} values outside)", fontsize=9)
        ax.set_xlabel("activation value")
        ax.set_ylabel("count (log)")
    for ax in list(axes.flat)[len(values) :]:
        ax.axis("off")
    return _save(
        fig,
        out,
        f"Activation values of {_stem(file)}",
        {"edges": edges_by_site, "counts": counts, "outside": outside},
    )


def _spread(items: Sequence[str], n: int) -> list[str]:
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


@_plain_text
def token_layer_norms(
    file: SampleSource, out: str | os.PathLike[str], tokenizer: Any = None
) -> Figure:
    """Heatmap of the L2 norm of each token's residual vector at each layer of one sample."""
    plt = _pyplot()
    with ActivationFile(file) as f:
        sites = [s for s in residual_sites(f.sites) if len(f.shape(s)) == 2]
        if not sites:
            raise SiteShapeError(
                f"{file}: no [tokens, hidden] residual sites (token selection 'all' is needed)."
            )
        norms = np.stack(
            [as_tokens(f.get(s)).norm(dim=-1).numpy() for s in sites]
        )  # (sites, tokens)
        ids = f.get("input_ids").tolist() if "input_ids" in f.names else []
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=SIZE)
    # Log colours: a few "massive activation" tokens (often the first) are 100x the rest.
    positive = norms[norms > 0]
    scale = (
        LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size else None
    )
    im = ax.imshow(norms, aspect="auto", cmap="viridis", interpolation="nearest", norm=scale)
    bar = fig.colorbar(im, ax=ax, label="L2 norm (log scale)")
    bar.ax.yaxis.set_major_formatter(_plain_log_ticks())
    bar.ax.yaxis.set_minor_formatter(_plain_log_ticks(minor=True))
    ax.set_xlabel("token position")
    ax.set_ylabel("site")
    ax.set_yticks(range(len(sites)), _spread_labels(sites))
    if tokenizer is not None and ids and len(ids) == norms.shape[1] and len(ids) <= 40:
        ax.set_xticks(
            range(len(ids)), [tokenizer.decode([i]) for i in ids], rotation=90, fontsize=7
        )
    return _save(
        fig,
        out,
        f"Residual norm by token and layer: {_stem(file)}",
        {"norms": norms, "sites": sites},
    )


def _spread_labels(sites: Sequence[str]) -> list[str]:
    step = max(1, len(sites) // 16)
    return [s if i % step == 0 else "" for i, s in enumerate(sites)]


@_plain_text
def similarity_heatmap(sim: SimilarityMatrix, out: str | os.PathLike[str]) -> Figure:
    """Heatmap of the cross-sample cosine similarity of one site, samples grouped by grade."""
    plt = _pyplot()
    order = sorted(range(len(sim.ids)), key=lambda i: (sim.correct[i] is not True, sim.ids[i]))
    m = sim.matrix[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(7.0, 6.0))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    n_correct = sum(1 for c in sim.correct if c is True)
    if 0 < n_correct < len(order):
        ax.axhline(n_correct - 0.5, color="k", linewidth=1)
        ax.axvline(n_correct - 0.5, color="k", linewidth=1)
    ax.set_xlabel("sample (correct first)")
    ax.set_ylabel("sample (correct first)")
    return _save(
        fig,
        out,
        f"Cosine similarity between samples at {sim.site}{of_samples(len(sim.ids), sim.total)}",
        {"matrix": m, "ids": [sim.ids[i] for i in order], "total": max(sim.total, len(sim.ids))},
    )


@_plain_text
def line_by_layer(
    sites: Sequence[str],
    values: Sequence[float],
    out: str | os.PathLike[str],
    title: str,
    ylabel: str,
    baseline: float | None = None,
    errors: Sequence[float] | None = None,
) -> Figure:
    """A value per site drawn as a line over depth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    x = np.arange(len(sites))
    ax.errorbar(
        x, values, yerr=errors, marker="o", capsize=3 if errors is not None else 0, label=ylabel
    )
    if baseline is not None:
        ax.axhline(
            baseline, color="grey", linestyle="--", label=f"majority baseline ({baseline:.2f})"
        )
    ax.set_xticks(x, _spread_labels(sites), rotation=45, ha="right")
    ax.set_xlabel("site (depth)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(
        fig, out, title, {"sites": list(sites), "values": list(values), "baseline": baseline}
    )


def norm_by_layer(mean_norms: dict[str, float], out: str | os.PathLike[str]) -> Figure:
    """Mean L2 norm of the residual stream by layer."""
    sites = residual_sites(list(mean_norms)) or sorted(mean_norms, key=site_sort_key)
    return line_by_layer(
        sites,
        [mean_norms[s] for s in sites],
        out,
        "Mean residual norm by layer",
        "mean L2 norm per token",
    )


def probe_curve(
    results: Sequence[ProbeResult], out: str | os.PathLike[str], target: str = "correct"
) -> Figure:
    """Probe accuracy by layer with its spread over folds and the majority baseline."""
    ordered = sorted(results, key=lambda r: site_sort_key(r.site))
    return line_by_layer(
        [r.site for r in ordered],
        [r.accuracy for r in ordered],
        out,
        f"Linear probe accuracy for {target!r} by layer",
        "cross-validated accuracy",
        ordered[0].baseline if ordered else None,
        [r.std for r in ordered],
    )


def mean_difference_curve(diffs: Sequence[MeanDifference], out: str | os.PathLike[str]) -> Figure:
    """Norm of mean(correct) - mean(incorrect) by layer."""
    return line_by_layer(
        [d.site for d in diffs],
        [d.norm for d in diffs],
        out,
        "Correct minus incorrect: norm of the mean difference",
        "L2 norm",
    )


def principal_components(x: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``k`` principal components of the rows of ``x``, without copying ``x``.

    Randomized (``torch.pca_lowrank``, seeded, so the same data give the same answer): memory
    grows with rows x 10, not rows x hidden.

    Returns:
        ``(scores, explained, mean)``: each row's coordinates ``(rows, k)``, the share of the
        variance of each component, and the mean row.
    """
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    q = min(k + 8, *t.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, _ = torch.pca_lowrank(t, q=q, center=True, niter=6)
    mean = x.mean(axis=0, dtype=np.float64)
    total = sum(
        float(((x[i : i + 65536].astype(np.float64) - mean) ** 2).sum())
        for i in range(0, len(x), 65536)
    )
    scores = (u[:, :k] * s[:k]).double().numpy()
    explained = (s[:k].double() ** 2).numpy() / max(total, 1e-12)
    return scores, explained, mean


PCA_POINTS = 5_000
"""Points a PCA scatter draws at most (the components are fitted on every sample)."""


def of_samples(shown: int, total: int) -> str:
    """`` (500 of 100,000 samples)`` when a picture shows a subsample, else nothing."""
    return f" ({shown:,} of {total:,} samples)" if total > shown else ""


@_plain_text
def pca_scatter(
    x: np.ndarray,
    correct: Sequence[bool | None],
    site: str,
    out: str | os.PathLike[str],
    max_points: int = PCA_POINTS,
) -> Figure:
    """2-D PCA of one site's vectors, coloured by correctness.

    The components are fitted on every row; at most ``max_points`` rows, spread evenly over the
    run, are drawn (the title says so).
    """
    plt = _pyplot()
    scores, explained, _ = principal_components(x, 2)
    shown = spread(len(x), max_points)
    coords = scores[shown]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for label, colour, want in (
        ("correct", "tab:green", True),
        ("incorrect", "tab:red", False),
        ("ungraded", "tab:grey", None),
    ):
        idx = [j for j, i in enumerate(shown) if correct[i] is want]
        if idx:
            ax.scatter(
                coords[idx, 0],
                coords[idx, 1] if coords.shape[1] > 1 else np.zeros(len(idx)),
                c=colour,
                label=f"{label} ({len(idx):,})",
                alpha=0.8,
                edgecolors="none",
                s=12 if len(shown) > 500 else None,
            )
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)" if len(explained) > 1 else "PC 2")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(
        fig,
        out,
        f"PCA of {site}, coloured by correctness{of_samples(len(shown), len(x))}",
        {"coords": coords, "explained": explained, "rows": shown},
    )
