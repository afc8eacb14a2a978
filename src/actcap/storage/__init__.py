"""Storage: the activation file format and the run directory. Never imports a model or a hook.

One concern a module, lowest first: :mod:`~actcap.storage.format` (metadata, constants),
:mod:`~actcap.storage.names` (the site-name grammar), :mod:`~actcap.storage.dtypes`,
:mod:`~actcap.storage.durable` (atomic writes), :mod:`~actcap.storage.encode`,
:mod:`~actcap.storage.header` (format detection and checks), :mod:`~actcap.storage.legacy`
(torch.save files), :mod:`~actcap.storage.reader` (:class:`ActivationFile`);
:mod:`~actcap.storage.layout` (a run's names), :mod:`~actcap.storage.manifest`,
:mod:`~actcap.storage.repair`, :mod:`~actcap.storage.runconfig`, :mod:`~actcap.storage.run`
(:class:`RunWriter`), :mod:`~actcap.storage.runinfo` (:func:`open_run`); and on top
:mod:`~actcap.storage.files`, the public verbs ``save_activations``/``load_activations``.
The file format and run directory are described in ``docs/format.md``.
"""

from actcap.storage.durable import atomic_write_bytes
from actcap.storage.files import load_activations, save_activations
from actcap.storage.format import FORMAT_NAME, FORMAT_VERSION, SUFFIX, SampleMeta, utc_now
from actcap.storage.header import read_header
from actcap.storage.layout import sample_filename
from actcap.storage.manifest import ManifestEntry, read_manifest
from actcap.storage.names import site_sort_key
from actcap.storage.reader import ActivationFile
from actcap.storage.records import FinishedSample, ManifestLine
from actcap.storage.run import RunWriter
from actcap.storage.runinfo import RunInfo, open_run

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
    "site_sort_key",
    "utc_now",
]
