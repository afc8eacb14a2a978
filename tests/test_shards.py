"""Sharded storage, per-writer manifest segments and runs at fsspec URLs."""

import errno
import json
import os
import uuid

import fsspec
import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes

from actcap.analysis import build_report, directory_summary, list_samples, load_vectors
from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec
from actcap.errors import RunError, UnknownNameError
from actcap.storage import SampleMeta, load_activations, open_run
from actcap.storage.format import ShardSlice
from actcap.storage.layout import AUTO_SHARD_SAMPLES, resolve_storage
from actcap.storage.manifest import DoneIndex, read_all_manifests
from actcap.storage.remote import RemoteRunWriter
from actcap.storage.run import RunWriter
from tests.conftest import DATA

MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"
CAPTURE = CaptureSpec(layers=None, kinds=("resid", "mlp"))


def evaluate(lm, out, **kw):
    bench = load_benchmark(f"mmlu:{MMLU}").limited(kw.pop("limit", 12))
    return run_benchmark(
        lm, bench, capture=CAPTURE, options=EvalOptions(batch_size=4), out=out, progress=False, **kw
    )


@pytest.fixture(scope="module")
def files_run(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("files") / "run"
    evaluate(tiny_lm, out, storage="files")
    return out


@pytest.fixture(scope="module")
def shards_run(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "run"
    evaluate(tiny_lm, out, storage="shards", shard_bytes=60_000)
    return out


def assert_same_samples(a, b):
    ra, rb = open_run(a), open_run(b)
    assert sorted(e.id for e in ra.entries) == sorted(e.id for e in rb.entries)
    pa = sorted(ra.sample_paths(), key=lambda x: x[0].id)
    pb = sorted(rb.sample_paths(), key=lambda x: x[0].id)
    for (ea, sa), (eb, sb) in zip(pa, pb, strict=True):
        strip = ("file", "offset", "length")
        assert {k: v for k, v in ea.record.items() if k not in strip} == {
            k: v for k, v in eb.record.items() if k not in strip
        }
        da, db = load_activations(sa), load_activations(sb)
        assert da["prompt"] == db["prompt"] and da["response"] == db["response"]
        assert torch.equal(da["input_ids"], db["input_ids"])
        assert da["activations"].keys() == db["activations"].keys()
        for site in da["activations"]:
            assert torch.equal(da["activations"][site], db["activations"][site]), site


def test_sharded_run_holds_the_same_samples_as_files(files_run, shards_run):
    assert not list((shards_run / "samples").glob("*.safetensors"))
    shards = sorted((shards_run / "shards").glob("*.shard"))
    assert len(shards) >= 3  # rolled over at the (small) size limit
    assert_same_samples(files_run, shards_run)
    assert json.loads((shards_run / "run.json").read_text())["storage"] == "shards"
    # Versions that know only one file per sample refuse a sharded run instead of misreading it.
    assert json.loads((shards_run / "run.json").read_text())["run_format_version"] == 2
    assert json.loads((files_run / "run.json").read_text())["run_format_version"] == 1


def test_manifest_is_an_index_readable_without_actcap(shards_run):
    assert any("prefix" in e.record for e in open_run(shards_run).entries)
    for entry in open_run(shards_run).entries:
        rec = entry.record
        with open(shards_run / rec["file"], "rb") as f:
            f.seek(rec["offset"])
            tensors = load_safetensors_bytes(f.read(rec["length"]))
        if "prefix" in rec:  # the first rows are in the run's shared prefix (docs/format.md)
            shared = load_safetensors_bytes(
                (shards_run / "prefixes" / f"{rec['prefix']}.safetensors").read_bytes()
            )
            tensors["layer_1"] = torch.cat([shared["layer_1"], tensors["layer_1"]])
        direct = load_activations(shards_run, sample_id=entry.id)
        assert torch.equal(tensors["layer_1"], direct["activations"]["layer_1"])
        assert torch.equal(tensors["input_ids"], direct["input_ids"])


def test_shards_stay_near_their_size_limit(shards_run):
    sizes = [p.stat().st_size for p in (shards_run / "shards").glob("*.shard")]
    biggest = max(e.record["length"] for e in open_run(shards_run).entries)
    assert all(s < 60_000 + biggest for s in sizes)


def test_load_activations_by_run_and_id_in_both_layouts(files_run, shards_run):
    qid = open_run(files_run).entries[3].id
    a = load_activations(files_run, sample_id=qid, sites=["layer_0"])
    b = load_activations(shards_run, sample_id=qid, sites=["layer_0"])
    assert list(b["activations"]) == ["layer_0"]
    assert torch.equal(a["activations"]["layer_0"], b["activations"]["layer_0"])
    shard = shards_run / open_run(shards_run).find(qid).file
    c = load_activations(shard, sample_id=qid)
    assert torch.equal(c["activations"]["layer_0"], a["activations"]["layer_0"])
    with pytest.raises(UnknownNameError, match="no sample 'nope'"):
        load_activations(shards_run, sample_id="nope")
    with pytest.raises(Exception, match="pass sample_id"):
        load_activations(shards_run)


def test_analysis_reads_shards_like_files(files_run, shards_run):
    sa, sb = directory_summary(files_run), directory_summary(shards_run)
    assert sa.n_files == sb.n_files == 12 and not len(sb.skipped)
    assert sa.n_correct == sb.n_correct
    assert [s.__dict__ for s in sa.sites] == [s.__dict__ for s in sb.sites]
    va, vb = load_vectors(files_run, ["layer_1"]), load_vectors(shards_run, ["layer_1"])
    assert (va.vectors["layer_1"] == vb.vectors["layer_1"]).all()
    assert [s.correct for s in va.samples] == [s.correct for s in vb.samples]


def test_auto_storage_switches_to_shards_above_the_threshold():
    assert resolve_storage("auto", AUTO_SHARD_SAMPLES) == "files"
    assert resolve_storage("auto", AUTO_SHARD_SAMPLES + 1) == "shards"
    with pytest.raises(RunError, match="Unknown storage"):
        resolve_storage("tape", 1)


def test_resume_after_a_torn_shard_append(tiny_lm, tmp_path):
    out = tmp_path / "run"
    seen = []

    def crash(entry):
        seen.append(entry.id)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_lm, out, storage="shards", on_sample=crash)
    shard = next((out / "shards").glob("*.shard"))
    with open(shard, "ab") as f:
        f.write(b"\x00garbage of a half-written sample")  # the bytes of a torn append
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b'{"id": "torn')
    evaluate(tiny_lm, out, storage="shards", resume=True)
    ref = tmp_path / "ref"
    evaluate(tiny_lm, ref, storage="shards")
    assert_same_samples(ref, out)


