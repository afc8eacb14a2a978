"""Older pipelines' ``torch.save`` and pickle files, loaded safely.

They load through ``torch.load(weights_only=True)``; a pickle that needs more is refused unless
the caller trusts it explicitly (:class:`~actcap.errors.UnsafeFileError`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from actcap.errors import FormatError, UnknownNameError, UnsafeFileError
from actcap.storage.dtypes import SAFETENSORS_NAMES
from actcap.storage.format import ID_TENSORS, SampleMeta
from actcap.storage.header import detect_format
from actcap.storage.records import activation_dict


def _brief(e: BaseException) -> str:
    """The first line of an exception's message, shortened (torch's run to many lines)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _unpickle(path: Path, trust_pickle: bool) -> Any:
    """A torch.save or pickle file's contents: tensors and plain containers only, unless trusted.

    Raises:
        FormatError: When the bytes are no readable torch.save or pickle file.
        UnsafeFileError: A well-formed pickle that needs more than ``weights_only``, untrusted.
    """
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it was not written with; the load is still safe.
            warnings.simplefilter("ignore", UserWarning)
            with open(path, "rb") as f:  # a file object: torch.load judges a path by its suffix
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = e
    except Exception as e:  # weights_only runs no code: any failure means unreadable bytes
        raise FormatError(f"{path}: not a readable torch.save or pickle file ({_brief(e)}).") from e
    problem = _pickle_problem(path)
    if problem is not None:
        raise FormatError(f"{path}: a corrupt torch.save or pickle file ({problem}).") from refused
    if not trust_pickle:
        raise UnsafeFileError(
            f"{path}: this pickle holds objects beyond tensors and plain containers, and loading "
            "it could run arbitrary code. If you made this file yourself, load it in Python with "
            "load_activations(path, trust_pickle=True); otherwise do not open it."
        ) from refused
    try:
        with open(path, "rb") as f:
            if detect_format(path) == "torch-zip":
                return torch.load(f, map_location="cpu", weights_only=False)
            return pickle.load(f)  # noqa: S301 - trusted; a plain pickle.dump, which torch.load refuses
    except Exception as e:  # any unpickling failure of a trusted file
        raise FormatError(f"{path}: cannot unpickle ({_brief(e)}).") from e


def _pickle_problem(path: Path) -> str | None:
    """Why a file's pickle (a torch zip's ``data.pkl``) does not parse; None when it parses.

    Opcodes and stack are checked by ``pickletools.dis``, which runs nothing.
    """
    import pickletools
    import zipfile

    try:
        with open(os.devnull, "w") as sink:
            if detect_format(path) == "torch-zip":
                with zipfile.ZipFile(path) as z:
                    member = next(n for n in z.namelist() if n.endswith("data.pkl"))
                    with z.open(member) as f:
                        pickletools.dis(f, out=sink)
            else:
                with open(path, "rb") as f:
                    pickletools.dis(f, out=sink)
    except StopIteration:
        return "a zip archive without a data.pkl"
    except Exception as e:  # any parse failure: not a pickle anyone could load
        return _brief(e)
    return None


def legacy_contents(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A torch.save file's tensors, and a safetensors-like header describing them.

    Raises:
        FormatError: When the file is no activation file, or an activation is no tensor.
        UnsafeFileError: A pickle that needs code execution.
    """
    data = load_legacy(path, None, trust_pickle=False)
    tensors = {str(k): v for k, v in data["activations"].items()}
    tensors.update({k: data[k] for k in ID_TENSORS if isinstance(data.get(k), Tensor)})
    text = ("prompt", "response", "model", "timestamp")
    header: dict[str, Any] = {
        "__metadata__": {k: data[k] for k in text if isinstance(data.get(k), str)}
    }
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise FormatError(f"{path}: activation {name!r} is a {type(t).__name__}, not a tensor.")
        dtype = SAFETENSORS_NAMES.get(t.dtype, str(t.dtype))
        header[name] = {"dtype": dtype, "shape": list(t.shape)}
    return tensors, header


def load_legacy(path: Path, sites: Sequence[str] | None, trust_pickle: bool) -> dict[str, Any]:
    """The seed's dictionary from a torch.save or pickle file (see :func:`_unpickle`)."""
    data = _unpickle(path, trust_pickle)
    if not isinstance(data, dict) or not isinstance(data.get("activations"), dict):
        raise FormatError(
            f"{path}: a torch.save file without an 'activations' dictionary is not an activation file."
        )
    acts = data["activations"]
    if sites is not None:
        missing = [s for s in sites if s not in acts]
        if missing:
            raise UnknownNameError(
                f"{path}: no site {missing[0]!r}. Sites in this file: {', '.join(map(str, acts))}."
            )
        acts = {s: acts[s] for s in sites}
    meta = SampleMeta(
        prompt=data.get("prompt", ""),
        response=data.get("response", ""),
        model=data.get("model", ""),
        timestamp=data.get("timestamp", ""),
    )
    metadata = {k: v for k, v in data.items() if k != "activations"}
    return activation_dict(meta, acts, data.get("input_ids"), data.get("output_ids"), metadata)
