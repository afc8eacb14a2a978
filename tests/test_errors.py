"""The exception tree (issue #13, item 5): drawn whole in ``actcap.errors``' docstring, and the
errors that used to be ``ValueError``/``TypeError``/bare ``ActcapError`` are specific subclasses
that still satisfy the ``except`` clauses written for the old types.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import actcap.errors as errors
from actcap.analysis import compare_files, file_stats, logit_lens
from actcap.capture.hooks import _first_tensor
from actcap.capture.sites import Site
from actcap.storage import SampleMeta, save_activations


def drawn_tree() -> dict[str, tuple[str | None, str | None]]:
    """Class name -> (parent drawn above it, second base in brackets) from the docstring."""
    tree: dict[str, tuple[str | None, str | None]] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^(\s*)[*+-] (\w+)(?: \((\w+)\))?", line)
        if not m:
            continue
        depth, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        tree[name] = (stack[-1][1] if stack else None, m.group(3))
        stack.append((depth, name))
    return tree


def test_the_docstring_draws_every_error_class_under_its_base():
    classes = {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ActcapError) and cls.__module__ == errors.__name__
    }
    tree = drawn_tree()
    assert set(tree) == set(classes)
    for name, cls in classes.items():
        parent, second = tree[name]
        bases = [b.__name__ for b in cls.__bases__]
        assert parent == (None if cls is errors.ActcapError else bases[0]), name
        assert second == (bases[1] if len(bases) > 1 else None), name


def test_a_module_output_without_a_tensor_is_a_capture_error_that_is_a_type_error():
    site = Site("layer_0.odd", "model.layers.0.odd")
    with pytest.raises(errors.UnrecordableSiteError, match="layer_0.odd") as e:
        _first_tensor({"not": "a tensor"}, site)
    assert isinstance(e.value, TypeError) and isinstance(e.value, errors.CaptureError)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A file with [3, 8] sites and one with a different site."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_activations(
        a, {"layer_0": torch.randn(3, 8)}, SampleMeta("p", "r"), input_ids=torch.arange(3)
    )
    save_activations(
        b, {"layer_1": torch.randn(3, 8)}, SampleMeta("p", "r"), input_ids=torch.arange(3)
    )
    return a, b


def test_analysis_errors_name_their_kind(files):
    a, b = files
    with pytest.raises(errors.IncompatibleInputsError, match="share no site"):
        compare_files(a, b)
    with pytest.raises(errors.TokenPositionError, match="selects no token"):
        file_stats(a, tokens=slice(50, 60))
    with pytest.raises(errors.TokenPositionError, match="past the end"):
        logit_lens(a, token=99)


def test_plot_without_token_sites_is_a_site_shape_error_that_is_a_value_error(tmp_path):
    pytest.importorskip("matplotlib")
    from actcap.analysis import plots

    path = tmp_path / "last.safetensors"
    meta = SampleMeta("p", "r", token_selection="last")
    save_activations(path, {"layer_0": torch.randn(8)}, meta, input_ids=torch.arange(3))
    with pytest.raises(errors.SiteShapeError, match="residual sites") as e:
        plots.token_layer_norms(path, tmp_path / "norms.png")
    assert isinstance(e.value, ValueError)
