"""Shared prompt prefixes stored once per run (issue #16, part 1)."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from actcap.bench import EvalOptions, Question, load_benchmark, run_benchmark
from actcap.bench.questions import Benchmark
from actcap.capture import CaptureSpec
from actcap.errors import FormatError
from actcap.storage import ActivationFile, load_activations, open_run, save_activations
from actcap.storage.format import SampleMeta
from actcap.storage.prefixes import (
    MIN_PREFIX_TOKENS,
    PREFIXES,
    common_prefix,
    is_prefix_key,
    prefix_filename,
    prefix_key,
    prefix_location,
    shareable_rows,
)
from tests.conftest import DATA


def test_prefix_key_depends_on_model_dtype_sites_and_tokens():
    base = prefix_key("m", "float32", ["layer_0", "layer_1"], [1, 2, 3])
    assert is_prefix_key(base)
    assert base == prefix_key("m", "float32", ["layer_1", "layer_0"], [1, 2, 3])
    others = {
        prefix_key("m2", "float32", ["layer_0", "layer_1"], [1, 2, 3]),
        prefix_key("m", "float16", ["layer_0", "layer_1"], [1, 2, 3]),
        prefix_key("m", "float32", ["layer_0"], [1, 2, 3]),
        prefix_key("m", "float32", ["layer_0", "layer_1"], [1, 2, 4]),
        prefix_key("m", "float32", ["layer_0", "layer_1"], [12, 3]),
    }
    assert base not in others and len(others) == 5


@pytest.mark.parametrize("key", ["../x", "a" * 63, "A" * 64, "g" * 64, "", "a" * 64 + "/"])
def test_a_corrupt_key_names_no_file(key):
    with pytest.raises(FormatError, match="corrupt"):
        prefix_filename(key)


def test_the_prefix_lies_in_the_samples_own_run():
    key = "a" * 64
    assert prefix_location("/r/samples/q1.safetensors", key) == f"/r/prefixes/{key}.safetensors"
    assert prefix_location("/r/shards/x-00001.shard", key) == f"/r/prefixes/{key}.safetensors"
    assert (
        prefix_location("memory://b/r/shards/x.shard", key)
        == f"memory://b/r/prefixes/{key}.safetensors"
    )


def test_shareable_rows_needs_the_same_tokens_and_a_row_of_its_own():
    n = MIN_PREFIX_TOKENS
    ids = torch.arange(n + 3)
    acts = {"layer_0": torch.zeros(n + 3, 4)}
    assert shareable_rows(acts, ids, list(range(n))) == n
    assert shareable_rows(acts, ids, [7] + list(range(1, n))) == 0  # other tokens
    assert shareable_rows(acts, ids, list(range(n - 1))) == 0  # too short to be worth it
    assert shareable_rows(acts, torch.arange(n), list(range(n))) == 0  # nothing of its own
    assert shareable_rows({"layer_0": torch.zeros(4)}, ids, list(range(n))) == 0  # last/mean


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([[1, 2, 3]]) == [1, 2, 3]
    assert common_prefix([]) == []


def test_meta_carries_the_prefix_only_when_there_is_one():
    plain = SampleMeta("p").to_header()
    assert "prefix" not in plain and "prefix_tokens" not in plain
    header = SampleMeta("p", prefix="a" * 64, prefix_tokens=20).to_header()
    back = SampleMeta.from_header(header)
    assert (back.prefix, back.prefix_tokens) == ("a" * 64, 20)
    assert SampleMeta.from_header({**header, "prefix_tokens": "x"}).prefix_tokens == -1


# --- end to end: a few-shot run with every token kept ------------------------------------------

MMLU_FILE = DATA / "mmlu" / "test" / "high_school_geography_test.csv"
GSM8K_FILE = DATA / "gsm8k" / "test.jsonl"


def _run(tiny_lm, out, *, share=True, storage="files", few_shot=3, n=6, bench=None, **kw):
    bench = bench or load_benchmark(f"mmlu:{MMLU_FILE}").limited(n)
    return run_benchmark(
        tiny_lm,
        bench,
        capture=CaptureSpec(layers=[0, 1], token_selection="all"),
        options=EvalOptions(few_shot=few_shot, batch_size=4, share_prefixes=share),
        out=out,
        progress=False,
        storage=storage,
        verify=0,
        **kw,
    )


def _loaded(out):
    info = open_run(out)
    return {e.id: load_activations(p) for e, p in info.sample_paths()}


def _size(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("storage", ["files", "shards"])
def test_a_few_shot_run_stores_the_shared_prefix_once_and_reads_whole(tiny_lm, tmp_path, storage):
    _run(tiny_lm, tmp_path / "prefixed", storage=storage)
    _run(tiny_lm, tmp_path / "whole", share=False, storage=storage)
    prefixes = list((tmp_path / "prefixed" / PREFIXES).iterdir())
    assert len(prefixes) == 1  # one subject: one prefix, written once
    assert not (tmp_path / "whole" / PREFIXES).exists()
    assert _size(tmp_path / "prefixed") < 0.6 * _size(tmp_path / "whole")
    shared, whole = _loaded(tmp_path / "prefixed"), _loaded(tmp_path / "whole")
    assert shared.keys() == whole.keys()
    for qid, data in shared.items():
        assert set(data) == set(whole[qid])  # the seed dictionary is unchanged
        assert int(data["metadata"]["prefix_tokens"]) > 16
        torch.testing.assert_close(data["input_ids"], whole[qid]["input_ids"])
        for site, t in whole[qid]["activations"].items():
            assert data["activations"][site].shape == t.shape
            torch.testing.assert_close(data["activations"][site], t, atol=1e-4, rtol=1e-4)
    lines = [e.record for e in open_run(tmp_path / "prefixed").entries]
    assert all(is_prefix_key(r.get("prefix")) for r in lines)


def test_a_lone_file_says_where_its_prefix_is(tiny_lm, tmp_path):
    _run(tiny_lm, tmp_path / "r")
    sample = next((tmp_path / "r" / "samples").iterdir())
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(sample.read_bytes())
    with pytest.raises(FormatError, match="prefix"):
        load_activations(lone)
    # Saved as a file of its own, a sample holds every row and leans on nothing.
    with ActivationFile(sample) as f:
        whole = dict(f.iter_sites())
        save_activations(tmp_path / "own.safetensors", whole, f.meta, input_ids=f.get("input_ids"))
    own = load_activations(tmp_path / "own.safetensors")
    assert "prefix" not in own["metadata"]
    for site, t in whole.items():
        assert torch.equal(own["activations"][site], t)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_prefix_is_reported_naming_its_samples_and_redone_on_resume(
    tiny_lm, tmp_path, damage
):
    out = tmp_path / "r"
    _run(tiny_lm, out)
    (prefix,) = (out / PREFIXES).iterdir()
    if damage == "missing":
        prefix.unlink()
    else:
        prefix.write_bytes(prefix.read_bytes()[:100])
    entry, path = next(iter(open_run(out).sample_paths()))
    with pytest.raises(FormatError, match="prefix") as e:
        load_activations(path)
    assert "resume" in str(e.value)
    from actcap.analysis import directory_summary

    skipped = directory_summary(out).skipped.files
    assert len(skipped) == 6 and all("shared prefix" in why for _, why in skipped)
    with pytest.warns(UserWarning, match="prefix"):
        _run(tiny_lm, out, resume=True)
    assert len(_loaded(out)) == 6  # every sample redone and whole again


def test_the_prefix_is_durable_before_the_first_sample_that_needs_it(tiny_lm, tmp_path):
    out = tmp_path / "r"
    seen = []

    def check(entry):
        if entry.file is not None:
            key = entry.record["prefix"]
            seen.append((out / PREFIXES / f"{key}.safetensors").is_file())
            raise KeyboardInterrupt  # a crash right after the first sample

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_lm, out, on_sample=check)
    assert seen == [True]
    assert len(_loaded(out)) == 1
    _run(tiny_lm, out, resume=True)
    assert len(_loaded(out)) == 6


def test_no_prefix_for_last_token_or_without_shared_tokens(tiny_lm, tmp_path):
    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(4)
    run_benchmark(
        tiny_lm,
        bench,
        capture=CaptureSpec(layers=[0], token_selection="last"),
        options=EvalOptions(few_shot=3, batch_size=4),
        out=tmp_path / "last",
        progress=False,
        verify=0,
    )
    assert not (tmp_path / "last" / PREFIXES).exists()
    distinct = Benchmark(
        "distinct",
        [
            Question(id=f"d{i}", question=text, answer="x")
            for i, text in enumerate(["Paris is a city.", "2 + 2 = ?", "The quick brown fox."])
        ],
    )
    _run(tiny_lm, tmp_path / "distinct", bench=distinct, few_shot=0)
    assert not (tmp_path / "distinct" / PREFIXES).exists()
    assert all("prefix" not in d["metadata"] for d in _loaded(tmp_path / "distinct").values())


def test_analysis_export_and_verify_read_prefixed_samples_whole(tiny_lm, tmp_path):
    out = tmp_path / "r"
    result = _run(tiny_lm, out)
    from actcap.analysis import directory_summary
    from actcap.bench.verify import verify_run

    summary = directory_summary(out)
    assert summary is not None
    report = verify_run(out, tiny_lm, n=6)
    assert report.passed, report.problems
    assert result.n == 6


def test_a_run_at_a_url_stores_its_prefix_once_and_reads_whole(tiny_lm, tmp_path):
    import uuid

    import fsspec

    url = f"memory://actcap-prefix-{uuid.uuid4().hex[:8]}/run"
    try:
        _run(tiny_lm, url, storage="shards")
        _run(tiny_lm, tmp_path / "whole", share=False)
        fs = fsspec.filesystem("memory")
        assert len(fs.ls(f"{url.removeprefix('memory://')}/{PREFIXES}")) == 1
        shared, whole = _loaded(url), _loaded(tmp_path / "whole")
        assert shared.keys() == whole.keys()
        for qid, data in shared.items():
            for site, t in whole[qid]["activations"].items():
                torch.testing.assert_close(data["activations"][site], t, atol=1e-4, rtol=1e-4)
        fs.rm(f"{url.removeprefix('memory://')}/{PREFIXES}", recursive=True)
        with pytest.warns(UserWarning, match="shared prefix"):
            _run(tiny_lm, url, storage="shards", resume=True)
        assert len(_loaded(url)) == 6
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(url.removeprefix("memory://")):
            fs.rm(url.removeprefix("memory://"), recursive=True)


def test_the_fast_whole_run_reader_joins_the_prefix_rows(tiny_lm, tmp_path, monkeypatch):
    from actcap.data import reader

    _run(tiny_lm, tmp_path / "prefixed")
    _run(tiny_lm, tmp_path / "whole", share=False)
    whole = _loaded(tmp_path / "whole")

    def no_fallback(*args, **kwargs):
        raise AssertionError("a local prefixed file took the slow path")

    monkeypatch.setattr(reader, "_file_arrays", no_fallback)
    files = reader.ShardFiles()
    for entry, source in open_run(tmp_path / "prefixed").sample_paths():
        names, arrays = reader.read_arrays(source, None, files)
        assert names == list(whole[entry.id]["activations"])
        for site, t in whole[entry.id]["activations"].items():
            torch.testing.assert_close(
                torch.from_numpy(arrays[site].copy()), t, atol=1e-4, rtol=1e-4
            )
    files.close()


# --- a prefix that is not what its name says, or not where it should be ------------------------


def _rewrite_prefix(path, **change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata()
    for k, v in change.items():
        if callable(v):
            tensors[k] = v(tensors[k])
        else:
            meta[k] = v
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "change",
    [
        {"layer_0": lambda t: t[:-3]},  # cut to fewer rows
        {"input_ids": lambda t: torch.zeros_like(t)},  # other tokens
        {"model": "other-model"},
        {"prefix": "b" * 64, "prefix_tokens": "5"},  # a prefix leaning on a prefix
    ],
    ids=["rows", "tokens", "model", "nested"],
)
def test_a_prefix_that_is_not_the_one_its_key_names_is_refused_and_redone(
    tiny_lm, tmp_path, change
):
    out = tmp_path / "r"
    _run(tiny_lm, out, n=4)
    (prefix,) = (out / PREFIXES).iterdir()
    _rewrite_prefix(prefix, **change)
    _, source = next(iter(open_run(out).sample_paths()))
    with pytest.raises(FormatError, match="shared prefix"):
        load_activations(source)
    with pytest.warns(UserWarning, match="shared prefix"):
        _run(tiny_lm, out, n=4, resume=True)
    assert len(_loaded(out)) == 4


def test_a_sample_outside_samples_or_shards_never_reads_a_prefix_beyond_its_run(tiny_lm, tmp_path):
    import json
    import shutil

    out = tmp_path / "par" / "run"
    _run(tiny_lm, out, n=4)
    # the parent folder gets a prefixes/ of its own, and a manifest line points at the run root
    shutil.copytree(out / PREFIXES, tmp_path / "par" / PREFIXES)
    entry = open_run(out).entries[0]
    shutil.copy(out / entry.file, out / "x.safetensors")
    shutil.rmtree(out / PREFIXES)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["file"] = "x.safetensors"
    (out / "manifest.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(FormatError, match="outside a run's samples/ or shards/"):
        load_activations(out, sample_id=entry.id)


def test_a_fifo_as_prefix_blocks_nothing(tiny_lm, tmp_path):
    import signal

    out = tmp_path / "r"
    _run(tiny_lm, out, n=4)
    (prefix,) = (out / PREFIXES).iterdir()
    prefix.unlink()
    os.mkfifo(prefix)
    signal.alarm(120)  # a blocked open would hang the suite: fail it instead
    try:
        _, source = next(iter(open_run(out).sample_paths()))
        with pytest.raises(FormatError, match="shared prefix"):
            load_activations(source)
        from actcap.analysis import directory_summary

        assert len(directory_summary(out).skipped) == 4
        with pytest.warns(UserWarning, match="shared prefix"):
            _run(tiny_lm, out, n=4, resume=True)
    finally:
        signal.alarm(0)
    assert len(_loaded(out)) == 4


def test_a_scalar_site_in_a_prefixed_sample_is_a_format_error(tmp_path):
    from actcap.storage import ActivationFile, save_activations

    path = tmp_path / "samples" / "s.safetensors"
    path.parent.mkdir()
    save_activations(path, {"layer_0": torch.tensor(1.0)}, SampleMeta("p"))
    _rewrite_prefix(path, prefix="a" * 64, prefix_tokens="5")
    with pytest.raises(FormatError, match="corrupt header"):
        ActivationFile(path)


def test_the_prefix_does_not_depend_on_limit_or_resume(tiny_lm, tmp_path):
    bench = load_benchmark(f"mmlu:{MMLU_FILE}")

    def run(out, limit, resume=False):
        run_benchmark(
            tiny_lm,
            bench,
            capture=CaptureSpec(layers=[0], token_selection="all"),
            options=EvalOptions(few_shot=3, batch_size=4, limit=limit),
            out=out,
            resume=resume,
            progress=False,
            verify=0,
        )

    run(tmp_path / "r", 3)
    run(tmp_path / "r", 6, resume=True)  # three more questions of the same subject
    assert len(list((tmp_path / "r" / PREFIXES).iterdir())) == 1  # the same prefix: stored once
    run(tmp_path / "other", 2)
    assert {p.name for p in (tmp_path / "r" / PREFIXES).iterdir()} == {
        p.name for p in (tmp_path / "other" / PREFIXES).iterdir()
    }


@pytest.mark.parametrize("batch_size", [None, 7])
def test_the_dataset_gives_a_prefixed_run_as_the_whole_run(tiny_lm, tmp_path, batch_size):
    from actcap.data import ActivationDataset

    _run(tiny_lm, tmp_path / "prefixed")
    _run(tiny_lm, tmp_path / "whole", share=False)

    def rows(run):
        ds = ActivationDataset(
            run,
            sites=["layer_0", "layer_1"],
            labels=["id", "position", "token_id"],
            batch_size=batch_size,
        )
        out = []
        for item in ds:
            if batch_size is None:
                out.append(
                    (item["id"], item["position"], item["token_id"], item["x"]["layer_0"].clone())
                )
                item["x"]["layer_0"] += 1000.0  # a reader writing into what it got changes nothing
            else:
                for j in range(len(item["id"])):
                    out.append(
                        (
                            item["id"][j],
                            int(item["position"][j]),
                            int(item["token_id"][j]),
                            item["x"]["layer_1"][j],
                        )
                    )
        return out

    shared, whole = rows(tmp_path / "prefixed"), rows(tmp_path / "whole")
    assert [r[:3] for r in shared] == [r[:3] for r in whole]
    for a, b in zip(shared, whole, strict=True):
        torch.testing.assert_close(a[3], b[3], atol=1e-4, rtol=1e-4)
    again = rows(tmp_path / "prefixed")  # the kept prefix rows were not written through
    for a, b in zip(again, shared, strict=True):
        assert torch.equal(a[3], b[3])


def test_a_prefix_swapped_for_a_link_out_of_the_run_is_refused_after_a_good_read(tiny_lm, tmp_path):
    """The check that a prefix lies inside its run runs once per version of the file: a link put
    in its place later (another file) is checked again, and refused."""
    out = tmp_path / "r"
    _run(tiny_lm, out)
    (prefix,) = (out / PREFIXES).iterdir()
    from actcap.data import reader

    entry, path = next(iter(open_run(out).sample_paths()))
    good = reader.read_arrays(path, None, reader.ShardFiles())[1]["layer_0"]  # checked, kept
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(prefix.read_bytes())
    prefix.unlink()
    prefix.symlink_to(outside)
    with pytest.raises(FormatError, match="prefix"):
        load_activations(path)
    for lazy in (False, True):
        with pytest.raises(FormatError, match="prefix"):
            reader.read_arrays(path, None, reader.ShardFiles(), lazy=lazy)
    assert good.shape[0] > 0


def test_a_prefix_link_to_a_file_checked_in_another_run_is_refused(tiny_lm, tmp_path, monkeypatch):
    """Run B, read by the same relative path as run A before it, has its prefix as a link to A's
    (the file the check let through for A): B's is checked again, and refused."""
    from actcap.data import reader

    def fast(path):
        return reader.read_arrays(path, None, reader.ShardFiles(), lazy=True)

    _run(tiny_lm, tmp_path / "a" / "run")
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    (prefix,) = (tmp_path / "b" / "run" / PREFIXES).iterdir()
    prefix.unlink()
    prefix.symlink_to(tmp_path / "a" / "run" / PREFIXES / prefix.name)
    monkeypatch.chdir(tmp_path / "a")
    first = next(iter(open_run("run").sample_paths()))[1]
    assert fast(first)[1]["layer_0"].shape[0] > 0  # A's prefix checked, and kept
    monkeypatch.chdir(tmp_path / "b")
    again = next(iter(open_run("run").sample_paths()))[1]
    with pytest.raises(FormatError, match="leads out of the run"):
        fast(again)
    # the prefixes folder a link to A's: refused the same way
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(tmp_path / "b" / "run" / PREFIXES)
    (tmp_path / "b" / "run" / PREFIXES).symlink_to(tmp_path / "a" / "run" / PREFIXES)
    with pytest.raises(FormatError, match="leads out of the run"):
        fast(tmp_path / "b" / again)


