"""Running statistics over every token at a site, accumulated on the model's device.

:class:`SiteStats` takes each batch's ``(batch, seq, hidden)`` activation with a mask of the real
tokens (padding and anything else not to count is ``False``) and keeps, with tensor operations
only (no host synchronisation per batch):

- ``count``: tokens seen;
- ``mean`` and ``m2`` per dimension (variance = ``m2 / count``, the population variance), merged
  batch by batch with Chan et al.'s parallel update in float64 (float32 on devices without
  float64, such as Apple's MPS), each batch's own mean and squared deviations computed in two
  passes, so the result matches a two-pass computation over all the tokens to float tolerance;
- ``max_abs`` per dimension;
- ``norm_sum``: the sum of the token vectors' L2 norms (the mean norm is ``norm_sum / count``);
- ``norm_hist``: how many token vectors have an L2 norm in each bin of :data:`NORM_EDGES`;
- the ``k`` largest activations by magnitude: signed value, sample index, token position and
  dimension.

Two accumulators of one site merge exactly (:meth:`SiteStats.merge`), so Ray workers and a
resumed run's sessions combine. A non-finite activation (inf/nan) makes the mean, variance and
max-abs of its dimension non-finite, as numpy would; its norm counts in the last bin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from actcap.storage.stats_file import (
    DEFAULT_TOP_K,
    N_NORM_BINS,
    NORM_EDGES,
    STATS_FILE,
    TENSOR_NAMES,
    StatsContents,
)

__all__ = [
    "DEFAULT_TOP_K",
    "NORM_EDGES",
    "N_NORM_BINS",
    "TENSOR_NAMES",
    "ChunkPlan",
    "SiteStats",
    "StatsCollector",
    "accumulate_dtype",
    "from_file",
    "merge_files",
]


def accumulate_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it, else float32."""
    return torch.float32 if device.type == "mps" else torch.float64


