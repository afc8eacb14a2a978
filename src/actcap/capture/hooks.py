"""Forward hooks that record activations, attached for the length of a ``with`` block.

Hooks copy each activation off the accelerator as soon as it is produced (detached, cast to the
storage dtype), return ``None`` so the model's computation is untouched, and are always removed
when the block ends, exceptions included. When the cast narrows the range (float16 storage of a
float32 or bfloat16 model), each hook also counts, on the device and per position, the values the
cast turns into ``inf``/``nan``, so that a storage dtype too small is never silent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from actcap.capture.sites import Site
from actcap.capture.stats import StatsCollector
from actcap.errors import UnrecordableSiteError


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end a forward pass once every wanted site is recorded."""


def _raise_stop(*_args: Any) -> None:
    raise StopForward


def deepest_block(sites: Sequence[Site], block_paths: Sequence[str]) -> int | None:
    """The last decoder block any site lives in, or None when a site lies outside the blocks.

    Past that block nothing wanted is computed, so a capture-only pass may stop there.
    """
    deepest = -1
    for site in sites:
        index = next(
            (
                i
                for i, p in enumerate(block_paths)
                if site.module_path == p or site.module_path.startswith(p + ".")
            ),
            None,
        )
        if index is None:
            return None
        deepest = max(deepest, index)
    return deepest if deepest >= 0 else None


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End every forward pass inside the block once ``module`` has run (raises :class:`StopForward`).

    Register after the recording hooks, so that those on the same module run first.
    """
    handle = module.register_forward_hook(_raise_stop)
    try:
        yield
    finally:
        handle.remove()


FLOAT16_OVERFLOW = 65520.0
"""Values at least this large (in magnitude) become ``inf`` in float16 (its largest finite value
is 65,504; 65,520 is halfway to the next power of two and rounds up)."""


def nonfinite_after_cast(t: Tensor) -> Tensor:
    """Per position, how many values of ``(batch, seq, hidden)`` are inf/nan once cast to float16.

    One reduction on the tensor's own device; nothing is synchronised.
    """
    return (~(t.abs() < FLOAT16_OVERFLOW)).sum(dim=-1, dtype=torch.int32)


def _first_tensor(value: Any, site: Site) -> Tensor:
    """Normalise module outputs: a tensor, or a tuple/list/ModelOutput whose first item is one.

    Raises:
        UnrecordableSiteError: When ``value`` holds no tensor to record.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    first = getattr(value, "last_hidden_state", None)
    if isinstance(first, Tensor):
        return first
    raise UnrecordableSiteError(
        f"site {site.name}: the module {site.module_path} outputs a {type(value).__name__}, "
        "not a tensor, so there is nothing to record; capture a site whose module outputs a "
        "tensor (a layer_<i> name, or another module path)."
    )


class Recorder:
    """Collects, per site, the activation chunks of each forward pass inside a capture block.

    A chunk is ``(batch, seq, hidden)`` on the offload device; a prefill gives one chunk and each
    generation step one more.
    """

    def __init__(
        self,
        sites: Sequence[Site],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        last_token_only: bool = False,
        max_steps: int | None = None,
        stats: StatsCollector | None = None,
    ) -> None:
        """Create an empty recorder.

        Args:
            sites: The sites to record.
            dtype: Storage dtype of the copies.
            device: Where copies go.
            last_token_only: Keep only the last position of each chunk (valid for left-padded
                batches, where the last position is a real token in every row).
            max_steps: Record at most this many forward passes per site (1 = prefill only).
            stats: Fed every recorded chunk in full (all its tokens, before ``last_token_only``
                cuts it), on the activation's own device.
        """
        self.sites = list(sites)
        self.dtype = dtype
        self.device = torch.device(device)
        self.last_token_only = last_token_only
        self.max_steps = max_steps
        self.stats = stats
        self.chunks: dict[str, list[Tensor]] = {s.name: [] for s in self.sites}
        self.count_nonfinite = dtype == torch.float16
        """Whether the cast can overflow (float16 storage), so stored inf/nan are counted."""
        self.nonfinite: dict[str, list[Tensor]] = {s.name: [] for s in self.sites}
        """Per site, one ``(batch, seq)`` count per chunk of the values the cast made inf/nan
        (on the device the activation came from); empty when nothing is counted."""
        self.batch_size: int | None = None
        """Rows of the current batch, so that flattened ``(batch*seq, hidden)`` outputs (OPT's
        MLP) can be put back into shape."""

    def reset(self) -> None:
        """Drop everything recorded so far (between batches)."""
        for chunks in self.chunks.values():
            chunks.clear()
        for counts in self.nonfinite.values():
            counts.clear()

    def store(self, name: str, value: Tensor) -> None:
        """Record one activation tensor for ``name``."""
        chunks = self.chunks[name]
        if self.max_steps is not None and len(chunks) >= self.max_steps:
            return
        t = value.detach()
        if t.dim() == 2:
            # (batch*seq, hidden) from a module that flattens, or (seq, hidden) without a batch.
            rows = self.batch_size or 1
            t = t.reshape(rows, -1, t.shape[-1]) if t.shape[0] % rows == 0 else t.unsqueeze(0)
        if self.stats is not None:
            self.stats.observe(name, len(chunks), t)
        if self.last_token_only:
            t = t[:, -1:]
        if self.count_nonfinite and t.is_floating_point() and t.dtype != torch.float16:
            self.nonfinite[name].append(nonfinite_after_cast(t))
        non_blocking = t.device.type == "cuda" and self.device.type == "cpu"
        if non_blocking:
            # Pinned memory lets the copy overlap with the next layer's kernels.
            out = torch.empty(t.shape, dtype=self.dtype, device="cpu", pin_memory=True)
            out.copy_(t, non_blocking=True)
            chunks.append(out)
        else:
            chunks.append(t.to(device=self.device, dtype=self.dtype, copy=True))

    def synchronize(self) -> None:
        """Wait for asynchronous device-to-host copies to land."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def hook_for(self, site: Site) -> Callable[..., None]:
        """Return the hook function that records ``site``."""
        name = site.name
        if site.hook == "input":

            def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                value = args[0] if args else kwargs.get("hidden_states")
                if value is None:
                    raise UnrecordableSiteError(
                        f"site {name}: the module {site.module_path} was called without an "
                        "input tensor to record; capture a site whose module takes one."
                    )
                self.store(name, value)

            return pre_hook

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            self.store(name, _first_tensor(output, site))

        return hook


@contextmanager
def recording(model: nn.Module, recorder: Recorder) -> Iterator[Recorder]:
    """Attach ``recorder``'s hooks to ``model`` for the length of the block.

    Args:
        model: The model whose modules are named by the recorder's sites.
        recorder: What records.

    Yields:
        The recorder, filled by every forward pass run inside the block.
    """
    handles = []
    try:
        for site in recorder.sites:
            # A path lookup, not a walk of the whole module tree: this runs once per batch.
            module = model.get_submodule(site.module_path)
            if site.hook == "input":
                handles.append(
                    module.register_forward_pre_hook(recorder.hook_for(site), with_kwargs=True)
                )
            else:
                handles.append(module.register_forward_hook(recorder.hook_for(site)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