@pytest.mark.parametrize("storage", ["files", "shards"])
@pytest.mark.parametrize("batch_size", [None, 5])
def test_the_dataset_can_leave_out_the_shared_prefix_rows(tiny_lm, tmp_path, storage, batch_size):
    from actcap.data import ActivationDataset

    out = tmp_path / "prefixed"
    _run(tiny_lm, out, storage=storage)
    want = []  # (id, position, row) of each sample's own rows, from load_activations
    for e, path in open_run(out).sample_paths():
        data = load_activations(path)
        k = int(data["metadata"]["prefix_tokens"])
        assert k > 16
        x = data["activations"]["layer_1"]
        want += [(e.id, p, x[p]) for p in range(k, x.shape[0])]
    ds = ActivationDataset(
        out,
        sites=["layer_1"],
        labels=["id", "position"],
        batch_size=batch_size,
        shared_prefix=False,
    )
    got = []
    for item in ds:
        if batch_size is None:
            got.append((item["id"], item["position"], item["x"]))
        else:
            got += [
                (item["id"][j], int(item["position"][j]), item["x"][j])
                for j in range(len(item["id"]))
            ]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g[2], w[2], rtol=0, atol=0)
    assert ds.num_rows() == len(want)
    samples = ActivationDataset(out, sites=["layer_1"], rows="samples", shared_prefix=False)
    own = Counter(w[0] for w in want)
    for row, e in zip(samples, open_run(out).entries, strict=True):
        assert row["x"].shape[0] == own[e.id]
    assert len(ActivationDataset(out, sites=["layer_1"]).samples) == len(own)


