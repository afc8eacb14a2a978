"""Load a causal language model and its tokenizer from a hub id, a folder, a GGUF file or "default".

Loaded models are kept in a per-process cache keyed by what was asked for, so calling the public
API once per prompt loads the model once.
"""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from actcap.errors import ModelLoadError, UnknownNameError
from actcap.models.builtin import DEFAULT_MODEL_NAME, convert_gguf, default_gguf_path
from actcap.models.chat import stop_token_ids
from actcap.models.layout import Layout, find_layout

Device = Literal["auto", "cpu", "cuda", "mps"] | str
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for capture: the module, its tokenizer and where it came from."""

    model: nn.Module
    """The ``PreTrainedModel``, in eval mode."""
    tokenizer: Any
    """Its tokenizer, padding on the left (batched generation and capture need it)."""
    name: str
    """What the user asked for: ``"default"``, a hub id, a folder or a file."""
    source: str
    """Where the weights were read from (a folder or hub id)."""
    layout: Layout = field(repr=False)
    """Where the decoder blocks and final norm are."""

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the input embeddings run on.

        When accelerate dispatched them (offloaded to the CPU or disk, weights on ``meta``),
        that is the execution device of its hook, not the device of the weights.
        """
        emb = self.model.get_input_embeddings()  # type: ignore[operator]
        hook = getattr(emb, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(
                execution if not isinstance(execution, int) else f"cuda:{execution}"
            )
        device = next(emb.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device  # type: ignore[no-any-return]

    @cached_property
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer (end of sequence, end of turn); computed once."""
        return stop_token_ids(self.tokenizer, self.model)

    @property
    def display_name(self) -> str:
        """The name stored in activation files."""
        return DEFAULT_MODEL_NAME if self.name == "default" else self.name


HUB_TIMEOUT_S = 10.0
"""How long the hub may take to say whether a model exists before the load gives up."""

_cache: dict[tuple[str, str, str | None, str | None], LoadedModel] = {}
_lock = threading.Lock()


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"bfloat16"``-style names into a torch dtype.

    Raises:
        UnknownNameError: For a name that is not a floating dtype actcap supports.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise UnknownNameError(
            f"Unknown dtype {dtype!r}. Choose one of: float32, float16, bfloat16."
        ) from None


def resolve_device(device: Device) -> str:
    """Turn ``"auto"`` into the best available device; check the others exist.

    Raises:
        ModelLoadError: When the requested accelerator is not available.
        UnknownNameError: When ``device`` names no device type.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} but CUDA is not available; use --device cpu.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device='mps' but MPS is not available; use --device cpu.")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise UnknownNameError(
            f"Unknown device {device!r}. Choose one of: auto, cpu, cuda, cuda:N, mps."
        ) from None
    return device


def load_model(
    spec: str | LoadedModel = "default",
    *,
    device: Device = "auto",
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> LoadedModel:
    """Load a causal LM and tokenizer, or return the one already loaded for the same request.

    Args:
        spec: ``"default"`` (the built-in SmolLM2-135M-Instruct), a hub id such as
            ``"meta-llama/Llama-3.2-3B-Instruct"``, a local model folder, or a ``.gguf`` file. A
            ``LoadedModel`` is returned as it is.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``. Ignored when
            ``device_map`` is given.
        dtype: Weights dtype (``"float32"``, ``"float16"``, ``"bfloat16"``); the checkpoint's own
            when None.
        device_map: Passed to ``from_pretrained`` (e.g. ``"auto"`` to spread a model that does
            not fit on one GPU over several, with accelerate; what fits nowhere is offloaded to
            the CPU or to disk).
        max_memory: With ``device_map``, the most each device may hold, e.g.
            ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``.
        offload_folder: With ``device_map``, where weights offloaded to disk go.
        cache: Keep the model for later calls with the same arguments.

    Returns:
        The loaded model, in eval mode, with a left-padding tokenizer.

    Raises:
        ModelLoadError: When the model cannot be found or read; the message says what to run.

    Example:
        >>> lm = load_model("default")
        >>> lm.model.config.num_hidden_layers
        30
    """
    if isinstance(spec, LoadedModel):
        return spec
    torch_dtype = parse_dtype(dtype)
    resolved_device = None if device_map is not None else resolve_device(device)
    placement = None
    if device_map is not None:
        placement = repr((device_map, max_memory, os.fspath(offload_folder or "")))
    key = (spec, str(torch_dtype), resolved_device, placement)
    with _lock:
        if cache and key in _cache:
            return _cache[key]
        extra: dict[str, Any] = {}
        if device_map is not None and max_memory is not None:
            extra["max_memory"] = max_memory
        if device_map is not None and offload_folder is not None:
            extra["offload_folder"] = os.fspath(offload_folder)
        loaded = _load_uncached(spec, resolved_device, torch_dtype, device_map, **extra)
        if cache:
            _cache[key] = loaded
        return loaded


def clear_model_cache() -> None:
    """Forget every cached model (frees their memory once no one else holds them)."""
    with _lock:
        _cache.clear()


def _source_folder(spec: str) -> str:
    if spec == "default":
        return str(convert_gguf(default_gguf_path()))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{spec}: no such GGUF file.{_did_you_mean(spec)}")
        return str(convert_gguf(path))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{spec}: not a model folder or .gguf file. Pass a folder holding config.json "
                "and weights, a .gguf file, a hub id, or 'default'."
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{spec}: this folder holds no config.json, so it is no model folder."
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"{spec}: no such file or folder.{_did_you_mean(spec)}")
    check_hub_id(spec)
    return spec  # a hub id


