"""Analysis: statistics, comparisons, probes, logit lens, pictures and the HTML report.

Reads runs and files through :mod:`actcap.storage` only, so it works on a machine without the
model (the logit lens excepted). Every function returns data (dataclasses, arrays), not text.
"""

from actcap.analysis.compare import (
    MeanDifference,
    SimilarityMatrix,
    SiteComparison,
    compare_files,
    mean_difference_by_layer,
    similarity_matrix,
)
from actcap.analysis.figures import RunFigures, make_figures
from actcap.analysis.lens import LensRow, logit_lens
from actcap.analysis.probes import ProbeResult, probe_layers
from actcap.analysis.report import build_report
from actcap.analysis.stats import DirectorySummary, SiteStats, directory_summary, file_stats
from actcap.analysis.vectors import SampleVectors, load_vectors
from actcap.data.samples import SampleRef, list_samples

__all__ = [
    "DirectorySummary",
    "LensRow",
    "MeanDifference",
    "ProbeResult",
    "RunFigures",
    "SampleRef",
    "SampleVectors",
    "SimilarityMatrix",
    "SiteComparison",
    "SiteStats",
    "build_report",
    "compare_files",
    "directory_summary",
    "file_stats",
    "list_samples",
    "load_vectors",
    "logit_lens",
    "make_figures",
    "mean_difference_by_layer",
    "probe_layers",
    "similarity_matrix",
]