class SiteStats:
    """Running per-dimension statistics of one site's activations (see the module docstring)."""

    def __init__(
        self,
        hidden: int,
        device: str | torch.device = "cpu",
        k: int = DEFAULT_TOP_K,
    ) -> None:
        """An empty accumulator for vectors of size ``hidden`` on ``device``."""
        self.device = torch.device(device)
        self.dtype = accumulate_dtype(self.device)
        self.hidden = hidden
        self.k = k
        kw: dict[str, Any] = {"device": self.device}
        self.count = torch.zeros((), dtype=torch.int64, **kw)
        self.mean = torch.zeros(hidden, dtype=self.dtype, **kw)
        self.m2 = torch.zeros(hidden, dtype=self.dtype, **kw)
        self.max_abs = torch.zeros(hidden, dtype=self.dtype, **kw)
        self.norm_hist = torch.zeros(N_NORM_BINS, dtype=torch.int64, **kw)
        self.norm_sum = torch.zeros((), dtype=self.dtype, **kw)
        self.top_value = torch.zeros(0, dtype=self.dtype, **kw)
        self.top_sample = torch.zeros(0, dtype=torch.int64, **kw)
        self.top_position = torch.zeros(0, dtype=torch.int64, **kw)
        self.top_dim = torch.zeros(0, dtype=torch.int64, **kw)
        self._edges = torch.tensor(NORM_EDGES, dtype=self.dtype, device=self.device)

    def update(
        self,
        x: Tensor,
        mask: Tensor,
        samples: Tensor,
        positions: Tensor | None = None,
    ) -> None:
        """Add the tokens of ``x`` where ``mask`` is true.

        Args:
            x: ``(batch, seq, hidden)`` activations.
            mask: ``(batch, seq)``, true for the tokens to count.
            samples: ``(batch,)`` int, each row's sample index (recorded with the top activations).
            positions: ``(batch, seq)`` int, each token's position in its sample; by default its
                rank among the row's counted tokens (right for left padding).
        """
        x = x.detach().to(self.device)
        mask = mask.to(self.device).bool()
        if positions is None:
            positions = mask.long().cumsum(-1) - 1
        xd = x.to(self.dtype)
        w = mask.to(self.dtype).unsqueeze(-1)  # (batch, seq, 1)
        n_b = mask.sum(dtype=torch.int64)
        n_bf = n_b.to(self.dtype)
        # Masked-out tokens are zeroed before any product, so their (possibly nan) values never count.
        xz = torch.where(w.bool(), xd, 0)
        mean_b = xz.sum(dim=(0, 1)) / n_bf.clamp(min=1)
        m2_b = (torch.where(w.bool(), xd - mean_b, 0) ** 2).sum(dim=(0, 1))
        self._merge_moments(n_b, mean_b, m2_b)
        self.max_abs = torch.maximum(self.max_abs, xz.abs().amax(dim=(0, 1)))
        norms = xz.norm(dim=-1)  # (batch, seq)
        self.norm_sum = self.norm_sum + norms.sum()
        bins = torch.bucketize(norms, self._edges, right=True)
        bins = torch.where(torch.isnan(norms), N_NORM_BINS - 1, bins)
        self.norm_hist.scatter_add_(0, bins.flatten(), mask.flatten().long())
        self._update_top(xd, mask, samples.to(self.device), positions.to(self.device))

    def _merge_moments(self, n_b: Tensor, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = self.count.to(self.dtype)
        n_bf = n_b.to(self.dtype)
        total = (n_a + n_bf).clamp(min=1)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_bf / total)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_bf / total)
        self.count = self.count + n_b

    def _update_top(self, xd: Tensor, mask: Tensor, samples: Tensor, positions: Tensor) -> None:
        batch, seq, hidden = xd.shape
        magnitude = torch.where(mask.unsqueeze(-1), xd.abs(), -1).flatten()
        k = min(self.k, magnitude.numel())
        _, flat = magnitude.topk(k)
        row, rest = flat // (seq * hidden), flat % (seq * hidden)
        tok, dim = rest // hidden, rest % hidden
        # Entries from masked tokens (only when fewer than k counted) are dropped at the merge.
        value = torch.where(mask[row, tok], xd[row, tok, dim], torch.nan)
        self._merge_top(value, samples[row], positions[row, tok], dim)

    def _merge_top(self, value: Tensor, sample: Tensor, position: Tensor, dim: Tensor) -> None:
        values = torch.cat([self.top_value, value])
        samples = torch.cat([self.top_sample, sample])
        positions = torch.cat([self.top_position, position])
        dims = torch.cat([self.top_dim, dim])
        magnitude = torch.nan_to_num(values.abs(), nan=-1.0, posinf=torch.inf)
        order = magnitude.argsort(descending=True, stable=True)[: self.k]
        keep = order[magnitude[order] >= 0] if values.device.type == "cpu" else order
        self.top_value = values[keep]
        self.top_sample = samples[keep]
        self.top_position = positions[keep]
        self.top_dim = dims[keep]

    def merge(self, other: SiteStats) -> SiteStats:
        """Fold ``other`` (the same site, another worker or session) into this one; returns self."""
        if other.hidden != self.hidden:
            raise ValueError(f"Cannot merge statistics of width {other.hidden} into {self.hidden}.")
        o = other.to(self.device)
        self._merge_moments(o.count, o.mean.to(self.dtype), o.m2.to(self.dtype))
        self.max_abs = torch.maximum(self.max_abs, o.max_abs.to(self.dtype))
        self.norm_hist = self.norm_hist + o.norm_hist
        self.norm_sum = self.norm_sum + o.norm_sum.to(self.dtype)
        self._merge_top(o.top_value.to(self.dtype), o.top_sample, o.top_position, o.top_dim)
        return self

    def to(self, device: str | torch.device) -> SiteStats:
        """A copy on ``device`` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return SiteStats.from_tensors(self.to_tensors(), device=device, k=self.k)

    @property
    def variance(self) -> Tensor:
        """Population variance per dimension (``m2 / count``)."""
        return self.m2 / self.count.to(self.dtype).clamp(min=1)

    def finished(self) -> SiteStats:
        """A CPU copy with the padding entries of the top list dropped (for storage and display)."""
        t = {name: v.cpu() for name, v in self.to_tensors().items()}
        out = SiteStats.from_tensors(t, device="cpu", k=self.k)
        out._merge_top(out.top_value[:0], out.top_sample[:0], out.top_position[:0], out.top_dim[:0])
        return out

    def to_tensors(self) -> dict[str, Tensor]:
        """The state as named tensors (see :data:`TENSOR_NAMES`); ``count`` is shape ``(1,)``."""
        return {
            "count": self.count.reshape(1),
            "mean": self.mean,
            "m2": self.m2,
            "max_abs": self.max_abs,
            "norm_hist": self.norm_hist,
            "norm_sum": self.norm_sum.reshape(1),
            "top_value": self.top_value,
            "top_sample": self.top_sample,
            "top_position": self.top_position,
            "top_dim": self.top_dim,
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], device: str | torch.device = "cpu", k: int | None = None
    ) -> SiteStats:
        """Rebuild an accumulator from :meth:`to_tensors`'s output."""
        missing = [n for n in TENSOR_NAMES if n not in tensors]
        if missing:
            raise KeyError(f"statistics tensors missing: {', '.join(missing)}")
        hidden = int(tensors["mean"].shape[0])
        out = cls(hidden, device=device, k=k if k is not None else DEFAULT_TOP_K)
        out.count = tensors["count"].to(out.device, torch.int64).reshape(())
        out.norm_sum = tensors["norm_sum"].to(out.device, out.dtype).reshape(())
        for name in ("mean", "m2", "max_abs", "top_value"):
            setattr(out, name, tensors[name].to(out.device, out.dtype))
        for name in ("norm_hist", "top_sample", "top_position", "top_dim"):
            setattr(out, name, tensors[name].to(out.device, torch.int64))
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest: count, mean norm of the mean vector, top dims, the largest values."""
        s = self.finished()
        top_dims = s.max_abs.argsort(descending=True)[:8].tolist()
        return {
            "count": int(s.count),
            "mean_norm": float(s.norm_sum / max(int(s.count), 1)),
            "mean_vector_norm": float(s.mean.norm()),
            "mean_std": float(s.variance.sqrt().mean()),
            "top_dims_by_max_abs": [[d, float(s.max_abs[d])] for d in top_dims],
            "largest": [
                {
                    "value": float(s.top_value[i]),
                    "sample": int(s.top_sample[i]),
                    "position": int(s.top_position[i]),
                    "dim": int(s.top_dim[i]),
                }
                for i in range(len(s.top_value))
            ],
            "norm_hist": s.norm_hist.tolist(),
        }


@dataclass
class ChunkPlan:
    """Which tokens of one recorded chunk count, and whose they are.

    A chunk is a site's ``(rows, seq, hidden)`` activation of one forward pass in a batch.
    """

    mask: Tensor
    """``(batch, seq)`` bool: the tokens to count."""
    samples: Tensor
    """``(batch,)`` int: each row's sample index."""
    positions: Tensor | None = None
    """``(batch, seq)`` int: each token's position in its sample (default: rank among counted)."""
    shared: bool = False
    """The chunk has one row shared by every sample of the batch (a common prefix run once): it
    counts once per sample, as if each prompt had been run alone."""