def test_a_full_disk_cuts_the_shard_back(tmp_path, monkeypatch):
    meta = SampleMeta("p")
    with RunWriter.open(tmp_path / "r", {"model": "m"}, storage="shards") as w:
        w.write_sample("a", {}, {"layer_0": torch.ones(4, 8)}, meta)
        real_write = os.write

        def full(fd, data):
            real_write(fd, bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(RunError, match="disk full"):
            w.write_sample("b", {}, {"layer_0": torch.ones(4, 8)}, meta)
        monkeypatch.setattr(os, "write", real_write)
        w.write_sample("c", {}, {"layer_0": torch.full((4, 8), 3.0)}, meta)
    info = open_run(tmp_path / "r")
    assert [e.id for e in info.entries] == ["a", "c"]
    shard = tmp_path / "r" / info.entries[0].file
    assert shard.stat().st_size == sum(e.record["length"] for e in info.entries)
    assert load_activations(tmp_path / "r", sample_id="c")["activations"]["layer_0"][0, 0] == 3.0


def test_segments_of_extra_writers_merge_once_per_id(tmp_path):
    meta = SampleMeta("p")
    root = tmp_path / "r"
    main = RunWriter.open(root, {"model": "m"}, storage="shards")
    a = RunWriter.attach(root, "wa", storage="shards")
    b = RunWriter.attach(root, "wb", storage="files")
    index = DoneIndex(root)
    a.write_sample("q1", {"v": 1}, {"layer_0": torch.zeros(2, 4)}, meta)
    assert index.refresh() == {"q1"}
    b.write_sample("q2", {"v": 2}, {"layer_0": torch.ones(2, 4)}, meta)
    b.write_sample("q1", {"v": 99}, {"layer_0": torch.ones(2, 4)}, meta)  # a retried batch
    with open(root / "manifests" / "wa.jsonl", "ab") as f:
        f.write(b'{"id": "q3", "fi')  # a line still being appended
    assert index.refresh() == {"q1", "q2"}
    with open(root / "manifests" / "wa.jsonl", "ab") as f:
        f.write(b'le": null}\n')
    assert index.refresh() == {"q1", "q2", "q3"}
    a.close()
    b.close()
    entries = read_all_manifests(root)
    assert sorted(e.id for e in entries) == ["q1", "q2", "q3"]
    assert next(e for e in entries if e.id == "q1").record["v"] == 1  # first line wins
    assert main.merge_segments(["q3", "q2", "q1"]) == 3
    main.close()
    assert not list((root / "manifests").iterdir())
    lines = (root / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["q3", "q2", "q1"]
    assert load_activations(root, sample_id="q2")["activations"]["layer_0"].sum() == 8
    with RunWriter.attach(root, "wc") as extra, pytest.raises(RunError, match="main writer"):
        extra.merge_segments()
    # A writer that never wrote (a worker still starting when the run ended) leaves no segment.
    assert not (root / "manifests" / "wc.jsonl").exists()


@pytest.fixture
def memory_url():
    url = f"memory://actcap-test-{uuid.uuid4().hex[:8]}/run"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url.removeprefix("memory://")):
        fs.rm(url.removeprefix("memory://"), recursive=True)


def test_a_run_at_an_fsspec_url_equals_a_local_one(tiny_lm, files_run, memory_url, tmp_path):
    result = evaluate(tiny_lm, memory_url, shard_bytes=60_000)  # auto: shards at a URL
    assert result.out == memory_url
    info = open_run(memory_url)
    assert info.config["storage"] == "shards" and info.results["n"] == 12
    fs = fsspec.filesystem("memory")
    root = memory_url.removeprefix("memory://")
    assert not fs.exists(f"{root}/manifests") or not fs.ls(f"{root}/manifests")
    assert_same_samples(files_run, memory_url)
    refs = list_samples(memory_url)
    assert all(isinstance(r.path, ShardSlice) for r in refs)
    summary = directory_summary(memory_url)
    assert summary.n_files == 12 and not len(summary.skipped)
    report = build_report(memory_url, tmp_path / "report.html")
    assert "actcap report: run" in report.read_text() and "<img" in report.read_text()


def test_a_url_run_loses_only_its_open_shard_and_resumes(tiny_lm, files_run, memory_url):
    config = {"model": "tiny-llama"}
    writer = RemoteRunWriter.open(memory_url, config, shard_bytes=1 << 30)
    writer.write_sample("x", {}, {"layer_0": torch.zeros(2, 4)}, SampleMeta("p"))
    writer.abandon()  # a crash before the shard was sealed
    assert open_run(memory_url).entries == []
    with RemoteRunWriter.open(memory_url, config, shard_bytes=40) as w:  # each sample seals
        w.write_sample("y", {}, {"layer_0": torch.ones(2, 4)}, SampleMeta("p"))
    assert [e.id for e in open_run(memory_url).entries] == ["y"]
    assert load_activations(memory_url, sample_id="y")["activations"]["layer_0"].sum() == 8


def test_url_resume_completes_a_crashed_eval(tiny_lm, files_run, memory_url):
    seen = []

    def crash(entry):
        seen.append(entry.id)
        if len(seen) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_lm, memory_url, shard_bytes=30_000, on_sample=crash)
    evaluate(tiny_lm, memory_url, shard_bytes=30_000, resume=True)
    assert_same_samples(files_run, memory_url)


