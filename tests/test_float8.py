"""``--dtype float8``: e4m3 values with a float32 scale per row, read back dequantized."""

from __future__ import annotations

import json
import math

import pytest
import torch

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture.spec import CaptureSpec
from actcap.errors import FormatError
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


def resave(path, change) -> None:
    """Rewrite a sample file with ``change(tensors)`` applied, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture(scope="module")
def float8_run(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("f8") / "run"
    run_benchmark(
        tiny_lm,
        load_benchmark(f"mmlu:{MMLU_FILE}").limited(4),
        capture=CaptureSpec(layers=[0, 1], token_selection="all", dtype="float8"),
        options=EvalOptions(batch_size=4),
        out=out,
        progress=False,
    )
    return out


def test_dequantize_refuses_a_scale_that_does_not_fit() -> None:
    q, scale = quantize(torch.randn(5, 8))
    for bad in (torch.ones(3, 1), torch.ones(5), torch.ones(5, 8), torch.ones(1, 1)):
        with pytest.raises(FormatError, match=r"x\.safetensors: site 'l'.*scale.*shape"):
            dequantize(q, bad, where="x.safetensors: site 'l'")
    for value in (0.0, -1.0, math.nan, math.inf):
        bad = scale.clone()
        bad[2] = value
        with pytest.raises(FormatError, match="finite and positive"):
            dequantize(q, bad)
    assert dequantize(q[:0], scale[:0]).shape == (0, 8)  # no rows: nothing to scale


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t.__setitem__("layer_1@scale", torch.ones(3, 1)), r"scale.*shape \[3, 1\]"),
        (lambda t: t.pop("layer_1@scale"), r"stored as float8 .*no scale"),
        (lambda t: t["layer_1@scale"].__setitem__(0, -2.0), "finite and positive"),
    ],
    ids=["wrong-shape", "missing", "negative"],
)
def test_a_damaged_scale_is_a_format_error_naming_file_and_site(
    float8_run, tmp_path, damage, message
) -> None:
    import shutil
    import warnings

    from click.testing import CliRunner

    from actcap.cli.main import cli
    from actcap.data import ActivationDataset

    run = tmp_path / "run"
    shutil.copytree(float8_run, run)
    entries = list(open_run(run).sample_paths())
    bad = entries[1][1]
    resave(bad, damage)
    with ActivationFile(bad) as f, pytest.raises(FormatError, match=message) as e:
        f.get("layer_1")
    assert str(bad) in str(e.value) and "'layer_1'" in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(cli, ["analyze", "--directory", str(run)])
    assert r.exit_code == 0 and r.exception is None, r.output
    assert "3 files read, 1 skipped" in r.output and "Traceback" not in r.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ActivationDataset(run, sites=["layer_1"], rows="samples", labels=["id"])
        ids = [row["id"] for row in ds]
    assert ids == [e.id for e, _ in entries if e.id != entries[1][0].id]
    assert [sid for sid, _ in ds.skipped] == [entries[1][0].id]
    assert any("skipped" in str(w.message) for w in caught)


def test_a_float8_tensor_without_scale_in_a_file_of_another_dtype(tmp_path) -> None:
    q, _ = quantize(torch.randn(4, 8) * 100)
    path = save_activations(tmp_path / "a.safetensors", {"layer_0": q}, SampleMeta("hi"))
    with ActivationFile(path) as f, pytest.raises(FormatError, match="'layer_0'.*no scale"):
        f.get("layer_0")
