"""The errors actcap raises on purpose.

Every message says what failed, on which value, and what to do next. The command line turns
these into a one-line ``Error: ...`` and exit status 1; any other exception is a bug. Catch
:class:`ActcapError` for all of them, or a class below for one kind. The whole tree (a second
base in brackets, kept so that ``except KeyError`` and the like still work):

* ActcapError
    + ModelLoadError - a model or tokenizer not found or not loadable
    + UnknownNameError (KeyError) - a site, layer, benchmark, grader or option value that does not exist
    + FormatError - a file or run directory actcap cannot read
        - UnsafeFileError - a pickle, refused without an explicit trust flag
    + MissingDependencyError (ImportError) - an optional extra is not installed
    + BenchmarkError - a benchmark file or question that cannot be read or used
    + RunError - a run directory that cannot be written: locked, other config, out of space
    + WriteError (OSError) - a file that could not be written: disk full, no permission
    + CaptureError - a capture request that cannot be carried out on this input
        - UnrecordableSiteError (TypeError) - a module whose input or output holds no tensor
    + NoActivationsError - a run or folder with nothing to analyse
    + AnalysisError - an analysis that this data does not allow
        - NotEnoughSamplesError - too few samples, grades or classes (probes, directions)
        - IncompatibleInputsError - two inputs that do not fit together: no shared site, widths
        - SiteShapeError (ValueError) - a site whose shape the analysis cannot use
        - TokenPositionError (IndexError) - a token position or range outside the sample
    + ViewError - ``actcap view`` cannot serve: a port in use, too many runs
"""

from __future__ import annotations


class ActcapError(Exception):
    """Base class for every error actcap raises on purpose."""


class ModelLoadError(ActcapError):
    """A model or tokenizer could not be found or loaded."""


class UnknownNameError(ActcapError, KeyError):
    """A site, layer, benchmark, grader or option value that does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message.
        return str(self.args[0]) if self.args else ""


class FormatError(ActcapError):
    """A file or run directory that is not in a format actcap can read."""


class UnsafeFileError(FormatError):
    """A file whose loading could run code (a pickle), refused without an explicit trust flag."""


class MissingDependencyError(ActcapError, ImportError):
    """An optional extra that a feature needs is not installed."""


class BenchmarkError(ActcapError):
    """A benchmark file or question that cannot be read or used."""


class RunError(ActcapError):
    """A run directory that cannot be written: locked, mismatched config, out of space."""


class WriteError(ActcapError, OSError):
    """A file could not be written: disk full, no permission, I/O error."""


class CaptureError(ActcapError):
    """A capture request that cannot be carried out on this input."""


class NoActivationsError(ActcapError):
    """A run or folder with nothing to analyse: run with ``--no-capture``, empty, or no files."""


class UnrecordableSiteError(CaptureError, TypeError):
    """A site whose module's input or output holds no tensor to record; pick another site."""


class AnalysisError(ActcapError):
    """An analysis that this data does not allow (the message says which data would)."""


class NotEnoughSamplesError(AnalysisError):
    """Too few samples, grades or classes: a probe or a direction needs more of them."""


class IncompatibleInputsError(AnalysisError):
    """Two inputs that do not fit together: no shared site, different widths, another model."""


class SiteShapeError(AnalysisError, ValueError):
    """A site whose shape the analysis cannot use, e.g. one vector where tokens are needed."""


class TokenPositionError(AnalysisError, IndexError):
    """A token position or range outside the tokens a sample holds."""


class ViewError(ActcapError):
    """``actcap view`` cannot serve: the port is in use, or it was given too many runs."""


def require(module: str, extra: str, feature: str) -> None:
    """Check that an optional dependency can be imported.

    Args:
        module: The module to import, e.g. ``"matplotlib"``.
        extra: The actcap extra that installs it, e.g. ``"plot"``.
        feature: What needs it, for the message.

    Raises:
        MissingDependencyError: When the module cannot be imported.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{feature} needs the optional package {module!r}, which is not installed. "
            f"Install it with: pip install 'actcap[{extra}]'"
        )
