"""``--dtype float8``: e4m3 values with a float32 scale per row, read back dequantized."""

from __future__ import annotations

import json
import math

import pytest
import torch

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture.spec import CaptureSpec
from actcap.storage import ActivationFile, SampleMeta, load_activations, open_run, save_activations
from actcap.storage.float8 import dequantize, quantize
from tests.conftest import DATA

MMLU_FILE = DATA / "mmlu" / "test" / "high_school_geography_test.csv"


def test_round_trip_error_is_bounded_per_element() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 96, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    q, scale = quantize(t)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (64, 1)
    back = dequantize(q, scale)
    err = (back - t).abs()
    # Normal e4m3 numbers (scaled magnitude >= 2**-6): relative error <= 2**-4; below, absolute
    # error <= half the subnormal step, 2**-10 * scale.
    normal = (t / scale).abs() >= 2.0**-6
    assert bool((err[normal] <= 2.0**-4 * t.abs()[normal]).all())
    assert bool((err[~normal] <= 2.0**-10 * scale.expand_as(t)[~normal]).all())
    # Each row's largest value is exact (it scales to 448).
    rows = torch.arange(64)
    top = t.abs().argmax(dim=1)
    torch.testing.assert_close(back[rows, top], t[rows, top], rtol=1e-6, atol=0)


def test_zero_rows_and_non_finite_values() -> None:
    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, math.inf, -2.0], [math.nan, 3.0, 0.5]])
    q, scale = quantize(t)
    back = dequantize(q, scale)
    assert back[0].tolist() == [0.0, 0.0, 0.0] and float(scale[0]) == 1.0
    # inf and nan come back as nan; the row's finite values keep their scale.
    assert math.isnan(back[1, 1]) and math.isnan(back[2, 0])
    assert back[1, 0].item() == pytest.approx(1.0, rel=2**-4)
    assert back[1, 2].item() == pytest.approx(-2.0, rel=2**-4)
    assert back[2, 1].item() == pytest.approx(3.0, rel=2**-4)


def test_file_stores_float8_with_scales_and_reads_back_in_the_dtype_asked(tmp_path) -> None:
    t = torch.randn(5, 16) * 10
    path = save_activations(
        tmp_path / "a.safetensors",
        {"layer_0": t, "layer_1": t[-1]},
        SampleMeta("hi", dtype="float8"),
        input_ids=torch.arange(5),
    )
    with ActivationFile(path) as f:
        assert f.sites == ["layer_0", "layer_1"]  # scales are no sites
        assert f.dtype("layer_0") == "F8_E4M3" and f.dtype("layer_0@scale") == "F32"
        assert f.meta.dtype == "float8"
        assert f.get("layer_0").dtype == torch.float32
        assert f.get("layer_0", torch.bfloat16).dtype == torch.bfloat16
        torch.testing.assert_close(f.get_slice("layer_0")[-1], f.get("layer_1"))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["dtype"] == "float8"
    data = load_activations(path)
    assert set(data["activations"]) == {"layer_0", "layer_1"}
    torch.testing.assert_close(data["activations"]["layer_0"], t, rtol=2**-4, atol=1e-6)
    assert load_activations(path, dtype=torch.float16)["activations"]["layer_1"].dtype == (
        torch.float16
    )


@pytest.mark.parametrize("storage", ["files", "shards"])
def test_float8_run_reads_back_close_to_float32(tiny_lm, tmp_path, storage: str) -> None:
    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(3)
    runs = {}
    for dtype in ("float32", "float8"):
        run_benchmark(
            tiny_lm,
            bench,
            capture=CaptureSpec(layers=[0, -1], token_selection="all", dtype=dtype),
            options=EvalOptions(batch_size=3),
            out=tmp_path / dtype,
            progress=False,
            storage=storage,  # type: ignore[arg-type]
            verify=1,
        )
        info = open_run(tmp_path / dtype)
        runs[dtype] = {e.id: load_activations(src)["activations"] for e, src in info.sample_paths()}
        if dtype == "float8":
            assert info.results is not None and info.results["verification"]["passed"]
    for qid, acts in runs["float32"].items():
        for site, full in acts.items():
            got = runs["float8"][qid][site]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, full, rtol=2**-4, atol=full.abs().max() * 2**-10)
