"""Verification: a run's stored activations against what the model computes for each prompt alone.

A sample is re-checked by reading its stored token ids back from the run (a file or a slice of a
shard, local or at a URL), running the model on that one sequence (no batch, no padding, no
prefix cache), applying the run's token selection and storage dtype, and comparing, per site:

- ``embeddings`` and ``layer_<i>`` (but the last layer) with transformers' own
  ``output_hidden_states``; every other site (the last layer, whose ``hidden_states[-1]`` is after
  the final norm, ``.attn``, ``.mlp``, ``final_norm``, module paths) through a plain forward hook;
- the answer: log-likelihood runs re-score the choices alone and pick the most likely;
  generation runs check, teacher-forced, that every stored answer token is the one greedy decoding
  of the prompt alone picks.

The verdict holds a site when its largest relative difference (per token, the L2 norm of the
difference over the L2 norm of the recomputed vector) is within a tolerance that depends on the
compute dtype, the device and the storage dtype; see :func:`tolerance_for` and
``docs/verification.md`` for the measured spread behind it.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from actcap.bench.questions import LETTERS, Question
from actcap.bench.scoring import _score_texts, _single_token_ids
from actcap.capture.collect import accepts_argument, select_tokens
from actcap.capture.hooks import Recorder, recording
from actcap.capture.sites import Site, resolve_sites
from actcap.errors import FormatError, UnknownNameError
from actcap.models.loading import LoadedModel, parse_dtype
from actcap.storage.durable import atomic_write_bytes
from actcap.storage.float8 import FLOAT8, FLOAT8_DTYPE
from actcap.storage.layout import RESULTS
from actcap.storage.location import PathOrUrl, is_url, join, local_path, read_bytes, url_fs
from actcap.storage.manifest import ManifestEntry
from actcap.storage.reader import ActivationFile
from actcap.storage.runinfo import RunInfo, open_run

DEFAULT_VERIFY_MAX = 8
"""``--verify`` by default re-checks 0.5% of the samples, at least 1 and at most this many."""
DEFAULT_VERIFY_SHARE = 0.005
"""A re-checked sample costs one forward pass of its whole prompt alone, about what a batch of 8
few-shot prompts costs with the shared-prefix cache: 1 in 200 keeps the cost near 2% of the run
(docs/verification.md has the measured figures)."""

COMPUTE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.float16: 3e-2,
    torch.bfloat16: 2.5e-1,
}
"""Largest relative difference (per token) allowed between a batched run and the prompt alone,
by compute dtype: 3 to 240 times the largest measured on CPU (docs/verification.md: 4.2e-6 in
float32, 1.0e-2 in float16, 7.4e-2 in bfloat16), and 80 times or more below what a wrong batching
gives (about 20). The same values are used on GPUs, where they were not measured."""

STORAGE_ULP: dict[torch.dtype, float] = {
    torch.float32: 0.0,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
    torch.float8_e4m3fn: 2.0**-3,
}
"""One unit in the last place of the storage format, relative: two nearly equal values may round
to neighbouring stored numbers."""

ANSWER_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 5e-1,
}
"""A re-computed answer that differs from the stored one is a near tie, not a failure, when the
two choices' (or tokens') log-probabilities are within this much of each other (measured drift of
a choice's log-probability, batched against alone: 1.1e-5, 1.8e-2, 1.6e-1)."""

_PRECISION_ORDER = (torch.float32, torch.float16, torch.bfloat16)


class VerificationWarning(UserWarning):
    """A run's stored activations or answers disagree with the model's own unbatched ones."""


AnswerCheck = Literal["match", "tie", "mismatch", "n/a"]


@dataclass
class SiteCheck:
    """One site of one sample: stored against recomputed."""

    site: str
    """The site name."""
    reference: str
    """How the recomputed value was obtained: ``hidden_states[k]`` or ``hook``."""
    max_abs: float
    """Largest absolute difference of one value."""
    max_rel: float
    """Largest relative difference of one token: ``|stored - ref| / |ref|`` (L2 norms)."""
    nonfinite: int = 0
    """Stored values that are ``inf``/``nan`` where the recomputed ones are finite."""
    problem: str = ""
    """Why the site fails beyond the tolerance (a shape mismatch, a missing site)."""
    ok: bool = True
    """Within the tolerance, same shape, nothing non-finite."""


@dataclass
class SampleCheck:
    """One re-checked sample."""

    id: str
    """The sample (question) id."""
    sites: list[SiteCheck]
    """Per-site comparisons."""
    answer: AnswerCheck
    """``match``, ``tie`` (differs within the answer tolerance), ``mismatch`` or ``n/a``."""
    answer_detail: str = ""
    """What was compared (choices and their log-probabilities, or the first differing token)."""
    answer_drift: float = 0.0
    """Log-likelihood runs: the largest difference of a choice's log-probability, stored against
    recomputed. Generation: the largest margin by which greedy decoding alone prefers another
    token than the stored one (0 when every token is greedy's choice)."""
    ok: bool = True
    """Every site within tolerance and the answer matches (or is a near tie)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return asdict(self)


@dataclass
class Verification:
    """The verdict on a run, from the re-checked samples."""

    passed: bool | None
    """True when everything checked holds, False on any failure, None when nothing was checked."""
    n_checked: int = 0
    """Samples re-checked."""
    n_samples: int = 0
    """Samples in the run."""
    seed: int | None = None
    """Seed of the random choice of samples (None when they were named)."""
    tolerance: float = 0.0
    """Relative tolerance applied to every site."""
    answer_tolerance: float = 0.0
    """Log-probability margin under which a different answer is a near tie."""
    basis: dict[str, str] = field(default_factory=dict)
    """What set the tolerance: compute dtype, device, storage dtype."""
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per site, the largest ``max_abs`` and ``max_rel`` over the checked samples."""
    samples: list[SampleCheck] = field(default_factory=list)
    """Each re-checked sample."""
    problems: list[str] = field(default_factory=list)
    """One line per reason the verdict fails (or why nothing was checked)."""
    seconds: float = 0.0
    """Time spent re-checking."""

    def to_json(self) -> dict[str, Any]:
        """The ``verification`` field of ``results.json``."""
        out = asdict(self)
        out["samples"] = [s.to_json() for s in self.samples]
        return out

    def summary(self) -> str:
        """One line: the verdict, the worst site, the answers."""
        if self.passed is None:
            return f"verification: not run ({'; '.join(self.problems) or 'nothing to check'})"
        worst = max(self.sites.items(), key=lambda kv: kv[1]["max_rel"], default=None)
        worst_text = (
            f"largest relative difference {worst[1]['max_rel']:.2e} at {worst[0]} "
            f"(tolerance {self.tolerance:.1e})"
            if worst
            else "no sites"
        )
        answers = sum(s.answer in ("match", "tie", "n/a") for s in self.samples)
        ties = sum(s.answer == "tie" for s in self.samples)
        head = "passed" if self.passed else "FAILED"
        line = (
            f"verification {head}: {self.n_checked} of {self.n_samples} samples re-checked alone, "
            f"{worst_text}; answers {answers}/{self.n_checked} agree"
            + (f" ({ties} near tie{'s' if ties > 1 else ''})" if ties else "")
        )
        if not self.passed:
            line += ". " + " ".join(self.problems)
        return line


def default_count(n_samples: int) -> int:
    """How many samples ``--verify`` re-checks by default: 0.5% of them, at least 1, at most 8."""
    if n_samples <= 0:
        return 0
    return min(DEFAULT_VERIFY_MAX, max(1, math.ceil(n_samples * DEFAULT_VERIFY_SHARE)))


MATMUL_PRECISION: dict[str, torch.dtype] = {
    "highest": torch.float32,
    "high": torch.float16,
    "medium": torch.bfloat16,
}
"""What float32 matrix products keep at each ``torch.set_float32_matmul_precision``: ``high``
allows TF32 (float16's 10-bit mantissa) and ``medium`` bfloat16."""


def effective_dtype(dtype: torch.dtype, matmul_precision: str) -> torch.dtype:
    """The precision a model of ``dtype`` computes at, given the float32 matmul precision."""
    if dtype == torch.float32:
        return MATMUL_PRECISION.get(matmul_precision, torch.float32)
    return dtype


def compute_record(lm: LoadedModel) -> dict[str, str]:
    """How a run computes, for ``run.json["compute"]``: dtype, device, float32 matmul precision."""
    return {
        "dtype": str(model_dtype(lm)).removeprefix("torch."),
        "device": str(lm.device),
        "matmul_precision": torch.get_float32_matmul_precision(),
    }


def coarsest(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise of some floating dtypes (bfloat16 < float16 < float32)."""
    known = [d for d in dtypes if d in _PRECISION_ORDER]
    return max(known, key=_PRECISION_ORDER.index, default=torch.float32)


def storage_dtype(name: str) -> torch.dtype:
    """A run's storage dtype from its ``run.json`` name (``float8``: e4m3)."""
    if name == FLOAT8:
        return FLOAT8_DTYPE
    return parse_dtype(name) or torch.float32


def tolerance_for(compute: torch.dtype, storage: torch.dtype) -> tuple[float, float]:
    """The site tolerance (relative, per token) and the answer tolerance (log-probability).

    The site tolerance is the compute dtype's allowance for batched against single differences
    plus one unit in the last place of the storage dtype.
    """
    compute = coarsest(compute)
    site = COMPUTE_TOLERANCE[compute] + STORAGE_ULP.get(storage, 0.0)
    return site, ANSWER_TOLERANCE[compute]


def model_dtype(lm: LoadedModel) -> torch.dtype:
    """The dtype the model computes in (its first floating parameter's)."""
    for p in lm.model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# ---------------------------------------------------------------- recomputation


@dataclass(frozen=True)
class _Forward:
    """One sequence's recomputed values."""

    values: dict[str, Tensor]
    """Site to ``(tokens, hidden)`` float32 on the CPU."""
    references: dict[str, str]
    """Site to how it was obtained."""
    logprobs: Tensor
    """``(kept positions, vocab)`` log-probabilities of the last ``keep`` positions."""


def hidden_state_index(site: str, num_layers: int) -> int | None:
    """The index into ``output_hidden_states`` equal to a site, or None when there is none.

    ``embeddings`` is ``hidden_states[0]`` and ``layer_<i>`` is ``hidden_states[i + 1]``, except
    the last layer: transformers returns it after the final norm.
    """
    if site == "embeddings":
        return 0
    if site.startswith("layer_") and site[6:].isdigit():
        index = int(site[6:])
        return index + 1 if index < num_layers - 1 else None
    return None


@torch.inference_mode()
def recompute(lm: LoadedModel, ids: Tensor, sites: Sequence[Site], keep: int) -> _Forward:
    """Run the model on one sequence alone and collect every site and the last logits.

    Args:
        lm: The model.
        ids: ``(tokens,)`` token ids.
        sites: The sites to collect.
        keep: Positions at the end whose log-probabilities are returned.
    """
    n = lm.layout.num_layers
    hooked = [s for s in sites if hidden_state_index(s.name, n) is None]
    recorder = Recorder(hooked, dtype=torch.float32, device="cpu")
    recorder.batch_size = 1
    kwargs: dict[str, Any] = {
        "input_ids": ids.reshape(1, -1).to(lm.device),
        "output_hidden_states": True,
        "use_cache": False,
    }
    if keep > 0 and accepts_argument(lm.model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep  # a long answer's logits over the vocabulary add up
    with recording(lm.model, recorder):
        out = lm.model(**kwargs)
        recorder.synchronize()
    values: dict[str, Tensor] = {}
    references: dict[str, str] = {}
    for s in sites:
        k = hidden_state_index(s.name, n)
        if k is None:
            values[s.name] = recorder.chunks[s.name][0][0]
            references[s.name] = "hook"
        else:
            values[s.name] = out.hidden_states[k][0].detach().float().cpu()
            references[s.name] = f"hidden_states[{k}]"
    logits = out.logits[0, -keep:].float() if keep > 0 else out.logits[0, :0].float()
    return _Forward(values, references, torch.log_softmax(logits, dim=-1).cpu())


def compare_site(
    name: str,
    stored: Tensor,
    recomputed: Tensor,
    reference: str,
    tolerance: float,
    exact: Tensor | None = None,
) -> SiteCheck:
    """Compare one stored site with its recomputed value (both already selected and cast).

    ``exact`` is the recomputed value before the cast to the storage dtype: a stored inf/nan
    where it is finite is a value the storage dtype could not hold (or a corrupt one).
    """
    if stored.shape != recomputed.shape:
        return SiteCheck(
            name,
            reference,
            math.inf,
            math.inf,
            problem=f"shape {tuple(stored.shape)} stored, {tuple(recomputed.shape)} recomputed",
            ok=False,
        )
    a, b = stored.float(), recomputed.float()
    bad = ~torch.isfinite(a) & torch.isfinite(exact.float() if exact is not None else b)
    nonfinite = int(bad.sum())
    both = torch.isfinite(a) & torch.isfinite(b)
    diff = torch.where(both, (a - b).abs(), torch.zeros_like(a))
    rows_a = torch.where(both, a, b).reshape(-1, a.shape[-1]) if a.dim() else a.reshape(1, 1)
    rows_b = b.reshape(-1, b.shape[-1]) if b.dim() else b.reshape(1, 1)
    num = torch.linalg.vector_norm(rows_a - rows_b, dim=-1)
    den = torch.linalg.vector_norm(torch.nan_to_num(rows_b), dim=-1)
    rel = torch.where(den > 0, num / den.clamp_min(1e-30), num)
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float(rel.max()) if rel.numel() else 0.0
    problem = ""
    if nonfinite:
        problem = f"{nonfinite} stored values are inf/nan where the model's are finite"
    ok = max_rel <= tolerance and not nonfinite
    return SiteCheck(name, reference, max_abs, max_rel, nonfinite, problem, ok)


@dataclass(frozen=True)
class RunSetup:
    """What verification needs to know of a run, read once from ``run.json``."""

    selection: str
    """Token selection."""
    storage: torch.dtype
    """Storage dtype."""
    capture_generated: bool
    """Whether stored activations cover the generated tokens."""
    choice_format: str
    """Log-likelihood of letters or of choice texts."""
    compute: torch.dtype
    """The coarsest of the run's compute dtype (when recorded) and the verifying model's."""


def run_setup(config: Mapping[str, Any], lm: LoadedModel) -> RunSetup:
    """Read the capture options of a run.

    Raises:
        FormatError: When the run captured nothing (there is nothing to verify).
    """
    capture = config.get("capture")
    if not isinstance(capture, dict):
        raise FormatError("this run captured no activations (--no-capture): nothing to verify.")
    options = config.get("options") or {}
    dtypes = [effective_dtype(model_dtype(lm), torch.get_float32_matmul_precision())]
    recorded = config.get("compute")
    if isinstance(recorded, dict) and isinstance(recorded.get("dtype"), str):
        try:
            dtype = parse_dtype(recorded["dtype"].removeprefix("torch.")) or torch.float32
        except UnknownNameError:
            dtype = torch.float32
        dtypes.append(effective_dtype(dtype, str(recorded.get("matmul_precision", "highest"))))
    return RunSetup(
        selection=str(capture.get("token_selection", "all")),
        storage=storage_dtype(str(capture.get("dtype", "float32"))),
        capture_generated=bool(capture.get("capture_generated", False)),
        choice_format=str(options.get("choice_format", "letter")),
        compute=coarsest(*dtypes),
    )


def _ids(f: ActivationFile, name: str) -> Tensor | None:
    return f.get(name).long() if name in f.names else None


@torch.inference_mode()
def check_sample(
    lm: LoadedModel,
    entry: ManifestEntry,
    source: Any,
    setup: RunSetup,
    tolerance: float,
    answer_tolerance: float,
) -> SampleCheck:
    """Re-check one sample: its sites and its answer.

    Raises:
        FormatError: When its file is unreadable or holds no ``input_ids``.
    """
    with ActivationFile(source) as f:
        input_ids = _ids(f, "input_ids")
        output_ids = _ids(f, "output_ids")
        if input_ids is None:
            raise FormatError(f"{f.label}: no input_ids stored, so the sample cannot be re-run.")
        stored = {name: f.get(name) for name in f.sites}
        selection = f.meta.token_selection or setup.selection
    generated = output_ids if output_ids is not None and output_ids.numel() else None
    fed = input_ids if generated is None else torch.cat([input_ids, generated[:-1]])
    rows = len(fed) if (setup.capture_generated and generated is not None) else len(input_ids)
    keep = len(generated) if generated is not None else 1
    sites = resolve_sites(lm.model, lm.layout, list(stored)) if stored else []
    forward = recompute(lm, fed, sites, keep)
    checks = []
    for name, value in stored.items():
        exact_rows = forward.values[name][:rows]
        ref = select_tokens(exact_rows.to(value.dtype), selection)  # type: ignore[arg-type]
        exact = select_tokens(exact_rows, selection)  # type: ignore[arg-type]
        checks.append(compare_site(name, value, ref, forward.references[name], tolerance, exact))
    answer, detail, drift = _check_answer(
        lm, entry, forward.logprobs, generated, setup, answer_tolerance
    )
    ok = all(c.ok for c in checks) and answer != "mismatch"
    return SampleCheck(entry.id, checks, answer, detail, drift, ok)


def _check_answer(
    lm: LoadedModel,
    entry: ManifestEntry,
    logprobs: Tensor,
    generated: Tensor | None,
    setup: RunSetup,
    answer_tolerance: float,
) -> tuple[AnswerCheck, str, float]:
    record = entry.record
    mode = record.get("mode")
    if mode == "generate":
        if generated is None:
            return "n/a", "no answer tokens stored", 0.0
        return _check_generated(logprobs, generated, answer_tolerance)
    if mode == "loglik":
        return _check_choices(lm, record, logprobs, setup, answer_tolerance)
    return "n/a", f"answering mode {mode!r} is not re-checked", 0.0


def _check_generated(
    logprobs: Tensor, generated: Tensor, answer_tolerance: float
) -> tuple[AnswerCheck, str, float]:
    """Teacher-forced greedy check: each stored token is the argmax after the ones before it.

    Equivalent to greedy re-generation from the prompt alone giving the stored answer, in one
    forward pass, and it tells a near tie from a real difference.
    """
    best = logprobs.argmax(dim=-1)
    verdict: AnswerCheck = "match"
    detail = f"{len(generated)} generated tokens are each greedy's choice alone"
    drift = 0.0
    for j, (want, got) in enumerate(zip(generated.tolist(), best.tolist(), strict=True)):
        if want == got:
            continue
        gap = float(logprobs[j, got] - logprobs[j, want])
        drift = max(drift, gap)
        if gap > answer_tolerance:
            return (
                "mismatch",
                f"token {j}: stored {want}, greedy alone picks {got} "
                f"(log-probability higher by {gap:.3g})",
                drift,
            )
        verdict, detail = "tie", f"token {j}: a near tie ({gap:.2g}) between {want} and {got}"
    return verdict, detail, drift


def _check_choices(
    lm: LoadedModel,
    record: Mapping[str, Any],
    logprobs: Tensor,
    setup: RunSetup,
    answer_tolerance: float,
) -> tuple[AnswerCheck, str, float]:
    """Re-score the choices alone and compare the pick and the log-probabilities."""
    stored_scores = record.get("choice_logprobs") or []
    choices = record.get("choices") or []
    n = len(stored_scores) or len(choices)
    if n == 0:
        return "n/a", "no choices recorded", 0.0
    letter_ids = (
        _single_token_ids(lm, [f" {LETTERS[i]}" for i in range(n)])
        if setup.choice_format == "letter"
        else None
    )
    if letter_ids is not None:
        scores = [float(logprobs[-1, t]) for t in letter_ids]
    else:
        q = Question(
            str(record.get("id", "")),
            str(record.get("question", "")),
            str(record.get("reference", "")),
            tuple(str(c) for c in choices) or tuple(LETTERS[:n]),
        )
        scores = _score_texts(lm, str(record.get("prompt", "")), q, setup.choice_format, 1)  # type: ignore[arg-type]
    picked = max(range(n), key=scores.__getitem__)
    stored_pick = str(record.get("response", ""))
    stored_index = LETTERS.index(stored_pick) if stored_pick in LETTERS[:n] else -1
    drift = max((abs(a - b) for a, b in zip(scores, stored_scores, strict=False)), default=0.0)
    detail = (
        f"alone picks {LETTERS[picked]}, the run stored {stored_pick or '?'}; "
        f"largest log-probability difference {drift:.2e}"
    )
    if picked == stored_index:
        return "match", detail, drift
    if stored_index >= 0 and scores[picked] - scores[stored_index] <= answer_tolerance:
        return "tie", detail, drift
    return "mismatch", detail, drift


# ---------------------------------------------------------------- runs


def choose_samples(
    info: RunInfo, n: int, sample_ids: Sequence[str] | None, seed: int | None
) -> tuple[list[tuple[ManifestEntry, Any]], int | None]:
    """The samples to re-check: the named ones, or ``n`` at random with a recorded seed.

    Raises:
        UnknownNameError: For a named sample the run does not have (or has no activations for).
    """
    available = list(info.sample_paths())
    if sample_ids:
        by_id = {e.id: (e, s) for e, s in available}
        missing = [i for i in sample_ids if i not in by_id]
        if missing:
            shown = ", ".join(list(by_id)[:5])
            raise UnknownNameError(
                f"{info.root}: no activations for sample(s) {', '.join(missing)} in this run "
                f"({len(by_id)} samples: {shown}, ...). Pass ids from its manifest.jsonl."
            )
        return [by_id[i] for i in dict.fromkeys(sample_ids)], None
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)
    picked = rng.sample(available, min(n, len(available)))
    return picked, seed


def nonfinite_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Values stored as inf/nan by the cast to the storage dtype, over a run's manifest records.

    Returns None when no record reports any.
    """
    per_site: dict[str, int] = {}
    samples = 0
    for r in records:
        counts = r.get("nonfinite")
        if not isinstance(counts, dict) or not counts:
            continue
        samples += 1
        for site, count in counts.items():
            per_site[str(site)] = per_site.get(str(site), 0) + int(count)
    if not per_site:
        return None
    return {"values": sum(per_site.values()), "samples": samples, "sites": per_site}


def nonfinite_message(summary: Mapping[str, Any], dtype: str) -> str:
    """The warning for values the storage dtype could not hold."""
    sites = summary["sites"]
    worst = sorted(sites.items(), key=lambda kv: -kv[1])[:3]
    listed = ", ".join(f"{s} ({c:,})" for s, c in worst)
    return (
        f"{summary['values']:,} activation values in {summary['samples']} sample(s) were stored "
        f"as inf/nan: {dtype} cannot hold them (largest finite float16 value: 65,504). "
        f"Sites: {listed}{', ...' if len(sites) > 3 else ''}. Re-run with --dtype bfloat16 "
        "(float32's range) or float32."
    )


def verify_run(
    run: PathOrUrl | RunInfo,
    lm: LoadedModel,
    *,
    n: int | None = None,
    sample_ids: Sequence[str] | None = None,
    seed: int | None = None,
    tolerance: float | None = None,
) -> Verification:
    """Re-check samples of a finished run against the model run on each prompt alone.

    Args:
        run: A run directory or URL (files or shards), or a run already opened.
        lm: The run's model (loaded anew, on any device).
        n: How many samples to re-check at random; None: :func:`default_count`.
        sample_ids: Re-check exactly these samples instead.
        seed: Seed of the random choice (a fresh one, recorded, when None).
        tolerance: Override the relative site tolerance.

    Returns:
        The verdict, per site and per sample.

    Raises:
        FormatError: The run is unreadable, or captured nothing.
        UnknownNameError: A named sample is not in the run.
    """
    t0 = time.perf_counter()
    info = run if isinstance(run, RunInfo) else open_run(run)
    setup = run_setup(info.config, lm)
    site_tol, answer_tol = tolerance_for(setup.compute, setup.storage)
    if tolerance is not None:
        site_tol = tolerance
    count = default_count(len(info.entries)) if n is None else n
    picked, used_seed = choose_samples(info, count, sample_ids, seed)
    result = Verification(
        passed=None,
        n_samples=len(info.entries),
        seed=used_seed,
        tolerance=site_tol,
        answer_tolerance=answer_tol,
        basis={
            "compute_dtype": str(setup.compute).removeprefix("torch."),
            "storage_dtype": str(setup.storage).removeprefix("torch."),
            "device": lm.device.type,
            "model": lm.display_name,
        },
    )
    for entry, source in picked:
        try:
            check = check_sample(lm, entry, source, setup, site_tol, answer_tol)
        except FormatError as e:  # what the run stored cannot be read back: that fails too
            check = SampleCheck(entry.id, [], "n/a", f"unreadable: {e}", ok=False)
        result.samples.append(check)
        for s in check.sites:
            agg = result.sites.setdefault(s.site, {"max_abs": 0.0, "max_rel": 0.0})
            agg["max_abs"] = max(agg["max_abs"], s.max_abs)
            agg["max_rel"] = max(agg["max_rel"], s.max_rel)
    result.n_checked = len(result.samples)
    result.problems = _problems(result, info, setup)
    if result.n_checked:
        result.passed = not result.problems
    elif not result.problems:
        result.problems = ["the run has no samples with activations"]
    else:
        result.passed = False
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _problems(result: Verification, info: RunInfo, setup: RunSetup) -> list[str]:
    out = []
    for s in result.samples:
        for c in s.sites:
            if not c.ok:
                why = c.problem or f"relative difference {c.max_rel:.2e} > {result.tolerance:.1e}"
                out.append(f"sample {s.id!r} site {c.site}: {why}.")
        if s.answer == "mismatch":
            out.append(f"sample {s.id!r}: answer differs when re-run alone ({s.answer_detail}).")
        elif not s.ok and not s.sites:
            out.append(f"sample {s.id!r}: {s.answer_detail}")
    summary = nonfinite_summary([e.record for e in info.entries])
    if summary is not None:
        out.append(nonfinite_message(summary, str(setup.storage).removeprefix("torch.")))
    return out


def verify_after_run(
    lm: LoadedModel, root: PathOrUrl | None, count: int | None, n_samples: int
) -> dict[str, Any] | None:
    """The ``verification`` field of a run just finished (``--verify``), warning when it fails.

    Args:
        lm: The run's model.
        root: The run directory or URL (None: nothing was stored, nothing is verified).
        count: ``--verify N``; None picks :func:`default_count`; 0 turns it off.
        n_samples: Finished samples in the run (for the default count).
    """
    if root is None or count == 0:
        return None
    n = default_count(n_samples) if count is None else count
    try:
        result = verify_run(root, lm, n=n)
    except Exception as e:  # the run is finished and stays so: report, never lose results.json
        message = f"verification could not run ({type(e).__name__}: {e})"
        warnings.warn(message, VerificationWarning, stacklevel=3)
        return {"passed": None, "problems": [message]}
    if result.passed is False:
        warnings.warn(result.summary(), VerificationWarning, stacklevel=3)
    return result.to_json()


def record_verification(root: PathOrUrl, verification: Mapping[str, Any]) -> str | None:
    """Write a verification into the run's ``results.json`` (when the run has one).

    Returns:
        The file written, or None when the run has no ``results.json`` (unfinished).

    Raises:
        FormatError: When ``results.json`` is unreadable or not an object (left as it is).
    """
    text = str(root)
    target = join(text, RESULTS)
    try:
        raw = read_bytes(target)
    except FormatError:
        return None
    try:
        results = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{target}: unreadable ({e}); the verdict was not recorded.") from e
    if not isinstance(results, dict):
        raise FormatError(f"{target}: not a JSON object; the verdict was not recorded.")
    results["verification"] = dict(verification)
    data = json.dumps(results, indent=2, ensure_ascii=False).encode()
    if is_url(text):
        fs, path = url_fs(target)
        fs.pipe_file(path, data)
    else:
        atomic_write_bytes(local_path(target), data)
    return target


__all__ = [
    "SampleCheck",
    "SiteCheck",
    "Verification",
    "VerificationWarning",
    "check_sample",
    "default_count",
    "nonfinite_summary",
    "record_verification",
    "tolerance_for",
    "verify_after_run",
    "verification_from_json",
    "verify_run",
]


def verification_from_json(data: Mapping[str, Any]) -> Verification:
    """Rebuild a :class:`Verification` from its ``results.json`` form."""
    names = {f for f in Verification.__dataclass_fields__ if f != "samples"}
    samples = [
        SampleCheck(
            id=str(s.get("id", "")),
            sites=[SiteCheck(**c) for c in s.get("sites", [])],
            answer=s.get("answer", "n/a"),
            answer_detail=str(s.get("answer_detail", "")),
            answer_drift=float(s.get("answer_drift", 0.0)),
            ok=bool(s.get("ok", True)),
        )
        for s in data.get("samples") or []
    ]
    return Verification(**{k: v for k, v in data.items() if k in names}, samples=samples)
