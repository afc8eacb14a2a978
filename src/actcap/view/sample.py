"""One question of a run: its record, its tokens, its token-by-layer statistics and logit lens.

Each function opens the one sample it is asked about through :class:`actcap.storage.ActivationFile`
and reads its sites one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from actcap.analysis import compare_files, logit_lens
from actcap.errors import ActcapError, IncompatibleInputsError, UnknownNameError
from actcap.storage import ActivationFile
from actcap.storage.names import is_residual_site
from actcap.view.model import ModelHolder
from actcap.view.runs import BadRequest, RunView

STATS = ("norm", "proj")
"""Heatmap statistics: the residual's L2 norm, or its projection on a direction."""
HIDDEN_FIELDS = ("file", "offset", "length")
"""Manifest fields the question view leaves out (where the bytes are, not what they say)."""
LENS_TOP = 5


def finite(values: Iterable[float]) -> list[float | None]:
    """Numbers for JSON: six significant digits, NaN and infinities as null."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None for v in values]


def is_layer_site(site: str) -> bool:
    """``embeddings`` or ``layer_<i>``: a site of the residual stream."""
    return is_residual_site(site)


def layer_sites(sites: Sequence[str]) -> list[str]:
    """The residual-stream sites, in network order; every site when a file has none of them."""
    residual = [s for s in sites if is_layer_site(s)]
    return residual or list(sites)


def _ids(f: ActivationFile, name: str) -> list[int]:
    return [int(i) for i in f.get(name).reshape(-1).tolist()] if name in f.names else []


def _token_rows(f: ActivationFile, sites: list[str]) -> tuple[int, list[int] | None, int]:
    """Rows of the heatmap, the token id of each (None when they cannot be matched), prompt length.

    A reduced file (``last``/``mean``) has one row and no ids.
    """
    if not sites:
        return 0, None, 0
    shape = f.shape(sites[0])
    if len(shape) < 2:
        return 1, None, 0
    prompt, output = _ids(f, "input_ids"), _ids(f, "output_ids")
    n = shape[0]
    if output and len(prompt) < n <= len(prompt) + len(output):
        # --capture-generated: the answer's tokens follow the prompt's; the last answer token,
        # never read back by the model, usually has no activations.
        return n, (prompt + output)[:n], len(prompt)
    if n == len(prompt):
        return n, prompt, n
    return n, None, n


def token_texts(ids: Sequence[int], holder: ModelHolder | None) -> list[str] | None:
    """Each token id decoded alone with the run's tokenizer (None: no model, or not yet loaded).

    A model still loading is not waited for: the page asks again once it has loaded.
    """
    lm = holder.peek() if holder is not None and ids else None
    if lm is None:
        return None
    return [str(t) for t in lm.tokenizer.batch_decode([[i] for i in ids])]


def sample_detail(view: RunView, sample_id: str, holder: ModelHolder | None) -> dict[str, Any]:
    """A question's manifest record, its sites and its tokens (decoded when a model is there).

    Raises:
        UnknownNameError: When the run has no such sample.
        FormatError: When its activations are unreadable or lie outside the run.
    """
    entry = view.entry(sample_id)
    record = {k: v for k, v in entry.record.items() if k not in HIDDEN_FIELDS}
    out: dict[str, Any] = {
        "id": entry.id,
        "record": record,
        "correct": entry.correct,
        "captured": bool(entry.file),
        "sites": [],
        "layer_sites": [],
        "tokens": [],
        "token_selection": None,
        "decoded": False,
        "model": holder.status() if holder is not None else None,
    }
    if not entry.file:
        return out
    with ActivationFile(view.source(sample_id)) as f:
        sites = layer_sites(f.sites)
        n, ids, n_prompt = _token_rows(f, sites)
        selection = f.meta.token_selection
        out.update(sites=f.sites, layer_sites=sites, token_selection=selection, dtype=f.meta.dtype)
    texts = token_texts(ids, holder) if ids is not None else None
    if ids is None:
        label = selection if n == 1 else "position"
        out["tokens"] = [
            {"pos": i, "id": None, "text": f"{label} {i}" if n > 1 else label, "generated": False}
            for i in range(n)
        ]
    else:
        out["tokens"] = [
            {
                "pos": i,
                "id": tid,
                "text": texts[i] if texts is not None else None,
                "generated": i >= n_prompt,
            }
            for i, tid in enumerate(ids)
        ]
        out["decoded"] = texts is not None
    return out


def heatmap(
    view: RunView, sample_id: str, stat: str, direction: np.ndarray | None = None
) -> dict[str, Any]:
    """A token-by-layer statistic of one question, and its last token's value per layer.

    Args:
        view: The run.
        sample_id: The question.
        stat: ``norm`` (L2 norm of each token's residual) or ``proj`` (its projection on the
            unit vector ``direction``).
        direction: For ``proj``: a unit vector of the sites' width.

    Raises:
        BadRequest: For an unknown statistic, or ``proj`` without a direction.
        UnknownNameError, NoActivationsError, FormatError: As :meth:`RunView.source`.
    """
    if stat not in STATS:
        raise BadRequest(f"stat {stat!r} is unknown; use one of {', '.join(STATS)}.")
    if stat == "proj" and direction is None:
        raise BadRequest("stat 'proj' needs a direction (a layer).")
    d = torch.from_numpy(direction).float() if direction is not None else None
    values: list[list[float | None] | None] = []
    with ActivationFile(view.source(sample_id)) as f:
        sites = layer_sites(f.sites)
        for site in sites:
            t = f.get(site).float()
            t = t.reshape(1, -1) if t.dim() == 1 else t.reshape(t.shape[0], -1)
            if d is None:
                row = torch.linalg.vector_norm(t, dim=-1)
            elif t.shape[-1] != d.shape[0]:
                values.append(None)  # another width: no projection on this direction
                continue
            else:
                row = t @ d
            values.append(finite(row.tolist()))
    line = [None if v is None else v[-1] for v in values]
    return {"id": sample_id, "stat": stat, "sites": sites, "values": values, "line": line}


def lens(view: RunView, sample_id: str, token: int, holder: ModelHolder) -> dict[str, Any]:
    """The logit lens of one token of a question: the top tokens each layer predicts.

    Returns ``{"available": False, "message": ...}`` when no model can be loaded.

    Raises:
        ActcapError: When the position is out of range or the model does not fit the file.
    """
    try:
        lm = holder.get()
    except ActcapError as e:
        return {"available": False, "message": str(e)}
    source = view.source(sample_id)
    with holder.use_lock:
        rows = logit_lens(source, model=lm, token=token, k=LENS_TOP)
    return {
        "available": True,
        "id": sample_id,
        "token": token,
        "rows": [
            {"site": r.site, "tokens": list(r.tokens), "probs": finite(r.probs)} for r in rows
        ],
    }


def cosine_by_layer(a: Any, b: Any) -> dict[str, Any]:
    """Per-layer cosine between two samples (files or shard slices): last token and mean.

    Raises:
        ActcapError: When they share no site, or their widths differ (two different models).
    """
    with ActivationFile(a) as fa, ActivationFile(b) as fb:
        shared = [s for s in layer_sites(fa.sites) if s in fb.sites]
        odd = next((s for s in shared if fa.shape(s)[-1] != fb.shape(s)[-1]), None)
        if odd is not None:
            raise IncompatibleInputsError(
                f"site {odd} has width {fa.shape(odd)[-1]} in one sample and {fb.shape(odd)[-1]} "
                "in the other: a cosine needs vectors of one model's width."
            )
    if not shared:
        raise IncompatibleInputsError(
            "the two samples share no site; compare samples captured at the same sites."
        )
    rows = [c for c in compare_files(a, b) if c.site in shared]
    return {
        "sites": [c.site for c in rows],
        "last": finite(c.last_token for c in rows),
        "mean": finite(c.mean_tokens for c in rows),
    }


def check_site(site: str, sites: Sequence[str]) -> str:
    """``site`` when it is one of ``sites``.

    Raises:
        UnknownNameError: Naming the sites there are.
    """
    if site not in sites:
        raise UnknownNameError(f"no site {site!r} here; sites: {', '.join(sites)}.")
    return site
