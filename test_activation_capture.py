"""Check an actcap install: capture, benchmark and file round trip on the built-in model.

Run from the repository root:  python test_activation_capture.py [--model M] [--device D] [--out DIR]

Prints one line per check (PASS or FAIL, and what it checked), then ``N/M checks passed``; the
exit status is 0 when every check passed, 1 otherwise. The files go to a temporary folder that is
removed at the end (or to DIR with ``--out``, kept). The pipeline actcap grew from told its users
to run this script; it is a script, not a pytest module (pytest collects only ``tests/``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actcap import (
    CaptureSpec,
    SampleMeta,
    answer_and_grade_benchmark_question,
    answer_benchmark_question_with_activations,
    generate_inference_with_activations,
    load_activations,
    load_benchmark,
    load_model,
    run_benchmark,
    save_activations,
)
from actcap.storage import open_run

PROMPT = "What is the capital of France?"
FACT = "fact-01"
"""The demo question the benchmark checks grade: 'What is the capital of France?' (Paris)."""
CHOICE = "mc-02"
"""A multiple-choice demo question: 'What is the capital of Japan?' (B, Tokyo)."""


@dataclass
class Context:
    """What the checks share: the model, the demo questions and the folder for files."""

    lm: Any
    out: Path
    questions: dict[str, Any]

    @property
    def sites(self) -> list[str]:
        """Embeddings and every layer's residual stream: what capturing 'all' gives."""
        return ["embeddings", *(f"layer_{i}" for i in range(self.lm.layout.num_layers))]

    @property
    def hidden(self) -> int:
        """The model's hidden size (the width of every residual vector)."""
        return int(self.lm.model.get_input_embeddings().weight.shape[1])


class CheckFailed(Exception):
    """A check found something wrong (the message says what)."""


def expect(ok: bool, what: str) -> None:
    """Fail the running check with ``what`` unless ``ok``."""
    if not ok:
        raise CheckFailed(what)


def check_capture(ctx: Context) -> str:
    """generate_inference_with_activations: a response, and embeddings + every layer captured."""
    response, data = generate_inference_with_activations(
        PROMPT, ctx.lm, layers_to_capture=None, max_new_tokens=8
    )
    acts = data["activations"]
    expect(bool(response.strip()), "the response is empty")
    expect(list(acts) == ctx.sites, f"sites {list(acts)}, expected {ctx.sites}")
    n = len(data["input_ids"])
    bad = [s for s, t in acts.items() if tuple(t.shape) != (n, ctx.hidden)]
    expect(not bad, f"sites {bad} are not (prompt tokens, hidden) = ({n}, {ctx.hidden})")
    return f"{len(acts)} sites, each ({n}, {ctx.hidden}); response {response.strip()[:40]!r}"


def check_capture_some(ctx: Context) -> str:
    """Capture of chosen layers, last token only: one vector per site."""
    _, data = generate_inference_with_activations(
        PROMPT, ctx.lm, layers_to_capture=[0, -1], token_selection="last", max_new_tokens=4
    )
    acts = data["activations"]
    last = f"layer_{ctx.lm.layout.num_layers - 1}"
    expect(list(acts) == ["layer_0", last], f"sites {list(acts)}, expected layer_0 and {last}")
    expect(all(tuple(t.shape) == (ctx.hidden,) for t in acts.values()), "not one vector a site")
    return f"layers [0, -1], token_selection='last': {list(acts)}, each ({ctx.hidden},)"


def check_benchmark_capture(ctx: Context) -> str:
    """answer_benchmark_question_with_activations: a response and its file."""
    q = ctx.questions[CHOICE]
    folder = ctx.out / "answered"
    response, data = answer_benchmark_question_with_activations(
        q, ctx.lm, activation_save_dir=folder, max_new_tokens=8
    )
    expect(bool(response.strip()), "the response is empty")
    expect(list(data["activations"]) == ctx.sites, f"sites {list(data['activations'])}")
    expect(data["file"] is not None and Path(data["file"]).is_file(), "no activation file written")
    return f"{q.id}: response {response.strip()[:30]!r}, {len(ctx.sites)} sites in {data['file']}"


def check_grade_no_capture(ctx: Context) -> str:
    """answer_and_grade_benchmark_question without capture: graded right, no file."""
    q = ctx.questions[FACT]
    result = answer_and_grade_benchmark_question(q, ctx.lm)
    expect(result["activation_file"] is None, "a file was written without capture")
    expect(
        result["correct"] is True,
        f"{q.id} graded {result['correct']}: the model answered {result['response']!r} to "
        f"{q.question!r} (reference {q.answer!r})",
    )
    return f"{q.id} graded right ({result['grader']}): {result['response'].strip()[:40]!r}"


