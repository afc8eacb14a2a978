"""Storage: the activation file format and the run directory. Never imports a model or a hook."""

from actcap.storage.files import (
    ActivationFile,
    atomic_write_bytes,
    load_activations,
    read_header,
    save_activations,
)
from actcap.storage.format import FORMAT_NAME, FORMAT_VERSION, SUFFIX, SampleMeta, utc_now

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUFFIX",
    "ActivationFile",
    "SampleMeta",
    "atomic_write_bytes",
    "load_activations",
    "read_header",
    "save_activations",
    "utc_now",
]
