"""ActivationDataset: a run streamed into PyTorch (files, shards, URLs; workers, ranks, shuffling)."""

import json
import math
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec
from actcap.data import ActivationDataset
from actcap.errors import ActcapError, FormatError, NoActivationsError, UnknownNameError
from actcap.storage import load_activations, open_run
from tests.conftest import DATA

MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"
ROOT = Path(__file__).resolve().parents[1]
N = 10


def make_run(
    lm, out, selection="all", storage="files", capture=True, dtype="float32", options=None, **kw
):
    bench = load_benchmark(f"mmlu:{MMLU}").limited(N)
    spec = CaptureSpec(layers=[0, 1], token_selection=selection, dtype=dtype) if capture else None
    run_benchmark(
        lm,
        bench,
        capture=spec,
        options=options or EvalOptions(batch_size=4),
        out=out,
        progress=False,
        storage=storage,
        **kw,
    )
    return out


@pytest.fixture(scope="module")
def files_run(tiny_lm, tmp_path_factory):
    return make_run(tiny_lm, tmp_path_factory.mktemp("ds") / "files")


@pytest.fixture(scope="module")
def shards_run(tiny_lm, tmp_path_factory):
    return make_run(tiny_lm, tmp_path_factory.mktemp("ds") / "shards", storage="shards")


@pytest.fixture(scope="module")
def last_run(tiny_lm, tmp_path_factory):
    return make_run(tiny_lm, tmp_path_factory.mktemp("ds") / "last", selection="last")


def expected_rows(run, site="layer_1"):
    """(sample id, position, token id, vector) of every stored token, from load_activations."""
    rows = []
    for e in open_run(run).entries:
        data = load_activations(run, sample_id=e.id)
        x = data["activations"][site]
        ids = data["input_ids"].reshape(-1).tolist()
        if x.dim() == 1:
            rows.append((e.id, -1, -1, x))
            continue
        for p in range(x.shape[0]):
            rows.append((e.id, p, ids[p] if p < len(ids) else -1, x[p]))
    return rows


def key(row):
    return (row["id"], int(row["position"]))


@pytest.mark.parametrize("which", ["files_run", "shards_run"])
def test_token_rows_and_labels_match_the_run(which, request):
    run = request.getfixturevalue(which)
    labels = ["correct", "category", "question_id", "id", "position", "token_id", "score"]
    ds = ActivationDataset(run, sites=["layer_1"], labels=labels)
    got = list(ds)
    want = expected_rows(run)
    assert len(got) == len(want) == ds.num_rows()
    records = {e.id: e.record for e in open_run(run).entries}
    for row, (sid, pos, tok, vec) in zip(got, want, strict=True):
        assert (row["id"], row["question_id"], row["position"], row["token_id"]) == (
            sid,
            sid,
            pos,
            tok,
        )
        rec = records[sid]
        assert row["correct"] == int(rec["correct"]) and row["category"] == rec["category"]
        assert row["score"] == pytest.approx(rec["score"])
        assert row["x"].dtype == torch.float32 and torch.equal(row["x"], vec.float())


def test_samples_rows_and_several_sites(shards_run):
    ds = ActivationDataset(shards_run, sites=["layer_0", "layer_1"], rows="samples", labels=["id"])
    rows = list(ds)
    assert [r["id"] for r in rows] == [e.id for e in open_run(shards_run).entries]
    first = load_activations(shards_run, sample_id=rows[0]["id"])["activations"]
    assert set(rows[0]["x"]) == {"layer_0", "layer_1"}
    assert torch.equal(rows[0]["x"]["layer_0"], first["layer_0"])
    assert rows[0]["x"]["layer_1"].dim() == 2