def check_grade_capture(ctx: Context) -> str:
    """answer_and_grade_benchmark_question with capture: the file holds the grade."""
    q = ctx.questions[CHOICE]
    result = answer_and_grade_benchmark_question(
        q, ctx.lm, capture_activations=True, activation_save_dir=ctx.out / "graded"
    )
    path = result["activation_file"]
    expect(path is not None and Path(path).is_file(), "no activation file written")
    saved = load_activations(path)
    expect(list(saved["activations"]) == ctx.sites, f"sites {list(saved['activations'])}")
    stored = saved["metadata"]["extra"].get("correct")
    expect(stored == result["correct"], f"file says correct={stored}, result {result['correct']}")
    return f"{q.id} ({result['mode']}) graded {result['correct']}, grade stored in {path}"


def check_file_round_trip(ctx: Context) -> str:
    """save_activations then load_activations: equal tensors, whole and one site lazily."""
    _, data = generate_inference_with_activations(PROMPT, ctx.lm, max_new_tokens=1)
    acts = data["activations"]
    path = ctx.out / "round_trip.safetensors"
    save_activations(path, acts, SampleMeta(PROMPT, data["response"]), input_ids=data["input_ids"])
    loaded = load_activations(path)
    differ = [s for s in acts if not torch.equal(loaded["activations"].get(s), acts[s])]
    expect(list(loaded["activations"]) == list(acts) and not differ, f"sites differ: {differ}")
    expect(torch.equal(loaded["input_ids"], data["input_ids"]), "input ids differ")
    one = load_activations(path, sites=["layer_0"])["activations"]
    expect(list(one) == ["layer_0"] and torch.equal(one["layer_0"], acts["layer_0"]), "lazy read")
    return f"{len(acts)} sites equal after save and load ({path.stat().st_size:,} bytes)"


def check_run_round_trip(ctx: Context) -> str:
    """run_benchmark into a run directory, then its manifest, files and results read back."""
    bench = load_benchmark("demo").limited(3)
    root = ctx.out / "run"
    result = run_benchmark(
        ctx.lm, bench, capture=CaptureSpec(layers=[0, -1]), out=root, progress=False
    )
    info = open_run(root)
    ids = sorted(e.id for e in info.entries)  # in the order they finished
    expect(ids == sorted(q.id for q in bench.questions), f"manifest ids {ids}")
    for entry in info.entries:
        expect(entry.file is not None, f"{entry.id}: no file in the manifest")
        acts = load_activations(Path(root) / str(entry.file))["activations"]
        expect(len(acts) == 2, f"{entry.id}: sites {list(acts)}, expected 2")
    expect(info.results is not None, "no results.json")
    assert info.results is not None
    expect(info.results.get("accuracy") == result.accuracy, "results.json accuracy differs")
    return f"{len(ids)} demo samples written and read back, accuracy {result.accuracy:.2f}"


CHECKS: list[tuple[str, Callable[[Context], str]]] = [
    ("capture", check_capture),
    ("capture chosen layers", check_capture_some),
    ("benchmark answer with capture", check_benchmark_capture),
    ("benchmark grade without capture", check_grade_no_capture),
    ("benchmark grade with capture", check_grade_capture),
    ("file round trip", check_file_round_trip),
    ("run directory round trip", check_run_round_trip),
]


def run_checks(model: str, device: str, out: Path) -> int:
    """Load the model, run every check, print one line each; return how many passed."""
    try:
        lm = load_model(model, device=device)
    except Exception as e:  # every check needs the model: report it, count them all failed
        print(f"FAIL  load model {model!r}: {type(e).__name__}: {e}")
        return 0
    print(f"Model: {lm.display_name} ({lm.layout.num_layers} layers) on {lm.device}")
    ctx = Context(lm, out, {q.id: q for q in load_benchmark("demo").questions})
    passed = 0
    for name, check in CHECKS:
        start = time.perf_counter()
        try:
            what = check(ctx)
        except Exception as e:  # a failed check is reported, the others still run
            kind = "" if isinstance(e, CheckFailed) else f"{type(e).__name__}: "
            print(f"FAIL  {name}: {kind}{e}")
        else:
            print(f"PASS  {name}: {what} ({time.perf_counter() - start:.1f} s)")
            passed += 1
    return passed


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run the checks, print the count; 0 when all passed, 1 otherwise."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default', a hub id, a folder or a .gguf.")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps.")
    p.add_argument("--out", default=None, help="Keep the files in this folder (default: removed).")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="actcap-check-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        passed = run_checks(args.model, args.device, out)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{passed}/{len(CHECKS)} checks passed")
    return 0 if passed == len(CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
