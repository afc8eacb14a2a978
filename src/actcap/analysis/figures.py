"""The standard set of pictures for a run: what ``actcap plot`` and the HTML report show."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from actcap.analysis import plots
from actcap.analysis.compare import mean_difference_by_layer, similarity_matrix
from actcap.analysis.probes import ProbeResult, probe_layers
from actcap.analysis.vectors import load_vectors
from actcap.data.samples import SampleRef
from actcap.errors import ActcapError, SiteShapeError, UnknownNameError
from actcap.storage.names import residual_sites


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
    n_samples: int = 0
    """Samples read."""


def middle_site(sites: list[str]) -> str:
    """The residual site halfway through the network (a readable default for one-site pictures)."""
    residual = residual_sites(sites) or sites
    return residual[len(residual) // 2]


def make_figures(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    site: str | None = None,
    target: str = "correct",
    *,
    samples: list[SampleRef] | None = None,
) -> RunFigures:
    """Write the standard pictures of a run (or folder of files) into ``out``.

    One pass reads the run (see :func:`load_vectors`: memory holds about one site's vectors,
    whatever the number of samples). The similarity heatmap shows at most
    :data:`compare.SIMILARITY_SAMPLES` samples, the PCA scatter at most :data:`plots.PCA_POINTS` points,
    the probes use at most :data:`probes.PROBE_SAMPLES` samples; each says so in its title or note.

    Args:
        directory: A run directory or a folder of activation files.
        out: Folder for the PNG files.
        site: The site for the one-site pictures (similarity, PCA); the middle layer by default.
        target: The probe target.
        samples: The samples of ``directory`` when already listed.

    Raises:
        NoActivationsError: When the run has no activations (made with ``--no-capture``).
        UnknownNameError: When ``site`` is not in the run.
    """
    out_dir = Path(out)
    result = RunFigures()
    vecs = load_vectors(directory, samples=samples)
    result.skipped_files = len(vecs.skipped)
    result.n_samples = len(vecs.samples)
    chosen = site or middle_site(vecs.sites)
    if chosen not in vecs.vectors:
        raise UnknownNameError(
            f"{directory}: no site {chosen!r} in this run. Sites: {', '.join(vecs.sites)}."
        )
    first = vecs.samples[0].path
    result.figures.append(plots.histogram(first, out_dir / "histogram.png"))
    try:
        result.figures.append(plots.token_layer_norms(first, out_dir / "token_layer_norms.png"))
    except SiteShapeError as e:
        result.notes.append(f"token-by-layer heatmap: {e}")
    result.figures.append(plots.norm_by_layer(vecs.mean_norms, out_dir / "norm_by_layer.png"))
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
        result.notes.extend(probe_notes(result.probes))
    except ActcapError as e:
        result.notes.append(f"probes: {e}")
    return result


def probe_notes(results: list[ProbeResult]) -> list[str]:
    """What a reader of probe results must know: a subsample, classes left out."""
    if not results:
        return []
    first, notes = results[0], []
    if first.labelled > first.n:
        notes.append(
            f"probes: trained and tested on {first.n:,} of {first.labelled:,} labelled samples, "
            "a stratified subsample spread over the run."
        )
    if first.left_out:
        shown = ", ".join(f"{c!r} ({n})" for c, n in first.left_out[:10])
        more = f" and {len(first.left_out) - 10} more" if len(first.left_out) > 10 else ""
        notes.append(
            f"probes: left out {len(first.left_out)} class(es) with a single sample: {shown}{more}."
        )
    return notes
