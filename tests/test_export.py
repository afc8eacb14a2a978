"""actcap export: one site of a run as Parquet, a Hugging Face dataset or .npy arrays."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec
from actcap.cli.main import cli
from actcap.data.export import export_site
from actcap.errors import FormatError, UnknownNameError
from actcap.storage import load_activations, open_run
from tests.conftest import DATA

MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"


def evaluate(lm, out, capture, **kw):
    bench = load_benchmark(f"mmlu:{MMLU}").limited(10)
    run_benchmark(
        lm, bench, capture=capture, options=EvalOptions(batch_size=5), out=out, progress=False, **kw
    )
    return out


@pytest.fixture(scope="module")
def run_dir(tiny_lm, tmp_path_factory):
    return evaluate(tiny_lm, tmp_path_factory.mktemp("x") / "run", CaptureSpec(layers=[0, 1]))


@pytest.fixture(scope="module")
def stored(run_dir):
    """Each sample's layer_1 and token ids, in manifest order."""
    out = {}
    for e in open_run(run_dir).entries:
        d = load_activations(run_dir, sample_id=e.id)
        out[e.id] = (d["activations"]["layer_1"], d["input_ids"], e.correct)
    return out


def check_token_rows(table, stored):
    rows = table.to_pydict()
    assert len(rows["sample_id"]) == sum(x.shape[0] for x, _, _ in stored.values())
    acts = np.array(rows["activation"], dtype=np.float32)
    start = 0
    for i, (qid, (x, ids, correct)) in enumerate(stored.items()):
        n = x.shape[0]
        assert rows["sample_id"][start : start + n] == [qid] * n
        assert rows["sample_index"][start : start + n] == [i] * n
        assert rows["position"][start : start + n] == list(range(n))
        assert rows["token_id"][start : start + n] == ids.tolist()
        assert rows["correct"][start] == correct
        np.testing.assert_array_equal(acts[start : start + n], x.numpy())
        start += n


def test_parquet_token_rows_equal_the_run(run_dir, stored, tmp_path):
    out = tmp_path / "pq"
    result = export_site(run_dir, "layer_1", out, to="parquet", group_rows=50, rows_per_file=120)
    files = sorted(out.glob("*.parquet"))
    assert len(files) == len(result.files) >= 2  # rolled over at rows_per_file
    groups = sum(pq.ParquetFile(f).num_row_groups for f in files)
    # Written group by group as it streams (each sample here is longer than 50 rows), not at the end.
    assert groups == result.n_samples == 10
    table = pq.read_table(out)
    assert table.schema.field("activation").type.list_size == result.hidden == 32
    check_token_rows(table, stored)
    info = json.loads((out / "_export.json").read_text())
    assert info["n_rows"] == result.n_rows and info["site"] == "layer_1"