def test_last_token_runs_give_one_row_per_sample(last_run):
    tokens = list(ActivationDataset(last_run, sites=["layer_1"], labels=["position", "token_id"]))
    assert len(tokens) == N and {r["position"] for r in tokens} == {-1}
    samples = list(ActivationDataset(last_run, sites=["layer_1"], rows="samples"))
    assert [r["x"].shape for r in samples] == [torch.Size([tokens[0]["x"].shape[0]])] * N
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(tokens, samples, strict=True))


def test_dataloader_with_two_workers_reads_every_row_once(files_run):
    ds = ActivationDataset(files_run, sites=["layer_1"], labels=["id", "position", "correct"])
    loader = DataLoader(ds, batch_size=16, num_workers=2)
    seen = Counter()
    for batch in loader:
        assert batch["x"].shape[1:] == (ds_hidden(files_run),)
        assert batch["correct"].dtype == torch.int64
        seen.update(zip(batch["id"], batch["position"].tolist(), strict=True))
    want = Counter((sid, pos) for sid, pos, _, _ in expected_rows(files_run))
    assert seen == want and max(seen.values()) == 1


def ds_hidden(run):
    e = open_run(run).entries[0]
    return load_activations(run, sample_id=e.id)["activations"]["layer_1"].shape[-1]


def _rows_of_split(run, rank, world, workers, **kw):
    """Rows read by (rank, each worker), as a worker would read them."""
    out = []
    for w in range(workers):
        ds = ActivationDataset(
            run, sites=["layer_1"], labels=["id", "position"], rank=rank, world_size=world, **kw
        )
        info = type("Info", (), {"id": w, "num_workers": workers})()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("actcap.data.dataset.get_worker_info", lambda info=info: info)
            out.append([key(r) for r in ds])
    return out


@pytest.mark.parametrize("shuffle", [0, 7])
def test_two_ranks_by_two_workers_read_every_row_exactly_once(shards_run, shuffle):
    parts = [
        p for rank in (0, 1) for p in _rows_of_split(shards_run, rank, 2, 2, shuffle_buffer=shuffle)
    ]
    assert all(parts), "every (rank, worker) gets samples"
    ids = [{sid for sid, _ in p} for p in parts]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not ids[a] & ids[b], "a sample read by two (rank, worker) pairs"
    union = Counter(k for p in parts for k in p)
    want = Counter((sid, pos) for sid, pos, _, _ in expected_rows(shards_run))
    assert union == want and max(union.values()) == 1


def test_rank_from_torch_distributed(files_run, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)
    ds = ActivationDataset(files_run, sites=["layer_1"], rows="samples", labels=["sample_index"])
    assert [r["sample_index"] for r in ds] == list(range(1, N, 3))


def test_shuffle_is_deterministic_bounded_and_changes_with_epoch(files_run, monkeypatch):
    def order(seed, epoch=0, buffer=25):
        ds = ActivationDataset(
            files_run,
            sites=["layer_1"],
            labels=["id", "position"],
            shuffle_buffer=buffer,
            seed=seed,
        )
        ds.set_epoch(epoch)
        return [key(r) for r in ds]

    plain = [
        key(r) for r in ActivationDataset(files_run, sites=["layer_1"], labels=["id", "position"])
    ]
    a, b = order(0), order(0)
    assert a == b and sorted(a) == sorted(plain) and a != plain
    assert order(1) != a and order(0, epoch=1) != a
    # Bounded: the buffer never holds more than shuffle_buffer rows.
    import actcap.data.blocks as mod

    peak = []
    real = mod._Buffer.append

    def watch(self, part):
        real(self, part)
        peak.append(self.count)
        assert len(self.data) <= self.limit

    monkeypatch.setattr(mod._Buffer, "append", watch)
    order(0, buffer=25)
    assert max(peak) == 25