def test_a_prefix_through_a_link_inside_the_run_is_checked_every_time(tiny_lm, tmp_path):
    """A prefix that is a link to a folder inside the run reads; once that folder becomes a link
    out of the run, the same process refuses it (the link is followed anew, not cached)."""
    from actcap.data import reader

    out = tmp_path / "run"
    _run(tiny_lm, out)
    (prefix,) = (out / PREFIXES).iterdir()
    (out / "inner").mkdir()
    prefix.rename(out / "inner" / prefix.name)
    prefix.symlink_to(Path("..") / "inner" / prefix.name)
    path = next(iter(open_run(out).sample_paths()))[1]
    fast = reader.read_arrays(path, None, reader.ShardFiles(), lazy=True)[1]
    assert fast["layer_0"].shape[0] > 0 or "layer_0@prefix" in fast
    shutil.move(out / "inner", tmp_path / "inner")
    (out / "inner").symlink_to(tmp_path / "inner")
    with pytest.raises(FormatError, match="leads out of the run"):
        reader.read_arrays(path, None, reader.ShardFiles(), lazy=True)


def test_num_rows_leaves_out_samples_whose_prefix_is_missing(tiny_lm, tmp_path):
    from actcap.data import ActivationDataset

    out = tmp_path / "run"
    _run(tiny_lm, out)
    shutil.rmtree(out / PREFIXES)
    for shared in (True, False):
        ds = ActivationDataset(out, sites=["layer_0"], shared_prefix=shared, warn_skipped=False)
        assert ds.num_rows() == 0 == sum(1 for _ in ds)


@pytest.mark.parametrize("value", ["false", 0, None, [], 1])
def test_shared_prefix_takes_a_bool_only(tiny_lm, tmp_path, value):
    from actcap.data import ActivationDataset
    from actcap.errors import UnknownNameError

    out = tmp_path / "run"
    _run(tiny_lm, out, n=2)
    with pytest.raises(UnknownNameError, match="shared_prefix"):
        ActivationDataset(out, shared_prefix=value)
