"""``ActcapLM``: an lm-evaluation-harness model backed by actcap, capturing activations.

Registered in lm-eval's model registry as ``actcap``. It tokenises exactly as lm-eval's ``hf``
model does (the same context/continuation split, the same special tokens, the same truncation,
the same generation settings and stop strings), so its per-document answers are ``hf``'s, and it
answers in batches with actcap's engine (:mod:`actcap.lm_eval.engine`): one pass per context for
all of a document's continuations, a batch's shared few-shot prefix run once.

Each lm-eval document becomes one sample of a run directory, id ``<task>/<doc_id>``, written as
soon as its batch is answered; once lm-eval has scored the documents, :meth:`ActcapLM.finish`
adds the per-document metrics to the manifest and writes ``results.json``
(:mod:`actcap.lm_eval.rundir`). Importing this module wraps ``lm_eval.simple_evaluate`` so that
this happens by itself (:func:`install_finish_hook`).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm.auto import tqdm

from actcap.capture import CaptureSpec, resolve_sites, select_tokens
from actcap.errors import BenchmarkError, RunError, UnknownNameError
from actcap.lm_eval import engine, records
from actcap.lm_eval.rundir import LmEvalRun, close_quietly
from actcap.models import LoadedModel, load_model
from actcap.storage import utc_now
from actcap.storage.layout import SHARD_BYTES, resolve_storage
from actcap.storage.location import is_url

logger = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 8
IGNORED_ARGUMENTS = frozenset({"max_batch_size", "trust_remote_code", "parallelize"})
"""Arguments lm-eval hands every model that mean nothing here."""
Encoded = dict[int, tuple[list[int], list[int]]]
"""A document's requests by lm-eval index: context and continuation token ids."""


@dataclass
class _Doc:
    """One lm-eval document: its requests (positions in the call's list), answered together."""

    task: str
    doc_id: int
    positions: list[int] = field(default_factory=list)

    @property
    def id(self) -> str:
        return records.sample_id(self.task, self.doc_id)


def _group(requests: Sequence[Instance]) -> list[_Doc]:
    """Requests by document, in the order documents first appear."""
    docs: dict[tuple[str, int], _Doc] = {}
    for i, req in enumerate(requests):
        task = req.task_name or "task"
        doc_id = req.doc_id if req.doc_id is not None else i
        docs.setdefault((task, doc_id), _Doc(task, doc_id)).positions.append(i)
    return list(docs.values())


def _by_index(doc: _Doc, requests: Sequence[Instance]) -> dict[int, Instance]:
    """A document's distinct requests by lm-eval index (repeats share one)."""
    return {
        requests[p].idx: requests[p] for p in sorted(doc.positions, key=lambda p: requests[p].idx)
    }


def _layer_request(layers: Any) -> Any:
    """``layers`` as lm-eval's argument parser hands it over: ``all``, ``5``, ``0-3``, ``0|5``."""
    if layers is None or (isinstance(layers, str) and layers.strip() == "all"):
        return None
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, str):
        return layers.replace("|", ",")  # --model_args separates arguments with commas
    return layers


def _batch_size(value: Any) -> int:
    """``batch_size`` from lm-eval: an int, a digit string, or ``auto`` (8 here).

    Raises:
        UnknownNameError: For anything else.
    """
    text = str(value).strip()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text.startswith("auto"):
        return DEFAULT_BATCH_SIZE
    raise UnknownNameError(f"batch_size={value!r}: use a whole number of at least 1.")


def _device(device: str | None) -> str:
    """The device to load on; lm-eval's default ``cuda:0`` means auto where no such GPU is (as ``hf``)."""
    if device is None:
        return "auto"
    head, _, index = device.partition(":")
    if head == "cuda" and index.isdigit() and int(index) >= torch.cuda.device_count():
        logger.info("No device %s here; choosing one (auto).", device)
        return "auto"
    return device


def _capture_spec(
    layers: Any, sites: Any, token_selection: str, dtype: str, capture_generated: bool
) -> CaptureSpec:
    kinds = tuple(sites.split("|") if isinstance(sites, str) else sites)
    return CaptureSpec(
        layers=_layer_request(layers),
        kinds=kinds,  # type: ignore[arg-type]
        token_selection=token_selection,  # type: ignore[arg-type]
        dtype=str(dtype),
        capture_generated=bool(capture_generated),
    )


