"""A run's config (``run.json``): what a resume may change, and the record a new run writes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from actcap.errors import FormatError, RunError
from actcap.storage.format import FORMAT_VERSION
from actcap.storage.layout import RUN_FILE, RUN_MARKER
from actcap.storage.location import PathOrUrl, exists, join, read_bytes

FREE_OPTIONS = frozenset(
    {"batch_size", "limit", "sort_by_length", "prefix_cache", "background_write", "share_prefixes"}
)
"""Options a resume may change: they select questions or set speed, never change an answer."""

_LABELS = {
    "model": "--model",
    "model_id": "--model (the model it resolves to)",
    "questions_digest": "the question set (the benchmark file or its --field mapping)",
    "benchmark": "--benchmark",
    "capture": "capture (--no-capture)",
    "sites": "the site list",
    "layers": "--layers",
    "kinds": "--sites",
    "token_selection": "--token-selection",
    "dtype": "--dtype",
    "capture_generated": "--capture-generated",
    "few_shot": "--few-shot",
    "mode": "--mode",
    "grader": "--grader",
    "choice_format": "--choice-format",
    "max_new_tokens": "--max-new-tokens",
    "overflow": "--overflow",
    "chat": "the chat template setting",
}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Every setting that changes an answer, grade or activation and differs between two configs.

    Each reads as ``"--few-shot differs (run: 0, now: 5)"``.

    Compared: the model (the folder or hub id it resolves to, where both record it), benchmark,
    the question set's digest (before ``--limit``), the captured sites, every capture setting and
    every option but :data:`FREE_OPTIONS`. A key missing on either side (a run written by an older actcap) is
    unknown, and accepted.
    """
    now = json.loads(json.dumps(dict(new), default=str))  # tuples as lists, as in run.json
    pairs: list[tuple[str, Any, Any]] = []
    # The resolved model (a local folder's real path), when both record it, not the typed name.
    model = "model_id" if "model_id" in old and "model_id" in now else "model"
    for key in (model, "benchmark", "questions_digest", "capture", "sites", "options"):
        if key not in old or key not in now:
            continue
        a, b = old[key], now[key]
        if key in ("capture", "options") and isinstance(a, dict) and isinstance(b, dict):
            pairs += [(k, a[k], b[k]) for k in a if k in b and k not in FREE_OPTIONS]
        else:
            pairs.append((key, a, b))
    return [f"{_LABELS.get(k, k)} differs (run: {a!r}, now: {b!r})" for k, a, b in pairs if a != b]


def check_run_config(
    root: PathOrUrl, config: Mapping[str, Any], resume: bool, has_samples: bool
) -> bytes | None:
    """Check a run's config against its ``run.json``; the new ``run.json`` to write, or None.

    Raises:
        RunError: When the run has samples and ``resume`` is False, or a resume differs in any
            setting that changes an answer, a grade or an activation (all listed at once).
    """
    text = os.fspath(root)
    run_file = join(text, RUN_FILE)
    if exists(run_file):
        try:
            old = json.loads(read_bytes(run_file))
        except (FormatError, ValueError, RecursionError) as e:
            raise RunError(f"{run_file}: unreadable ({e}); choose another --out.") from e
        if not isinstance(old, dict):
            raise RunError(
                f"{run_file}: not an actcap run record (not a JSON object); choose another --out."
            )
        if has_samples and not resume:
            raise RunError(
                f"{text}: this run already has finished samples. Pass --resume to continue it, "
                "or choose another --out."
            )
        if resume and has_samples:
            differences = config_differences(old, config)
            if differences:
                raise RunError(
                    f"{text}: cannot resume with other settings than the run's: "
                    f"{'; '.join(differences)}. Resume with the run's settings (see its "
                    f"{RUN_FILE}), or choose another --out."
                )
            return None  # keep the original run.json (its start time, its versions)
    version = 2 if config.get("storage") == "shards" else 1
    record = {
        "format": RUN_MARKER,
        "run_format_version": version,
        "format_version": FORMAT_VERSION,
        **config,
    }
    return json.dumps(record, indent=2, ensure_ascii=False, default=str).encode()
