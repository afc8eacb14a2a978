"""The model behind a run, loaded once in the background for token text and the logit lens.

Viewing needs no model: without one, tokens show as ids and the lens says why it is missing.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from actcap.errors import ActcapError, ModelLoadError
from actcap.models import DEFAULT_MODEL_NAME, LoadedModel, load_model


def model_spec(config: dict[str, Any], override: str | None) -> str | None:
    """The model to load for a run: ``override``, else the one ``run.json`` names (None: none)."""
    if override:
        return override
    name = config.get("model")
    if name == DEFAULT_MODEL_NAME:
        return "default"
    source = config.get("model_source")
    for candidate in (source, name):
        if isinstance(candidate, str) and candidate:
            return candidate
    return None


class ModelHolder:
    """One model, loaded on a background thread from the first :meth:`start`; shared by runs."""

    def __init__(self, spec: str | None, device: str = "auto", why_none: str = "") -> None:
        """Hold ``spec`` (None: no model; ``why_none`` says why) without loading it yet."""
        self.spec = spec
        self.device = device
        self.why_none = why_none or "no model: pass --model to read token text and the logit lens."
        self._future: Future[LoadedModel] | None = None
        self._lock = threading.Lock()
        self.use_lock = threading.Lock()
        """Held while the model computes (one request at a time)."""

    def start(self) -> None:
        """Begin loading in the background (once)."""
        with self._lock:
            if self._future is not None or self.spec is None:
                return
            future: Future[LoadedModel] = Future()
            self._future = future
        threading.Thread(target=self._load, args=(future,), daemon=True).start()

    def _load(self, future: Future[LoadedModel]) -> None:
        try:
            future.set_result(load_model(self.spec or "default", device=self.device))
        except Exception as e:  # any failure becomes the message the page shows
            future.set_exception(e)

    def get(self) -> LoadedModel:
        """The model, waiting for it to load.

        Raises:
            ModelLoadError: When there is no model or it failed to load (the message says why).
        """
        if self.spec is None:
            raise ModelLoadError(self.why_none)
        self.start()
        assert self._future is not None
        try:
            return self._future.result()
        except ActcapError as e:
            raise ModelLoadError(f"the model {self.spec!r} could not be loaded: {e}") from e
        except Exception as e:
            raise ModelLoadError(
                f"the model {self.spec!r} could not be loaded ({type(e).__name__}: {e}); pass "
                "--model with a model folder, hub id or .gguf file, or --no-model."
            ) from e

    def peek(self) -> LoadedModel | None:
        """The model if it has loaded, else None at once (loading begins if it had not)."""
        if self.spec is None:
            return None
        self.start()
        future = self._future
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    def status(self) -> dict[str, Any]:
        """``{"spec", "state", "message"}``: none, loading, ready or failed."""
        if self.spec is None:
            return {"spec": None, "state": "none", "message": self.why_none}
        future = self._future
        if future is None or not future.done():
            return {"spec": self.spec, "state": "loading", "message": ""}
        error = future.exception()
        if error is None:
            return {"spec": self.spec, "state": "ready", "message": ""}
        return {"spec": self.spec, "state": "failed", "message": f"{type(error).__name__}: {error}"}