_OPEN: set[ActcapLM] = set()
"""Models with an open run directory, which the ``simple_evaluate`` wrapper finishes. Held
strongly: a model made by name inside ``simple_evaluate`` is referenced nowhere else."""


@register_model("actcap")
class ActcapLM(TemplateLM):  # type: ignore[misc]
    """An lm-eval model that answers with actcap's engine and stores each document's activations.

    Example:
        >>> import lm_eval
        >>> from actcap.lm_eval import ActcapLM
        >>> lm = ActcapLM("default", capture_dir="runs/x", layers="all")
        >>> lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

    From lm-eval's command line (``actcap lm-eval``) the same arguments go in ``--model_args``:
    ``pretrained=default,capture_dir=runs/x,layers=all``.
    """

    def __init__(
        self,
        pretrained: str | LoadedModel = "default",
        capture_dir: str | os.PathLike[str] | None = None,
        layers: Any = None,
        sites: str | Sequence[str] = "resid",
        token_selection: str = "all",
        dtype: str = "float32",
        capture_generated: bool = False,
        capture: bool = True,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        device: str | None = None,
        model_dtype: str | None = None,
        storage: str = "auto",
        shard_bytes: int = SHARD_BYTES,
        resume: bool = False,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        prefix_cache: bool = True,
        progress: bool = True,
        benchmark: str | None = None,
        options: Mapping[str, Any] | None = None,
        n_docs: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Load the model and describe the capture; the run directory opens at the first request.

        Args:
            pretrained: ``"default"``, a hub id, a model folder, a ``.gguf`` file, or a loaded
                model (:class:`~actcap.models.LoadedModel`).
            capture_dir: The run directory (a local folder); None stores nothing.
            layers: Layers to capture: ``"all"``/None, ``"0-3"``, ``5``, ``"0|5|-1"`` (``|`` for
                ``,`` inside ``--model_args``), or a list.
            sites: Which sites of each layer: ``resid``, ``attn``, ``mlp`` (``|``-separated).
            token_selection: ``all``, ``last`` or ``mean`` of the context's tokens.
            dtype: Storage dtype of the activations (the weights' is ``model_dtype``).
            capture_generated: Also capture the generated tokens (``generate_until``).
            capture: False writes the manifest only (answers, metrics), no activations.
            batch_size: Documents (contexts) per forward pass; ``auto`` means 8.
            device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
            model_dtype: Weights dtype; the checkpoint's own when None.
            storage: ``files``, ``shards`` or ``auto``.
            shard_bytes: Shard size with ``storage="shards"``.
            resume: Continue a run with finished documents (answered from their records).
            max_length: The length lm-eval truncates inputs to; as ``hf`` finds it when None.
            add_bos_token: As ``hf``'s: force the tokenizer's special tokens on or off.
            prefix_token_id: As ``hf``'s: the token standing for an empty context.
            prefix_cache: Run a batch's shared few-shot prefix once (answers unchanged).
            progress: A progress bar per request type.
            benchmark: The run's benchmark name (``actcap eval --task`` sets it); else
                ``lm-eval:`` and the tasks of the first request.
            options: Settings recorded in ``run.json`` and checked on resume.
            n_docs: Documents expected (chooses the storage layout under ``auto``).
            **kwargs: lm-eval's other model arguments; ``max_batch_size`` and the like are
                ignored, anything else is refused.

        Raises:
            UnknownNameError: For an argument ActcapLM does not know, or a bad capture option.
            RunError: For a ``capture_dir`` that is a URL.
            ModelLoadError: When the model cannot be loaded.
        """
        super().__init__()
        unknown = sorted(set(kwargs) - IGNORED_ARGUMENTS)
        if unknown:
            params = inspect.signature(type(self).__init__).parameters
            known = ", ".join(p for p in params if p not in ("self", "kwargs"))
            raise UnknownNameError(
                f"ActcapLM: unknown argument(s) {', '.join(unknown)}. Known: {known}."
            )
        if capture_dir is not None and is_url(os.fspath(capture_dir)):
            raise RunError(
                f"{os.fspath(capture_dir)}: lm-eval runs are written to a local folder (the "
                "manifest is rewritten with the metrics once lm-eval has scored the documents)."
            )
        self.spec = _capture_spec(layers, sites, token_selection, dtype, capture_generated)
        self.lm = (
            pretrained
            if isinstance(pretrained, LoadedModel)
            else load_model(pretrained, device=_device(device), dtype=model_dtype)
        )
        self.tokenizer = self.lm.tokenizer
        self.capture_dir = os.fspath(capture_dir) if capture_dir is not None else None
        self.capture = bool(capture) and self.capture_dir is not None
        self.sites = (
            resolve_sites(self.lm.model, self.lm.layout, self.spec.layers, self.spec.kinds)
            if self.capture
            else []
        )
        self._batch_size = _batch_size(batch_size or DEFAULT_BATCH_SIZE)
        self.storage = storage
        self.shard_bytes = int(shard_bytes)
        self.resume = bool(resume)
        self._max_length = int(max_length) if max_length else None
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.prefix_cache = bool(prefix_cache)
        self.progress = bool(progress)
        self.benchmark = benchmark
        self.options = {**dict(options or {}), "model_dtype": model_dtype}
        self.n_docs = n_docs
        self._run: LmEvalRun | None = None
        self._opened = False
        self._finalizer: Any = None
        self.results: dict[str, Any] | None = None
        """What the last :meth:`finish` wrote to ``results.json``."""

    # ---- what lm-eval asks of a model, answered as ``hf`` answers it

    @property
    def eot_token_id(self) -> int:
        """End of text: the tokenizer's EOS."""
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token standing for an empty context: BOS, else EOS."""
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        """The longest input: the config's, then the tokenizer's, then 2048."""
        if self._max_length:
            return self._max_length
        return int(resolve_max_length(self.lm.model.config, self.tokenizer))

    @property
    def max_gen_toks(self) -> int:
        """Tokens generated when a task sets no limit."""
        return 256

    @property
    def batch_size(self) -> int:
        """Documents per forward pass."""
        return self._batch_size

    @property
    def device(self) -> torch.device:
        """Where inputs go."""
        return self.lm.device

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name, for lm-eval's request cache."""
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids; no special tokens before a text that starts with BOS already."""
        special: dict[str, bool] = {}
        if add_special_tokens is not None:
            special["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            special["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        ids: list[int] = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """A chat history in the model's chat template."""
        return str(
            self.tokenizer.apply_chat_template(
                chat_history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )
        )

    def _loglikelihood_tokens(self, requests: Any, **kwargs: Any) -> list[tuple[float, bool]]:
        """Score ``((context, continuation), context_ids, continuation_ids)`` without capture."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            part = requests[start : start + self.batch_size]
            rows = engine.score_contexts(
                self.lm,
                [list(ctx) for _, ctx, _ in part],
                [[list(cont)] for _, _, cont in part],
                self.spec,
                [],
                prefix_cache=self.prefix_cache,
            )
            out.extend(r.scores[0] for r in rows)
        return out

    # ---- loglikelihood

    def _encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as read (the context cut on the left to fit).

        Raises:
            BenchmarkError: For a continuation of no token, or longer than the model's context.
        """
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            ctx = [self.prefix_token_id]
            if cont and cont[0] == self.prefix_token_id:
                ctx, cont = cont[:1], cont[1:]
        else:
            ctx, cont = self._encode_pair(context, continuation)
        if not cont or len(cont) > self.max_length:
            raise BenchmarkError(
                f"Continuation {continuation[:80]!r} has {len(cont)} tokens; lm-eval scores "
                f"continuations of 1 to {self.max_length} tokens (the model's context)."
            )
        whole = (ctx + cont)[-(self.max_length + 1) :]
        return whole[: len(whole) - len(cont)], cont

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation: one pass per distinct context of a document."""
        t0 = time.perf_counter()
        run = self._open(requests)
        answers: list[Any] = [None] * len(requests)
        todo: list[tuple[_Doc, Encoded]] = []
        for doc in _group(requests):
            if not self._answer_from_run(doc, requests, answers, "loglikelihood"):
                reqs = _by_index(doc, requests)
                todo.append((doc, {i: self._encode_request(*r.args) for i, r in reqs.items()}))
        # Documents of one task with similar contexts together: less padding, shared prefixes.
        todo.sort(key=lambda d: (d[0].task, -len(next(iter(d[1].values()))[0])))
        with self._bar(len(todo), "loglikelihood", disable_tqdm) as bar:
            for batch in self._batches(todo):
                self._score_batch(batch, requests, answers, run)
                bar.update(len(batch))
        if run is not None:
            run.timed(t0)
        return answers

    def _batches(self, todo: list[tuple[_Doc, Encoded]]) -> list[list[tuple[_Doc, Encoded]]]:
        """Consecutive documents whose distinct contexts fill at most a batch (one at least)."""
        out: list[list[tuple[_Doc, Encoded]]] = []
        used = 0
        for item in todo:
            n = len({tuple(ctx) for ctx, _ in item[1].values()})
            if out and used + n <= self.batch_size:
                out[-1].append(item)
                used += n
            else:
                out.append([item])
                used = n
        return out

    def _score_batch(
        self,
        batch: list[tuple[_Doc, Encoded]],
        requests: Sequence[Instance],
        answers: list[Any],
        run: LmEvalRun | None,
    ) -> None:
        """Score a batch of documents, each distinct context once, and write each document."""
        row_of: dict[tuple[int, ...], int] = {}
        contexts: list[list[int]] = []
        conts: list[list[list[int]]] = []
        places: list[list[tuple[int, int]]] = []  # per document, per request: row, continuation
        for _, encoded in batch:
            mine = []
            for ctx, cont in encoded.values():
                row = row_of.setdefault(tuple(ctx), len(contexts))
                if row == len(contexts):
                    contexts.append(ctx)
                    conts.append([])
                mine.append((row, len(conts[row])))
                conts[row].append(cont)
            places.append(mine)
        scored = engine.score_contexts(
            self.lm, contexts, conts, self.spec, self.sites, prefix_cache=self.prefix_cache
        )
        for (doc, encoded), mine in zip(batch, places, strict=True):
            results = dict(zip(encoded, (scored[r].scores[j] for r, j in mine), strict=True))
            for p in doc.positions:
                answers[p] = results[requests[p].idx]
            if run is not None:
                first = scored[mine[0][0]]
                record = self._loglikelihood_record(doc, requests, list(results.values()), first)
                run.submit(doc.id, record, first, record["response"])

    def _loglikelihood_record(
        self,
        doc: _Doc,
        requests: Sequence[Instance],
        results: list[tuple[float, bool]],
        row: engine.Row,
    ) -> dict[str, Any]:
        reqs = list(_by_index(doc, requests).values())
        contexts = [str(r.args[0]) for r in reqs]
        continuations = [str(r.args[1]) for r in reqs]
        record = records.base_record(doc.task, doc.doc_id, "loglikelihood", contexts[0])
        if len(set(contexts)) > 1:
            record["contexts"] = contexts
        best = max(range(len(results)), key=lambda k: results[k][0])
        record.update(
            {
                "continuations": continuations,
                "loglikelihoods": [[ll, greedy] for ll, greedy in results],
                "response": continuations[best].strip(),
                "n_prompt_tokens": int(row.input_ids.numel()),
                "n_output_tokens": 0,
            }
        )
        return record

    # ---- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generated text per request; batches grouped and sorted as ``hf`` does, stops cut."""
        t0 = time.perf_counter()
        run = self._open(requests)
        answers: list[Any] = [None] * len(requests)
        docs = [
            d
            for d in _group(requests)
            if not self._answer_from_run(d, requests, answers, "generate_until")
        ]
        doc_of = {p: d for d in docs for p in d.positions}
        left = {d.id: len(d.positions) for d in docs}
        rows: dict[int, tuple[engine.GeneratedRow, int]] = {}
        with self._bar(len(doc_of), "generate_until", disable_tqdm) as bar:
            for chunk in self._generation_batches(list(doc_of), requests):
                for p, (text, row, kept) in zip(
                    chunk, self._generate(chunk, requests), strict=True
                ):
                    answers[p], rows[p] = text, (row, kept)
                    doc = doc_of[p]
                    left[doc.id] -= 1
                    if left[doc.id] == 0 and run is not None:
                        record, output = self._generation_record(doc, requests, answers, rows)
                        run.submit(
                            doc.id,
                            record,
                            rows[doc.positions[0]][0],
                            str(record["response"]),
                            output,
                        )
                bar.update(len(chunk))
        if run is not None:
            run.timed(t0)
        return answers

    def _generation_batches(self, todo: list[int], requests: Sequence[Instance]) -> list[list[int]]:
        """Requests with equal generation settings, longest first, cut into batches (as ``hf``)."""
        groups: dict[str, list[int]] = {}
        for p in todo:
            key = json.dumps(records.plain(requests[p].args[1]), sort_keys=True)
            groups.setdefault(key, []).append(p)
        out = []
        for group in groups.values():
            group.sort(
                key=lambda p: (-len(self.tok_encode(requests[p].args[0])), requests[p].args[0])
            )
            out += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        return out

    def _generate(
        self, chunk: list[int], requests: Sequence[Instance]
    ) -> list[tuple[str, engine.GeneratedRow, int]]:
        """One batch of generation requests sharing their settings: text, row, answer tokens.

        Raises:
            BenchmarkError: When the tokens to generate leave no room for a prompt.
        """
        kwargs = dict(normalize_gen_kwargs(dict(requests[chunk[0]].args[1]), self.max_gen_toks))
        until = handle_stop_sequences(
            kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False)
        )
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        room = self.max_length - max_gen_toks
        if room <= 0:
            raise BenchmarkError(
                f"max_gen_toks={max_gen_toks} leaves no room for a prompt in this model's "
                f"context of {self.max_length} tokens; ask for fewer new tokens."
            )
        ids, mask = self._batch_encode([str(requests[p].args[0]) for p in chunk], room)
        kwargs.setdefault("max_length", ids.shape[1] + max_gen_toks)
        if kwargs.setdefault("temperature", 0.0) == 0.0 and kwargs.get("do_sample") is None:
            kwargs["do_sample"] = False
        if kwargs.get("do_sample") is False and kwargs["temperature"] == 0.0:
            kwargs.pop("temperature")
        kwargs.update(
            stopping_criteria=stop_sequences_criteria(
                self.tokenizer, until, ids.shape[1], ids.shape[0]
            ),
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        kept = functools.partial(self._kept_length, until=until)
        rows = engine.generate_rows(self.lm, ids, mask, self.spec, self.sites, kwargs, kept)
        return [
            (
                postprocess_generated_text(self.tok_decode(row.output_ids), until, None),
                row,
                kept(row.output_ids),
            )
            for row in rows
        ]

    def _batch_encode(self, contexts: list[str], room: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask of a batch, cut on the left to ``room`` tokens."""
        special: dict[str, bool] = {}
        if has_bos_prefix(contexts[0], getattr(self.tokenizer, "bos_token", None)):
            special["add_special_tokens"] = False
        elif self.add_bos_token is not None:
            special["add_special_tokens"] = self.add_bos_token
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            batch = self.tokenizer(contexts, padding="longest", return_tensors="pt", **special)
        finally:
            self.tokenizer.padding_side = side
        ids, mask = batch["input_ids"][:, -room:], batch["attention_mask"][:, -room:]
        return ids.to(self.device), mask.to(self.device)

    def _kept_length(self, generated: Sequence[int], until: Sequence[str]) -> int:
        """Generated tokens up to the one that ends the answer (a stop token or a stop string).

        The first stop string is found by bisection over decoded prefixes (a prefix that holds
        one stays holding it as it grows), so a row costs a few decodes, not one per token.
        """
        stops = {self.eot_token_id, *self.lm.stop_ids}
        end = next((k + 1 for k, t in enumerate(generated) if t in stops), len(generated))

        def stopped(k: int) -> bool:
            text = self.tok_decode(generated[:k])
            return any(s and s in text for s in until)

        if not stopped(end):
            return end
        lo, hi = 1, end  # stopped(hi) holds
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if stopped(mid) else (mid + 1, hi)
        return hi

    def _generation_record(
        self,
        doc: _Doc,
        requests: Sequence[Instance],
        answers: Sequence[Any],
        rows: Mapping[int, tuple[engine.GeneratedRow, int]],
    ) -> tuple[dict[str, Any], torch.Tensor]:
        first = doc.positions[0]
        row, kept = rows[first]
        record = records.base_record(
            doc.task, doc.doc_id, "generate_until", str(requests[first].args[0])
        )
        record.update(
            {
                "gen_kwargs": records.plain(requests[first].args[1]),
                "generations": [answers[p] for p in doc.positions],
                "response": answers[first],
                "n_prompt_tokens": int(row.input_ids.numel()),
                "n_output_tokens": kept,
            }
        )
        return record, torch.tensor(row.output_ids[:kept], dtype=torch.long)

    # ---- rolling log-likelihood

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-likelihood of whole texts, in the model's context's disjoint windows (as ``hf``)."""
        t0 = time.perf_counter()
        run = self._open(requests)
        answers: list[Any] = [None] * len(requests)
        docs = [
            d
            for d in _group(requests)
            if not self._answer_from_run(d, requests, answers, "loglikelihood_rolling")
        ]
        with self._bar(len(docs), "loglikelihood_rolling", disable_tqdm) as bar:
            for doc in docs:
                reqs = _by_index(doc, requests)
                totals: dict[int, float] = {}
                parts: list[engine.Row] = []
                for n, (idx, req) in enumerate(reqs.items()):
                    totals[idx], rows = self._rolling(str(req.args[0]))
                    parts += rows if n == 0 else []
                for p in doc.positions:
                    answers[p] = totals[requests[p].idx]
                if run is not None:
                    text = str(next(iter(reqs.values())).args[0])
                    record, row = self._rolling_record(doc, text, list(totals.values()), parts)
                    run.submit(doc.id, record, row, "")
                bar.update(1)
        if run is not None:
            run.timed(t0)
        return answers

    def _rolling(self, text: str) -> tuple[float, list[engine.Row]]:
        """One text's log-likelihood over its windows, and each window's activations."""
        windows = [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
        ]
        total, rows = 0.0, []
        for start in range(0, len(windows), self.batch_size):
            for ll, row in engine.score_windows(
                self.lm, windows[start : start + self.batch_size], self.spec, self.sites
            ):
                total += ll
                rows.append(row)
        return total, rows

    def _rolling_record(
        self, doc: _Doc, text: str, totals: list[float], parts: list[engine.Row]
    ) -> tuple[dict[str, Any], engine.Row]:
        ids = torch.cat([p.input_ids for p in parts])
        names = parts[0].activations if parts else {}
        acts = {
            name: select_tokens(
                torch.cat([p.activations[name] for p in parts]), self.spec.token_selection
            )
            for name in names
        }
        record = records.base_record(doc.task, doc.doc_id, "loglikelihood_rolling", text)
        record.update(
            {
                "loglikelihoods": totals,
                "response": "",
                "n_prompt_tokens": int(ids.numel()),
                "n_output_tokens": 0,
            }
        )
        return record, engine.Row(ids, acts)

    # ---- the run directory

    def _config(self, requests: Sequence[Instance]) -> dict[str, Any]:
        """What ``run.json`` records: the keys of actcap's own runs."""
        from actcap.bench.runner import versions

        tasks = sorted({r.task_name or "task" for r in requests})
        options = {
            "max_length": self.max_length,
            "add_bos_token": self.add_bos_token,
            "prefix_token_id": self.custom_prefix_token_id,
            "batch_size": self.batch_size,
            "prefix_cache": self.prefix_cache,
            **self.options,
        }
        dtype = str(next(self.lm.model.parameters()).dtype).removeprefix("torch.")
        return {
            "model": self.lm.display_name,
            "model_source": self.lm.source,
            "benchmark": self.benchmark or "lm-eval:" + ",".join(tasks),
            "n_questions": self.n_docs,
            "capture": self.spec.to_json() if self.capture else None,
            "sites": [s.name for s in self.sites],
            "options": options,
            "storage": resolve_storage(self.storage, self.n_docs or 0, self.capture_dir),
            "started": utc_now(),
            "versions": {**versions(), "lm_eval": records.lm_eval_version()},
            "compute": {"dtype": dtype, "device": str(self.lm.device)},
        }

    def _open(self, requests: Sequence[Instance]) -> LmEvalRun | None:
        """The run directory, opened (and locked) at the first request; None without one."""
        if self.capture_dir is None:
            return None
        if self._run is None:
            self._run = LmEvalRun(
                self.capture_dir,
                self._config(requests),
                resume=self.resume or self._opened,  # this model's own run, reopened
                capture=self.spec if self.capture else None,
                model_name=self.lm.display_name,
                shard_bytes=self.shard_bytes,
            )
            self._opened = True
            self._finalizer = weakref.finalize(self, close_quietly, self._run)
            _OPEN.add(self)
        return self._run

    def _answer_from_run(
        self, doc: _Doc, requests: Sequence[Instance], answers: list[Any], kind: str
    ) -> bool:
        """Answer a document finished in an earlier session from its record; False if not done.

        Raises:
            RunError: When the record was answered for other requests than these.
        """
        record = self._run.done(doc.id) if self._run is not None else None
        if record is None:
            return False
        root = self._run.root if self._run is not None else ""
        if kind == "generate_until":
            first = requests[doc.positions[0]]
            records.check_resumed(
                record,
                root,
                [str(first.args[0])],
                {"gen_kwargs": first.args[1]},
                ("generations", len(doc.positions)),
            )
            for p, text in zip(doc.positions, record["generations"], strict=True):
                answers[p] = str(text)
            return True
        reqs = _by_index(doc, requests)
        contexts = [str(r.args[0]) for r in reqs.values()]
        expected = (
            {"continuations": [str(r.args[1]) for r in reqs.values()]}
            if kind == "loglikelihood"
            else {}
        )
        records.check_resumed(record, root, contexts, expected, ("loglikelihoods", len(reqs)))
        stored = dict(zip(reqs, record["loglikelihoods"], strict=True))
        for p in doc.positions:
            value = stored[requests[p].idx]
            answers[p] = (
                (float(value[0]), bool(value[1])) if kind == "loglikelihood" else float(value)
            )
        return True

    def _bar(self, total: int, kind: str, disable: bool) -> Any:
        return tqdm(
            total=total,
            desc=f"lm-eval {kind}",
            unit="doc",
            dynamic_ncols=True,
            disable=disable or not self.progress or total == 0,
        )

    # ---- after scoring

    def finish(
        self, results: Mapping[str, Any] | None, tasks: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Add lm-eval's per-document metrics to the run, write ``results.json``, close the run.

        The ``simple_evaluate`` wrapper calls this (:func:`install_finish_hook`); call it
        yourself after ``lm_eval.evaluate``.

        Args:
            results: What ``simple_evaluate(..., log_samples=True)`` returned.
            tasks: lm-eval's tasks by name, to record each document's question text.

        Returns:
            What ``results.json`` now holds; None without a run directory or without results.
        """
        run = self._run
        if run is None:
            return None
        try:
            if results is None:
                return None
            self.results = run.finish(results, _doc_text(tasks))
            return self.results
        finally:
            self.close()

    def close(self) -> None:
        """Write what is queued and release the run directory (a later request reopens it)."""
        run, self._run = self._run, None
        _OPEN.discard(self)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if run is not None:
            run.close()


def _doc_text(tasks: Mapping[str, Any] | None) -> Callable[[str, Any], str | None] | None:
    """``(task, doc) -> question`` from lm-eval's tasks (their ``doc_to_text``)."""
    if not tasks:
        return None

    def text(name: str, doc: Any) -> str | None:
        task = tasks.get(name)
        if task is None or doc is None:
            return None
        try:
            value = task.doc_to_text(doc)
        except Exception:  # noqa: BLE001 - a task's own template failing: no question text
            return None
        return value if isinstance(value, str) else str(value)

    return text


def install_finish_hook() -> None:
    """Wrap ``lm_eval.simple_evaluate`` so that :class:`ActcapLM` runs get their metrics.

    With an ActcapLM (or ``model="actcap"``), the wrapper asks lm-eval for per-document samples
    (``log_samples=True``), calls :meth:`ActcapLM.finish` on every model with an open run, and
    leaves the samples out of what it returns unless the caller asked for them. Other models
    pass through untouched. Installing twice is harmless.
    """
    import lm_eval.evaluator as evaluator

    original = evaluator.simple_evaluate
    if getattr(original, "_actcap_finishes", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def simple_evaluate(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        model = bound.arguments.get("model")
        if not (isinstance(model, ActcapLM) or model == "actcap"):
            return original(*args, **kwargs)
        wanted = bound.arguments.get("log_samples", True)
        bound.arguments["log_samples"] = True
        try:
            results = original(*bound.args, **bound.kwargs)
        except BaseException:
            for lm in list(_OPEN):
                lm.close()
            raise
        for lm in list(_OPEN):
            lm.finish(results)
        if results is not None and not wanted:
            results.pop("samples", None)
        return results

    simple_evaluate._actcap_finishes = True  # type: ignore[attr-defined]
    evaluator.simple_evaluate = simple_evaluate


install_finish_hook()