@pytest.mark.parametrize("reduce", ["last", "mean"])
def test_parquet_sample_rows(run_dir, stored, tmp_path, reduce):
    out = tmp_path / "pq"
    result = export_site(run_dir, "layer_1", out, rows="samples", reduce=reduce)
    assert result.n_rows == result.n_samples == len(stored)
    acts = np.array(pq.read_table(out).column("activation").to_pylist(), dtype=np.float32)
    for row, (x, _, _) in zip(acts, stored.values(), strict=True):
        expected = x[-1] if reduce == "last" else x.mean(0)
        np.testing.assert_allclose(row, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_hf_dataset_loads_with_datasets(run_dir, stored, tmp_path):
    import datasets

    out = tmp_path / "hf"
    result = export_site(run_dir, "layer_1", out, to="hf-dataset", group_rows=40)
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == result.n_rows
    check_token_rows(ds.data.table, stored)
    assert not list(out.glob(".hf-scratch-*"))


def test_npy_arrays(run_dir, stored, tmp_path):
    out = tmp_path / "npy"
    result = export_site(run_dir, "layer_1", out, to="npy", dtype="float16")
    acts = np.load(out / "activations.npy", mmap_mode="r")
    assert acts.shape == (result.n_rows, 32) and acts.dtype == np.float16
    index, pos, tok = (np.load(out / f"{n}.npy") for n in ("sample_index", "position", "token_id"))
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == list(stored)
    for s, (x, ids, correct) in zip(samples, stored.values(), strict=True):
        a, b = s["rows"]
        np.testing.assert_array_equal(acts[a:b], x.numpy().astype(np.float16))
        assert (index[a:b] == s["sample_index"]).all() and s["correct"] == correct
        assert pos[a:b].tolist() == list(range(b - a)) and tok[a:b].tolist() == ids.tolist()


@pytest.mark.parametrize("to", ["parquet", "hf-dataset", "npy"])
def test_every_format_returns_one_result_and_writes_export_json_atomically(
    run_dir, stored, tmp_path, monkeypatch, to
):
    """The three writers give one ExportResult shape; _export.json goes through the atomic helper."""
    import actcap.data.export as export
    from actcap.storage.durable import atomic_write_bytes

    written = []

    def recording(path, data):
        written.append(path.name)
        atomic_write_bytes(path, data)

    monkeypatch.setattr(export, "atomic_write_bytes", recording)
    result = export_site(run_dir, "layer_1", tmp_path / to, to=to)
    assert isinstance(result, export.ExportResult)
    assert result.out == tmp_path / to
    assert result.hidden == next(iter(stored.values()))[0].shape[-1]
    assert result.n_rows == sum(x.shape[0] for x, _, _ in stored.values())
    assert result.n_samples == len(stored) and len(result.skipped) == 0
    assert result.files and all(f.exists() for f in result.files)
    assert written == ["_export.json"]
    info = json.loads((tmp_path / to / "_export.json").read_text())
    assert (info["n_rows"], info["format"]) == (result.n_rows, to)
    assert not [p for p in (tmp_path / to).iterdir() if p.name.endswith(".tmp")]


def test_sharded_and_url_runs_export_the_same(tiny_lm, run_dir, tmp_path):
    import fsspec

    shards = evaluate(
        tiny_lm,
        tmp_path / "shards",
        CaptureSpec(layers=[0, 1]),
        storage="shards",
        shard_bytes=20_000,
    )
    url = "memory://actcap-export-test/run"
    evaluate(tiny_lm, url, CaptureSpec(layers=[0, 1]))
    try:
        ref = pq.read_table(export_site(run_dir, "layer_0", tmp_path / "a").out).sort_by(
            "sample_id"
        )
        for source, name in ((shards, "b"), (url, "c")):
            got = pq.read_table(export_site(source, "layer_0", tmp_path / name).out).sort_by(
                "sample_id"
            )
            assert got.drop_columns(["sample_index"]).equals(ref.drop_columns(["sample_index"]))
    finally:
        fsspec.filesystem("memory").rm("/actcap-export-test", recursive=True)


def test_reduced_captures_export_one_row_per_sample(tiny_lm, tmp_path):
    run = evaluate(tiny_lm, tmp_path / "run", CaptureSpec(layers=[1], token_selection="last"))
    result = export_site(run, "layer_1", tmp_path / "out")
    table = pq.read_table(tmp_path / "out")
    assert result.n_rows == 10 and set(table.column("position").to_pylist()) == {-1}


def test_bad_requests_say_what_to_do(run_dir, tmp_path):
    with pytest.raises(UnknownNameError, match="layer_0, layer_1"):
        export_site(run_dir, "layer_9", tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FormatError, match="not an empty folder"):
        export_site(run_dir, "layer_1", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_cli_export(run_dir, stored, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        cli, ["export", str(run_dir), "--to", "npy", "--site", "layer_1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    n = sum(x.shape[0] for x, _, _ in stored.values())
    assert f"exported {n} rows x 32 of layer_1 from {len(stored)} samples" in result.output
    bad = CliRunner().invoke(
        cli, ["export", str(run_dir), "--site", "nope", "--out", str(tmp_path / "z")]
    )
    assert bad.exit_code == 1 and "No sample has site 'nope'" in bad.output
    torch.manual_seed(0)


def synthetic_run(root, n, tokens=256, hidden=512):
    from actcap.storage import SampleMeta
    from actcap.storage.run import RunWriter

    with RunWriter.open(root, {"model": "synthetic"}, storage="shards") as w:
        for i in range(n):
            x = torch.full((tokens, hidden), float(i))
            w.write_sample(
                f"s{i:04d}",
                {"correct": i % 2 == 0, "category": "c"},
                {"layer_0": x},
                SampleMeta("p"),
                input_ids=torch.arange(tokens),
            )
    return root


PEAK_RSS = """
import resource, sys
from actcap.data.export import export_site
export_site(sys.argv[1], "layer_0", sys.argv[2], to=sys.argv[3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.parametrize("to", ["parquet", "npy"])
def test_export_memory_does_not_grow_with_the_run(tmp_path, to):
    """Peak memory of an export of 400 samples (200 MB) vs 40 (20 MB): streaming keeps it flat."""
    import subprocess
    import sys

    peaks = {}
    for n in (40, 400):
        run = synthetic_run(tmp_path / f"run{n}", n)
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(run), str(tmp_path / f"out{n}"), to],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[n] = int(out.stdout.split()[-1])
    print(f"peak RSS of the export (MB): {peaks}")
    # Holding the run would add 180 MB. Measured: npy 275 -> 275 MB; Parquet 392 -> 439 MB, and
    # 440 MB at 1,200 samples (Arrow's allocator grows to its working size, then stays).
    assert peaks[400] - peaks[40] < 90, peaks
    n_rows = json.loads((tmp_path / "out400" / "_export.json").read_text())["n_rows"]
    assert n_rows == 400 * 256


@pytest.mark.parametrize(
    ("module", "extra", "call"),
    [
        ("pyarrow", "export", lambda run, out: export_site(run, "layer_1", out, to="parquet")),
        ("datasets", "hf", lambda run, out: export_site(run, "layer_1", out, to="hf-dataset")),
        (
            "ray",
            "ray",
            lambda run, out: __import__(
                "actcap.bench.distributed"
            ).bench.distributed.run_benchmark_ray("default", load_benchmark("demo"), out),
        ),
    ],
)
def test_missing_extras_say_what_to_install(run_dir, tmp_path, monkeypatch, module, extra, call):
    import importlib.util

    from actcap.errors import MissingDependencyError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a)
    )
    with pytest.raises(MissingDependencyError, match=rf"pip install 'actcap\[{extra}\]'"):
        call(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def resave(path, sites, *, keep_prefix=False):
    """Write a sample file anew with other ``sites`` (its metadata and token ids kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, ids = f.metadata(), f.get_tensor("input_ids")
    if not keep_prefix:
        meta = {k: v for k, v in meta.items() if k not in ("prefix", "prefix_tokens")}
    save_file({**sites, "input_ids": ids}, str(path), metadata=meta)


def odd_run(run_dir, root, odd, index=3):
    """A copy of the run with sample ``index``'s layer_1 replaced by ``odd``; its id."""
    import shutil

    run = root / "run"
    shutil.copytree(run_dir, run)
    entry, path = list(open_run(run).sample_paths())[index]
    resave(
        path,
        {"layer_0": torch.zeros(odd.shape[0] if odd.dim() > 1 else 1, 32), "layer_1": odd},
        keep_prefix=odd.dim() == 1,
    )
    return run, entry.id


def exported_rows(out, to):
    """(sample ids per row, activations) of an export."""
    if to == "npy":
        acts = np.load(out / "activations.npy")
        samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        ids = [s["id"] for s in samples for _ in range(s["rows"][1] - s["rows"][0])]
        return ids, acts
    if to == "hf-dataset":
        import datasets

        table = datasets.load_from_disk(str(out)).data.table
    else:
        table = pq.read_table(out)
    return table.column("sample_id").to_pylist(), np.array(
        table.column("activation").to_pylist(), dtype=np.float32
    )


@pytest.mark.parametrize("to", ["npy", "parquet", "hf-dataset"])
@pytest.mark.parametrize("odd", ["narrower", "prefixed-vector"])
def test_a_sample_of_another_shape_is_skipped_and_counted(run_dir, stored, tmp_path, to, odd):
    """One sample re-saved as [183, 16], or (the first) as a [32] vector on the shared prefix."""
    if to == "hf-dataset":
        pytest.importorskip("datasets")
    tensor = torch.randn(183, 16) if odd == "narrower" else torch.randn(32)
    run, odd_id = odd_run(run_dir, tmp_path, tensor, index=3 if odd == "narrower" else 0)
    out = tmp_path / "out"
    result = export_site(run, "layer_1", out, to=to)
    kept = {k: v for k, v in stored.items() if k != odd_id}
    assert [why for _, why in result.skipped.files] and len(result.skipped) == 1
    assert (result.n_samples, result.hidden) == (9, 32)
    assert result.n_rows == sum(x.shape[0] for x, _, _ in kept.values())
    info = json.loads((out / "_export.json").read_text())
    assert (info["n_rows"], info["hidden"], info["n_samples"]) == (result.n_rows, 32, 9)
    assert len(info["skipped"]) == 1
    ids, acts = exported_rows(out, to)
    assert acts.shape == (result.n_rows, 32)
    assert ids == [k for k, (x, _, _) in kept.items() for _ in range(x.shape[0])]
    np.testing.assert_array_equal(acts, np.concatenate([x.numpy() for x, _, _ in kept.values()]))


def test_cli_export_reports_a_sample_of_another_width(run_dir, tmp_path):
    run, odd_id = odd_run(run_dir, tmp_path, torch.randn(183, 16))
    out = tmp_path / "cli"
    r = CliRunner().invoke(
        cli, ["export", str(run), "--to", "npy", "--site", "layer_1", "--out", str(out)]
    )
    assert r.exit_code == 0 and r.exception is None, r.output
    assert "from 9 samples" in r.output and "skipped 1" in r.output
    assert "[183, 16]" in r.output and "Traceback" not in r.output