class StatsCollector:
    """The :class:`SiteStats` of a run's statistics sites, fed by the capture hooks.

    Before each forward pass the caller sets :attr:`plans` (one :class:`ChunkPlan` per chunk
    index: 0 = the first forward of the batch). Chunks without a plan (generation's decode
    steps) are held until :meth:`finish_generated` knows how many tokens each sample read.
    Sample indices count the samples in the order they are fed (:meth:`new_samples`);
    :attr:`sample_names` gives each a name when the caller knows one (a question id).
    """

    def __init__(self, sites: Sequence[str], k: int = DEFAULT_TOP_K) -> None:
        """Collect statistics of ``sites`` (site names)."""
        self.sites = frozenset(sites)
        self.k = k
        self.stats: dict[str, SiteStats] = {}
        self.sample_names: list[str] = []
        self.n_samples = 0
        """The next sample index."""
        self.counted = 0
        """Samples counted, earlier sessions' included."""
        self.plans: list[ChunkPlan] = []
        self._held: dict[str, list[Tensor]] = {}
        self.earlier: dict[str, SiteStats] = {}
        """Statistics of other workers (or files), merged in by :meth:`finished`."""
        self.resumed: dict[str, SiteStats] = {}
        """Statistics of the run's earlier sessions (:meth:`resume_from`)."""
        self.restarted: str | None = None
        """Why the earlier sessions' statistics were discarded (:meth:`discard_resumed`)."""
        self._resumed_count = 0
        self._resumed_names: list[str] | None = []
        self._absorbed_names: list[str] | None = []
        self._fed: list[int] = []

    def absorb(self, contents: StatsContents) -> None:
        """Merge in statistics gathered elsewhere (a Ray worker's batch, a file)."""
        self._take(contents, self.earlier)
        if self._absorbed_names is not None and contents.counted is not None:
            self._absorbed_names.extend(contents.counted)
        else:
            self._absorbed_names = None

    def resume_from(self, contents: StatsContents) -> None:
        """Start from the statistics of the run's earlier sessions (a run's file)."""
        self._take(contents, self.resumed)
        self._resumed_count += contents.n_samples
        self._resumed_names = contents.counted

    def discard_resumed(self, reason: str) -> None:
        """Drop the earlier sessions' statistics (they restart with this session), saying why."""
        self.resumed = {}
        self.counted -= self._resumed_count
        self._resumed_count = 0
        self._resumed_names = []
        self.restarted = reason

    def _take(self, contents: StatsContents, into: dict[str, SiteStats]) -> None:
        offset = len(self.sample_names)
        for name, s in from_file(contents.sites, k=self.k).items():
            s.top_sample = s.top_sample + offset
            prior = into.get(name)
            into[name] = prior.merge(s) if prior is not None else s
        self.sample_names.extend(contents.samples)
        # Samples fed later are numbered after every name known so far.
        self.n_samples = max(self.n_samples, len(self.sample_names))
        self.counted += contents.n_samples

    def to_file(self) -> StatsContents:
        """Per site its tensors, and the ids of the samples the largest activations refer to.

        ``top_sample`` is renumbered to index that list.
        """
        finished = self.finished()
        used = sorted({int(i) for s in finished.values() for i in s.top_sample.tolist()})
        renumber = {old: new for new, old in enumerate(used)}
        out: dict[str, dict[str, Tensor]] = {}
        for name, s in finished.items():
            s.top_sample = torch.tensor([renumber[int(i)] for i in s.top_sample.tolist()])
            out[name] = s.to_tensors()
        return StatsContents(out, [self.name_of(i) for i in used], self.counted, self.counted_ids())

    def counted_ids(self) -> list[str] | None:
        """The ids of every sample counted (None when a file merged in did not list its own)."""
        if self._resumed_names is None or self._absorbed_names is None:
            return None
        fed = [self.name_of(i) for i in self._fed]
        return [*self._resumed_names, *self._absorbed_names, *fed]

    def new_samples(self, n: int, device: str | torch.device = "cpu") -> Tensor:
        """Indices for the next ``n`` samples fed, on ``device``."""
        out = torch.arange(self.n_samples, self.n_samples + n, device=device)
        self._fed.extend(range(self.n_samples, self.n_samples + n))
        self.n_samples += n
        self.counted += n
        return out

    def begin_batch(self, plans: Sequence[ChunkPlan]) -> None:
        """Start a batch: the plans of its chunks, and nothing held from an earlier one."""
        self.plans = list(plans)
        self._held = {}

    def site(self, name: str, hidden: int, device: torch.device) -> SiteStats:
        """The accumulator of ``name`` (created on first use, on ``device``)."""
        if name not in self.stats:
            self.stats[name] = SiteStats(hidden, device=device, k=self.k)
        return self.stats[name]

    def observe(self, name: str, chunk_index: int, t: Tensor) -> None:
        """Feed chunk ``chunk_index`` of site ``name`` (``(rows, seq, hidden)``)."""
        if name not in self.sites:
            return
        if chunk_index >= len(self.plans):
            self._held.setdefault(name, []).append(t.detach())
            return
        plan = self.plans[chunk_index]
        if plan.shared:
            t = t.expand(plan.mask.shape[0], -1, -1)
        self.site(name, t.shape[-1], t.device).update(t, plan.mask, plan.samples, plan.positions)

    def finish_generated(self, prompt_lengths: Tensor, generated_lengths: Sequence[int]) -> None:
        """Count the held decode steps of the batch.

        Step ``k`` (chunk ``k``) belongs to a sample that generated at least ``k + 1`` tokens,
        at position ``prompt_length + k - 1`` (after its prompt).
        """
        held, self._held = self._held, {}
        plan = self.plans[0]
        for name, steps in held.items():
            x = torch.cat(steps, dim=1)  # (batch, steps, hidden)
            k = torch.arange(1, x.shape[1] + 1, device=x.device)
            gen = torch.as_tensor(list(generated_lengths), device=x.device)
            mask = k[None, :] < gen[:, None]
            positions = prompt_lengths.to(x.device)[:, None] + k[None, :] - 1
            self.site(name, x.shape[-1], x.device).update(x, mask, plan.samples, positions)

    def finished(self) -> dict[str, SiteStats]:
        """Every site's statistics on the CPU, ready to store."""
        out = {name: s.finished() for name, s in self.stats.items()}
        for name, s in self.earlier.items():
            out[name] = s.finished().merge(out[name]) if name in out else s.finished()
        wrong = [n for n, s in self.resumed.items() if n in out and out[n].hidden != s.hidden]
        if wrong:
            self.discard_resumed(
                f"{STATS_FILE} holds {wrong[0]} of width {self.resumed[wrong[0]].hidden}, this "
                f"run's is {out[wrong[0]].hidden}"
            )
        for name, s in self.resumed.items():
            out[name] = s.finished().merge(out[name]) if name in out else s.finished()
        return dict(sorted(out.items()))

    def name_of(self, index: int) -> str:
        """The name of sample ``index`` (its position when none was given)."""
        return self.sample_names[index] if index < len(self.sample_names) else str(index)


def from_file(
    sites: Mapping[str, Mapping[str, Tensor]], k: int = DEFAULT_TOP_K
) -> dict[str, SiteStats]:
    """Accumulators from a statistics file's tensors (see :meth:`StatsCollector.to_file`)."""
    return {name: SiteStats.from_tensors(t, k=k) for name, t in sites.items()}


def merge_files(parts: Sequence[StatsContents]) -> StatsContents:
    """One statistics file's contents from several (Ray workers' or sessions'), merged exactly."""
    collector = StatsCollector([])
    for part in parts:
        collector.absorb(part)
    return collector.to_file()
