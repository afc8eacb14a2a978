"""The standard set of pictures for a run: what ``actcap plot`` and the HTML report show."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from actcap.analysis import plots
from actcap.analysis.compare import mean_difference_by_layer, similarity_matrix
from actcap.analysis.probes import ProbeResult, probe_layers
from actcap.analysis.stats import directory_summary
from actcap.analysis.vectors import load_vectors
from actcap.errors import ActcapError


@dataclass
class RunFigures:
    """The pictures made for a run, plus the reasons any were left out."""

    figures: list[plots.Figure] = field(default_factory=list)
    """Written pictures, in reading order."""
    notes: list[str] = field(default_factory=list)
    """Why a picture is missing (too few samples, one class only, ...)."""
    probes: list[ProbeResult] = field(default_factory=list)
    """Probe results, when probes ran."""
    skipped_files: int = 0
    """Unreadable files skipped."""


def middle_site(sites: list[str]) -> str:
    """The residual site halfway through the network (a readable default for one-site pictures)."""
    residual = plots.residual_sites(sites) or sites
    return residual[len(residual) // 2]


def make_figures(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    site: str | None = None,
    target: str = "correct",
) -> RunFigures:
    """Write the standard pictures of a run (or folder of files) into ``out``.

    Args:
        directory: A run directory or a folder of activation files.
        out: Folder for the PNG files.
        site: The site for the one-site pictures (similarity, PCA); the middle layer by default.
        target: The probe target.
    """
    out_dir = Path(out)
    result = RunFigures()
    vecs = load_vectors(directory)
    result.skipped_files = len(vecs.skipped)
    chosen = site or middle_site(vecs.sites)
    first = vecs.samples[0].path
    result.figures.append(plots.histogram(first, out_dir / "histogram.png"))
    try:
        result.figures.append(plots.token_layer_norms(first, out_dir / "token_layer_norms.png"))
    except ValueError as e:
        result.notes.append(f"token-by-layer heatmap: {e}")
    summary = directory_summary(directory)
    result.figures.append(
        plots.norm_by_layer(
            {s.site: s.mean_norm for s in summary.sites}, out_dir / "norm_by_layer.png"
        )
    )
    result.figures.append(
        plots.similarity_heatmap(
            similarity_matrix(directory, chosen, vectors=vecs), out_dir / "similarity.png"
        )
    )
    correct = [s.correct for s in vecs.samples]
    result.figures.append(
        plots.pca_scatter(vecs.vectors[chosen], correct, chosen, out_dir / "pca.png")
    )
    try:
        result.figures.append(
            plots.mean_difference_curve(
                mean_difference_by_layer(directory, vectors=vecs), out_dir / "mean_difference.png"
            )
        )
    except ActcapError as e:
        result.notes.append(f"mean difference: {e}")
    try:
        result.probes = probe_layers(directory, target, vectors=vecs)
        result.figures.append(
            plots.probe_curve(result.probes, out_dir / "probe_accuracy.png", target)
        )
    except ActcapError as e:
        result.notes.append(f"probes: {e}")
    return result
