"""Model loading: hub ids, local folders, GGUF files and the built-in default model.

Also knows, per architecture, which module is decoder block *i* and where the final norm is.
"""

from actcap.models.builtin import DEFAULT_MODEL_NAME, cache_dir, convert_gguf, default_gguf_path
from actcap.models.context import MAX_CHARS_PER_TOKEN, check_prompt_length, context_length
from actcap.models.layout import Layout, find_layout
from actcap.models.loading import (
    LoadedModel,
    clear_model_cache,
    load_model,
    load_skeleton,
    parse_dtype,
    resolve_device,
    wrap_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MAX_CHARS_PER_TOKEN",
    "Layout",
    "LoadedModel",
    "cache_dir",
    "check_prompt_length",
    "clear_model_cache",
    "context_length",
    "convert_gguf",
    "default_gguf_path",
    "find_layout",
    "load_model",
    "load_skeleton",
    "parse_dtype",
    "resolve_device",
    "wrap_model",
]