def test_file_urls_are_local_runs(tiny_lm, files_run, tmp_path):
    evaluate(tiny_lm, f"file://{tmp_path}/run", storage="files")
    assert (tmp_path / "run" / ".lock").exists()
    assert_same_samples(files_run, tmp_path / "run")


def test_a_url_refuses_one_file_per_sample(tiny_lm, memory_url):
    with pytest.raises(RunError, match="sharded storage only"):
        evaluate(tiny_lm, memory_url, storage="files")


def test_cli_eval_into_shards_and_inspect_a_sample(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from actcap.cli.main import cli

    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--limit", "6", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--storage", "shards", "--shard-size", "30KB"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "shards").glob("*.shard"))) >= 2
    qid = open_run(out).entries[0].id
    shown = CliRunner().invoke(cli, ["inspect", str(out), "--sample", qid, "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["path"].endswith(f"@{open_run(out).entries[0].record['offset']}")
    assert data["tensors"]["layer_0"]["shape"][1] == 32
    assert json.loads(data["metadata"]["extra"])["question_id"] == qid
    bare = CliRunner().invoke(cli, ["inspect", str(out)])
    assert bare.exit_code == 2 and "pass --sample ID" in bare.output
    bad = CliRunner().invoke(cli, [*args, "--resume", "--shard-size", "lots"])
    assert bad.exit_code == 2 and "is no size" in bad.output


def test_encoded_samples_are_exact_safetensors_files(tmp_path):
    from safetensors import safe_open

    from actcap.storage.encode import encode_sample

    acts = {
        "embeddings": torch.randn(5, 7),
        "layer_0": torch.randn(5, 7).to(torch.bfloat16),
        "layer_0.mlp": torch.randn(7).half(),
        "layer_1": torch.zeros(0, 7),
        "mask": torch.tensor([True, False, True]),
        "odd": torch.arange(3, dtype=torch.int8),  # 3 bytes: later offsets are not aligned
        "layer_2": torch.randn(3, 2, 4)[:, 1],  # not contiguous
    }
    meta = SampleMeta('a prompt with \u00e9 and "quotes"', response="r", extra={"k": [1, 2]})
    parts = encode_sample("x", acts, meta, input_ids=torch.arange(5))
    blob = b"".join(bytes(p) for p in parts)
    loaded = load_safetensors_bytes(blob)
    assert loaded.keys() == {*acts, "input_ids"}
    for name, t in acts.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    (tmp_path / "x.safetensors").write_bytes(blob)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata()["prompt"] == meta.prompt
        assert torch.equal(f.get_tensor("input_ids"), torch.arange(5))
    assert load_activations(tmp_path / "x.safetensors")["metadata"]["extra"] == {"k": [1, 2]}


def test_a_truncated_shard_is_reported_and_skipped(tiny_lm, tmp_path):
    from actcap.errors import FormatError

    out = tmp_path / "run"
    evaluate(tiny_lm, out, storage="shards", limit=4)
    entries = open_run(out).entries
    shard = out / entries[-1].file
    with open(shard, "r+b") as f:
        f.truncate(entries[-1].record["offset"] + 20)  # the last sample's bytes cut short
    with pytest.raises(FormatError, match="truncated|not a safetensors"):
        load_activations(out, sample_id=entries[-1].id)
    summary = directory_summary(out)
    assert summary.n_files == 3 and len(summary.skipped) == 1
    assert str(shard) in summary.skipped.files[0][0]