def test_batches_hold_the_same_rows(files_run):
    plain = list(
        ActivationDataset(files_run, sites=["layer_1"], labels=["id", "position", "correct"])
    )
    ds = ActivationDataset(
        files_run, sites=["layer_1"], labels=["id", "position", "correct"], batch_size=32
    )
    batches = list(DataLoader(ds, batch_size=None))
    assert [len(b["id"]) for b in batches[:-1]] == [32] * (len(batches) - 1)
    x = torch.cat([b["x"] for b in batches])
    assert torch.equal(x, torch.stack([r["x"] for r in plain]))
    assert torch.cat([b["correct"] for b in batches]).tolist() == [r["correct"] for r in plain]


def test_dtype_is_the_one_asked_for(files_run):
    for dtype, want in [
        (None, torch.float32),
        ("bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
    ]:
        row = next(iter(ActivationDataset(files_run, sites=["layer_1"], dtype=dtype)))
        assert row["x"].dtype == want
    with pytest.raises(UnknownNameError, match="float32"):
        ActivationDataset(files_run, dtype="int8")


def test_ungraded_samples_have_correct_minus_one(tiny_lm, tmp_path):
    run = make_run(tiny_lm, tmp_path / "run")
    manifest = run / "manifest.jsonl"
    manifest.write_text(
        manifest.read_text()
        .replace('"correct": true', '"correct": null')
        .replace('"correct": false', '"correct": null')
    )
    rows = list(
        DataLoader(ActivationDataset(run, sites=["layer_1"], labels=["correct"]), batch_size=64)
    )
    assert set(torch.cat([b["correct"] for b in rows]).tolist()) == {-1}


def test_errors_are_one_line_and_name_what_to_do(files_run, tiny_lm, tmp_path):
    with pytest.raises(FormatError, match="not a run directory"):
        ActivationDataset(tmp_path)
    with pytest.raises(UnknownNameError, match=r"no site 'layer_9'.*Sites: .*layer_0, layer_1"):
        ActivationDataset(files_run, sites=["layer_9"])
    with pytest.raises(UnknownNameError, match=r"'grade'.*Labels: correct, score, category"):
        ActivationDataset(files_run, labels=["grade"])
    with pytest.raises(UnknownNameError, match="token_id"):  # a token's label, not a sample's
        ActivationDataset(files_run, rows="samples", labels=["token_id"])
    with pytest.raises(ActcapError, match="rank"):
        ActivationDataset(files_run, rank=2, world_size=2)
    bare = make_run(tiny_lm, tmp_path / "bare", capture=False)
    with pytest.raises(NoActivationsError, match="--no-capture") as e:
        ActivationDataset(bare)
    assert "\n" not in str(e.value)


def test_a_run_at_an_fsspec_url(tiny_lm, files_run):
    url = f"memory://actcap-ds-{uuid.uuid4().hex[:8]}/run"
    try:
        make_run(tiny_lm, url, storage="shards")
        got = [
            (r["id"], r["position"], r["x"])
            for r in ActivationDataset(url, sites=["layer_1"], labels=["id", "position"])
        ]
        assert [(a, b) for a, b, _ in got] == [(s, p) for s, p, _, _ in expected_rows(url)]
        want = {(s, p): x for s, p, _, x in expected_rows(files_run)}
        assert len(got) == len(want)
        assert all(torch.allclose(x, want[s, p]) for s, p, x in got)
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_import_actcap_does_not_import_the_dataset():
    code = "import sys, actcap, actcap.data; print('actcap.data.dataset' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_train_sae_example_runs(files_run):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_sae.py"),
            "--run",
            str(files_run),
            "--site",
            "layer_1",
            "--steps",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    losses = [float(m) for m in re.findall(r"loss ([0-9.e+-]+|nan|inf)", out.stdout)]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("how", ["last", "mean"])
