"""Runs as training data: :class:`ActivationDataset` streams a run's activations into PyTorch.

``import actcap`` does not import this package; ``from actcap.data import ActivationDataset`` does
(and torch with it). It reads through :mod:`actcap.storage` only (never a model or a hook), and
sits below :mod:`actcap.analysis` in the import layers so that analysis reads through it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actcap.data.dataset import LABELS, ActivationDataset

__all__ = ["LABELS", "ActivationDataset"]


def __getattr__(name: str) -> Any:
    """Import the dataset (and torch) on first use, not with the package."""
    if name in __all__:
        from actcap.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'actcap.data' has no attribute {name!r}")
