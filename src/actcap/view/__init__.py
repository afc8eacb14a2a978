"""``actcap view``: a local, read-only explorer of runs in the browser.

A small HTTP server (the standard library's) serves a page of actcap's own scripts and a JSON API
over one or two runs, read lazily: the manifest lines stay in memory, activations are read one
sample at a time, and run-wide statistics come from a bounded sample of the run.
"""

from actcap.view.aggregate import DEFAULT_SAMPLES, RunStats
from actcap.view.model import ModelHolder, model_spec
from actcap.view.pair import RunPair
from actcap.view.runs import MAX_PAGE, Query, RunView, label_for
from actcap.view.server import STATIC, ViewApp, ViewServer, is_loopback

__all__ = [
    "DEFAULT_SAMPLES",
    "MAX_PAGE",
    "STATIC",
    "ModelHolder",
    "Query",
    "RunPair",
    "RunStats",
    "RunView",
    "ViewApp",
    "ViewServer",
    "is_loopback",
    "label_for",
    "model_spec",
]