def test_probe_reads_a_run_through_the_dataset_with_the_same_results(
    files_run, monkeypatch, how, tmp_path
):
    pytest.importorskip("sklearn")
    run = tmp_path / "run"
    shutil.copytree(files_run, run)  # with both grades, so that a probe has two classes
    lines = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        line["correct"] = i % 2 == 0
    (run / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    from actcap.analysis import load_vectors, probe_layers

    old = load_vectors(run, ["layer_0", "layer_1"], how)
    new = load_vectors(run, ["layer_0", "layer_1"], how, dataset=True)
    assert [s.id for s in new.samples] == [s.id for s in old.samples]
    assert [s.record for s in new.samples] == [s.record for s in old.samples]
    for site in ("layer_0", "layer_1"):
        np.testing.assert_array_equal(new.vectors[site], old.vectors[site])
    assert new.mean_norms == pytest.approx(old.mean_norms, rel=1e-12)

    import actcap.data.dataset as mod

    reads = []
    real = mod.ActivationDataset.__iter__
    monkeypatch.setattr(
        mod.ActivationDataset, "__iter__", lambda self: (reads.append(self.rows), real(self))[1]
    )
    results = probe_layers(run, "correct", how=how, folds=2)
    assert reads == ["samples"]
    monkeypatch.setattr(mod.ActivationDataset, "__iter__", real)
    assert results == probe_layers(run, "correct", how=how, folds=2, vectors=old)


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_half_precision_runs_read_as_load_activations_does(tiny_lm, tmp_path, stored):
    run = make_run(tiny_lm, tmp_path / "run", dtype=stored)
    got = list(ActivationDataset(run, sites=["layer_1"], rows="samples", labels=["id"]))
    assert len(got) == N
    for row in got:
        want = load_activations(run, sample_id=row["id"])["activations"]["layer_1"]
        assert row["x"].dtype == torch.float32 and torch.equal(row["x"], want.float())


def test_a_sample_of_another_width_is_skipped(files_run, tmp_path):
    """One sample re-saved as [183, 16] among [n, 32] ones: batches and the buffer skip it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(files_run, run)
    entry, path = list(open_run(run).sample_paths())[3]
    with safe_open(str(path), framework="pt") as f:
        meta, ids = f.metadata(), f.get_tensor("input_ids")
    meta = {k: v for k, v in meta.items() if k not in ("prefix", "prefix_tokens")}
    odd = {"layer_0": torch.zeros(183, 32), "layer_1": torch.randn(183, 16), "input_ids": ids}
    save_file(odd, str(path), metadata=meta)
    want = Counter((s, p) for s, p, _, _ in expected_rows(files_run) if s != entry.id)
    for kw in ({"batch_size": 64}, {"shuffle_buffer": 100}, {"rows": "samples"}):
        ds = ActivationDataset(run, sites=["layer_1"], labels=["id"], **kw)
        with pytest.warns(UserWarning, match=r"skipped.*\[183, 16\]"):
            if "batch_size" in kw:
                rows = [r for b in ds for r in zip(b["id"], b["x"], strict=True)]
            else:
                rows = [(r["id"], r["x"]) for r in ds]
        assert [sid for sid, _ in ds.skipped] == [entry.id]
        assert {sid for sid, _ in rows} == {s for s, _ in want}
        if "rows" not in kw:
            assert len(rows) == sum(want.values()) and all(x.shape == (32,) for _, x in rows)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"seed": -1, "shuffle_buffer": 10}, "seed=-1"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"shuffle_buffer": "10"}, "shuffle_buffer='10'"),
        ({"shuffle_buffer": -3}, "shuffle_buffer=-3"),
        ({"rank": 0.5, "world_size": 2}, "rank=0.5"),
        ({"rank": 0, "world_size": "2"}, "world_size='2'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 2.0}, "batch_size=2.0"),
        ({"batch_size": True}, "batch_size=True"),
    ],
)
def test_bad_arguments_fail_at_construction(files_run, kw, match):
    with pytest.raises(UnknownNameError, match=re.escape(match)) as e:
        ActivationDataset(files_run, sites=["layer_1"], **kw)
    assert "\n" not in str(e.value)