def _local_candidates(spec: str) -> list[str]:
    """Model folders and ``.gguf`` files beside where ``spec`` points (or in the working folder)."""
    parent = Path(spec).expanduser().parent
    folder = parent if str(parent) not in ("", ".") and parent.is_dir() else Path(".")
    out: list[str] = []
    try:
        for entry in sorted(folder.iterdir())[:500]:
            if (entry / "config.json").is_file() or entry.suffix.lower() == ".gguf":
                out.append(str(entry) if folder != Path(".") else entry.name)
    except OSError:
        pass
    return out


def model_suggestions(spec: str, cutoff: float = 0.6) -> list[str]:
    """The names nearest to a model name that matched nothing: ``default``, then local models."""
    return difflib.get_close_matches(
        spec, ["default", *_local_candidates(spec)], n=3, cutoff=cutoff
    )


def _did_you_mean(spec: str, cutoff: float = 0.6) -> str:
    close = model_suggestions(spec, cutoff)
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``), in the env or the library."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in ("1", "ON", "YES", "TRUE") or bool(constants.is_offline_mode())


def check_hub_id(spec: str) -> None:
    """Fail fast on a hub id that cannot load, instead of minutes of download retries.

    A name that is no valid hub id, a bare name close to ``default`` or a local model, a model
    missing from the local cache while offline, and one the hub says does not exist (or that it
    cannot be reached for) are refused at once, with the nearest names. A cached model, and any
    other answer from the hub (gated, rate limited), is left to ``from_pretrained``.

    Raises:
        ModelLoadError: When the model cannot load, saying why and what to pass instead.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    others = "'default', a local model folder, a .gguf file, or a hub id such as 'org/name'"
    what = f"Pass {others}."
    try:
        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except HFValidationError:
        raise ModelLoadError(
            f"{spec!r} is no model: not a file, not a folder, not a valid hub id."
            f"{_did_you_mean(spec)} {what}"
        ) from None
    if cached:
        return
    if "/" not in spec and model_suggestions(spec, cutoff=0.75):
        raise ModelLoadError(f"Unknown model {spec!r}.{_did_you_mean(spec, 0.75)} {what}")
    if hub_offline():
        raise ModelLoadError(
            f"Model {spec!r} is not in the Hugging Face cache, and the hub is offline "
            f"(HF_HUB_OFFLINE is set).{_did_you_mean(spec)} Unset HF_HUB_OFFLINE to download "
            f"it, or pass {others}."
        )
    try:
        HfApi().model_info(spec, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # from_pretrained says how to get access
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"No model {spec!r} on the Hugging Face hub (or it is private: log in with "
            f"`hf auth login`).{_did_you_mean(spec)} {what}"
        ) from None
    except HfHubHTTPError:
        return  # any other answer from the hub: from_pretrained reports it in full
    except Exception as e:  # connection refused, no DNS, timeout: the HTTP client's own types
        raise ModelLoadError(
            f"Cannot reach the Hugging Face hub to fetch {spec!r} ({type(e).__name__}: {e}).{_did_you_mean(spec)} "
            f"Check the network, set HF_HUB_OFFLINE=1 to use cached models only, or pass {others}."
        ) from None


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-load progress bar (a plain load takes about a second)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_uncached(
    spec: str,
    device: str | None,
    dtype: torch.dtype | None,
    device_map: str | dict[str, Any] | None,
    **placement: Any,
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _source_folder(spec)
    kwargs: dict[str, Any] = dict(placement)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "The hub is not reachable from here (offline), so only models already in the Hugging "
            "Face cache can load. "
            if offline
            else ""
        )
        raise ModelLoadError(
            f"Cannot load model {spec!r}: {e}. {hint}Check the hub id (and `huggingface-cli login` "
            "for gated models), or pass a local folder, a .gguf file, or 'default'."
        ) from e
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"Cannot load model {spec!r}: {e}") from e
    if device is not None:
        model = model.to(device)
    model.eval()
    _left_padding(tokenizer)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=spec, source=source, layout=find_layout(model)
    )


def load_skeleton(spec: str) -> LoadedModel:
    """A model's tokenizer and module tree without its weights (on the ``meta`` device).

    Enough to plan a run (build prompts, resolve capture sites, read the config) in a process
    that will not run the model, such as the driver of a Ray run; costs no memory for weights.

    Raises:
        ModelLoadError: When the model cannot be found or its config read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = _source_folder(spec)
    try:
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(source)
            config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"Cannot read model {spec!r}: {e}") from e
    model.eval()
    _left_padding(tokenizer)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=spec, source=source, layout=find_layout(model)
    )


def _left_padding(tokenizer: Any) -> None:
    """Pad on the left (batched generation and capture need it), with EOS when there is no pad."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def wrap_model(model: nn.Module, tokenizer: Any, name: str = "custom") -> LoadedModel:
    """Wrap an already constructed model and tokenizer (for example a tiny test model).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer; switched to left padding.
        name: The name stored in activation files.
    """
    model.eval()
    _left_padding(tokenizer)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, source=name, layout=find_layout(model)
    )
