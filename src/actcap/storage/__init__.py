"""Storage: the activation file format and the run directory. Never imports a model or a hook."""

from actcap.storage.files import (
    ActivationFile,
    atomic_write_bytes,
    load_activations,
    read_header,
    save_activations,
)
from actcap.storage.format import FORMAT_NAME, FORMAT_VERSION, SUFFIX, SampleMeta, utc_now
from actcap.storage.records import FinishedSample, ManifestLine
from actcap.storage.run import (
    ManifestEntry,
    RunInfo,
    RunWriter,
    open_run,
    read_manifest,
    sample_filename,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUFFIX",
    "ActivationFile",
    "FinishedSample",
    "ManifestEntry",
    "ManifestLine",
    "RunInfo",
    "RunWriter",
    "SampleMeta",
    "atomic_write_bytes",
    "load_activations",
    "open_run",
    "read_manifest",
    "read_header",
    "sample_filename",
    "save_activations",
    "utc_now",
]
