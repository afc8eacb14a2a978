"""How the dataset's batches are filled: rows read from their file straight into the batch, and a
batch's memory filled again only once nothing outside holds it."""

import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch

from actcap.bench import EvalOptions
from actcap.data import ActivationDataset
from actcap.data.blocks import BatchMemory, Block, batched
from actcap.data.filerows import FileRows
from actcap.data.reader import ShardFiles, read_arrays
from actcap.errors import FormatError
from actcap.storage import ActivationFile, open_run
from tests.test_dataset import expected_rows, make_run

CPYTHON = sys.implementation.name == "cpython"


@pytest.fixture(scope="module")
def run(tiny_lm, tmp_path_factory):
    """A run whose samples hold every row of their own (copies of them read alone)."""
    return make_run(
        tiny_lm,
        tmp_path_factory.mktemp("mem") / "files",
        options=EvalOptions(batch_size=4, share_prefixes=False),
    )


def first_sample(run):
    entry, path = next(iter(open_run(run).sample_paths()))
    return entry, path


def test_a_local_sample_gives_rows_still_in_their_file(run):
    _, path = first_sample(run)
    files = ShardFiles()
    _, arrays = read_arrays(path, ["layer_1", "input_ids"], files, lazy=True)
    rows = arrays["layer_1"]
    assert isinstance(rows, FileRows)
    assert isinstance(arrays["input_ids"], np.ndarray)  # token ids are read at once
    with ActivationFile(path) as f:
        want = f.get("layer_1").numpy()
    assert rows.shape == want.shape and rows.dtype == want.dtype
    np.testing.assert_array_equal(rows.numpy(), want)
    np.testing.assert_array_equal(rows[2:5].numpy(), want[2:5])
    np.testing.assert_array_equal(rows[3:].numpy(), want[3:])
    assert rows[5:2].shape[0] == 0
    flat = rows.reshape(-1)
    assert flat.shape == (want.size,)
    np.testing.assert_array_equal(rows.astype(np.float64).numpy(), want.astype(np.float64))
    out = np.full((3, *want.shape[1:]), 7.0, np.float32)
    rows[1:4].read_into(out)
    np.testing.assert_array_equal(out, want[1:4])
    with pytest.raises(TypeError):
        rows[np.array([0, 2])]  # a selection is read first, then indexed
    # the eager read of the same sample is unchanged
    _, eager = read_arrays(path, ["layer_1"], files)
    np.testing.assert_array_equal(eager["layer_1"], want)


def test_a_file_replaced_after_its_header_was_read_is_read_as_it_was(run, tmp_path):
    entries = list(open_run(run).sample_paths())
    (_, path), (_, other) = entries[0], entries[1]
    copy = tmp_path / "sample.safetensors"
    shutil.copyfile(path, copy)
    _, arrays = read_arrays(copy, ["layer_1"], ShardFiles(), lazy=True)
    want = load_site(copy)
    replacement = tmp_path / "other.safetensors"
    shutil.copyfile(other, replacement)
    os.replace(replacement, copy)  # as a resume rewrites a sample: an atomic rename
    np.testing.assert_array_equal(arrays["layer_1"].numpy(), want)


def test_a_file_cut_short_while_read_is_an_error_naming_it(run, tmp_path):
    _, path = first_sample(run)
    copy = tmp_path / "sample.safetensors"
    shutil.copyfile(path, copy)
    _, arrays = read_arrays(copy, ["layer_1"], ShardFiles(), lazy=True)
    rows = arrays["layer_1"]
    os.truncate(copy, rows.offset + 8)
    with pytest.raises(FormatError, match=r"sample\.safetensors.*cut short"):
        rows.numpy()


def load_site(path, site="layer_1"):
    with ActivationFile(path) as f:
        return f.get(site).numpy()


def test_batches_equal_the_run_with_rows_read_into_them(run):
    want = torch.stack([r[3] for r in expected_rows(run)])
    for size in (1, 3, 64, 10_000):
        ds = ActivationDataset(run, sites=["layer_1"], batch_size=size)
        got = torch.cat([b["x"] for b in ds])
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not CPYTHON, reason="memory is filled again only where refcounts say so")
def test_a_held_batch_is_never_written_and_a_dropped_ones_memory_is_used_again(run):
    ds = ActivationDataset(run, sites=["layer_1"], labels=["position"], batch_size=4)
    held, copies, seen = [], [], []
    for i, batch in enumerate(ds):
        seen.append(batch["x"].data_ptr())
        if i % 2 == 0:  # keep every other batch, as a training loop keeping some would
            held.append(batch)
            copies.append({k: v.clone() for k, v in batch.items()})
    assert len(held) >= 3
    for batch, copy in zip(held, copies, strict=True):
        for k in copy:
            torch.testing.assert_close(batch[k], copy[k], rtol=0, atol=0)
    held_ptrs = {b["x"].data_ptr() for b in held}
    assert len(held_ptrs) == len(held)  # every held batch has memory of its own
    assert len(set(seen)) < len(seen)  # the dropped batches' memory was filled again
    again = [b["x"].data_ptr() for b in ds]  # the next epoch uses the kept memory too
    assert set(again) & (set(seen) - held_ptrs)


@pytest.mark.skipif(not CPYTHON, reason="memory is filled again only where refcounts say so")
def test_a_view_or_array_of_a_batch_keeps_it_from_being_filled_again():
    memory = BatchMemory(keep=2)
    blocks = [Block({"x": np.full((2, 3), float(i))}, {"n": np.full(2, i)}) for i in range(12)]
    kept = []
    for i, out in enumerate(batched(iter(blocks), 2, memory)):
        t = torch.from_numpy(out.x["x"])
        if i % 3 == 0:
            kept.append((i, t[1:]))  # a view of the tensor
        elif i % 3 == 1:
            kept.append((i, t.numpy()))  # an array over it
    for i, part in kept:
        assert (np.asarray(part) == float(i)).all(), f"batch {i} was written over"


def test_the_batches_memory_does_not_go_to_worker_processes(run):
    ds = ActivationDataset(run, sites=["layer_1"], batch_size=4)
    for _ in ds:
        pass
    copy = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 100_000
    np.testing.assert_array_equal(
        torch.cat([b["x"] for b in copy]).numpy(), torch.cat([b["x"] for b in ds]).numpy()
    )


@pytest.mark.skipif(not CPYTHON, reason="memory is filled again only where refcounts say so")
def test_batch_memory_gives_a_block_again_only_when_nothing_holds_it_or_its_arrays():
    memory = BatchMemory(keep=3)
    like = Block({"x": np.zeros((1, 3), np.float32)}, {"n": np.zeros(1, np.int64)})
    a = memory.take(like, 4)
    b = memory.take(like, 4)
    assert b is not a  # a is held (by the name a)
    a_id, x = id(a), a.x["x"]
    del a
    c = memory.take(like, 4)
    assert id(c) != a_id  # a's block is free, its array is not
    del x
    d = memory.take(like, 4)
    assert id(d) == a_id  # now nothing holds either: the same memory again
    e = memory.take(like, 8)
    assert len(e) == 8 and e is not d  # another shape: memory of its own
    del b, c, d, e


@pytest.mark.skipif(not CPYTHON, reason="memory is filled again only where refcounts say so")
def test_a_pass_takes_new_memory_for_its_first_batches_only(run, monkeypatch):
    from actcap.data import blocks

    made = []
    real = blocks._empty_like
    monkeypatch.setattr(blocks, "_empty_like", lambda b, n: made.append(n) or real(b, n))
    ds = ActivationDataset(run, sites=["layer_1"], batch_size=4)
    n = sum(1 for _ in ds)
    assert n >= 8
    assert len(made) <= 3, made  # the batch a loop holds, the next, and one to spare
    made.clear()
    assert sum(1 for _ in ds) == n
    assert made == []  # the next epoch too


def test_two_iterators_of_one_dataset_at_once_get_the_same_rows(run):
    ds = ActivationDataset(run, sites=["layer_1"], labels=["position"], batch_size=4)
    pairs = 0
    for a, b in zip(ds, ds, strict=True):
        torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=0)
        assert a["x"].data_ptr() != b["x"].data_ptr()
        pairs += 1
    assert pairs >= 8


def test_a_header_with_a_shape_of_floats_is_refused_not_read(run, tmp_path):
    _, path = first_sample(run)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    rows, hidden = header["layer_1"]["shape"]
    header["layer_1"]["shape"] = [float(rows), hidden]  # the same count of elements
    text = json.dumps(header).encode()
    out = tmp_path / "run"
    shutil.copytree(run, out)
    target = out / path.relative_to(run)
    target.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    ds = ActivationDataset(out, sites=["layer_1"], batch_size=4, warn_skipped=False)
    total = sum(len(b["x"]) for b in ds)
    assert [sid for sid, _ in ds.skipped] == [first_sample(run)[0].id]
    assert "layer_1" in ds.skipped[0][1]
    assert total == len(expected_rows(run)) - rows


def _rewrite_header(run, tmp_path, change):
    """A copy of ``run`` whose first sample's header is changed by ``change(header)``."""
    _, path = first_sample(run)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    out = tmp_path / "run"
    shutil.copytree(run, out)
    target = out / path.relative_to(run)
    target.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    return out


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h["layer_1"].update(
            data_offsets=[float(o) for o in h["layer_1"]["data_offsets"]]
        ),
        lambda h: h["layer_1"].update(dtype=["F32"]),
        lambda h: h["layer_1"].update(data_offsets=[True, h["layer_1"]["data_offsets"][1]]),
    ],
    ids=["float offsets", "dtype a list", "bool offset"],
)
@pytest.mark.parametrize("how", [{"batch_size": 4}, {}, {"rows": "samples"}, {"shuffle_buffer": 5}])
def test_a_crafted_header_skips_its_sample_in_every_mode(run, tmp_path, change, how):
    out = _rewrite_header(run, tmp_path, change)
    ds = ActivationDataset(out, sites=["layer_1"], warn_skipped=False, **how)
    got = list(ds)
    assert [sid for sid, _ in ds.skipped] == [first_sample(run)[0].id]
    assert got


def test_a_sample_of_zero_rows_gives_none_in_every_mode(run, tmp_path):
    from safetensors.numpy import save_file

    _, path = first_sample(run)
    out = tmp_path / "run"
    shutil.copytree(run, out)
    with ActivationFile(path) as f:
        hidden = f.shape("layer_1")[1]
    save_file(
        {
            "layer_0": np.zeros((0, hidden), np.float32),
            "layer_1": np.zeros((0, hidden), np.float32),
        },
        str(out / path.relative_to(run)),
        metadata={"format": "actcap", "format_version": "1", "dtype": "float32"},
    )
    want = len(expected_rows(run)) - len(load_site(path))
    for how in ({"batch_size": 4}, {}, {"shuffle_buffer": 5}):
        ds = ActivationDataset(out, sites=["layer_1"], warn_skipped=False, **how)
        rows = [b["x"] for b in ds]
        assert sum(len(r) if r.dim() > 1 else 1 for r in rows) == want, how


def test_a_batch_size_beyond_the_run_asks_only_for_the_rows_there(run):
    ds = ActivationDataset(run, sites=["layer_1"], labels=["category"], batch_size=10**9)
    (batch,) = list(ds)
    assert len(batch["x"]) == len(expected_rows(run))
    assert batch["x"].untyped_storage().nbytes() < 64 << 20  # not 10**9 rows


def test_a_run_whose_samples_folder_leads_out_says_so(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.move(out / "samples", tmp_path / "elsewhere")
    (out / "samples").symlink_to(tmp_path / "elsewhere")
    with pytest.warns(UserWarning), pytest.raises(FormatError, match="corrupt") as e:
        ActivationDataset(out, sites=["layer_1"])
    assert "--no-capture" not in str(e.value)


def test_token_ids_of_more_dimensions_than_numpy_has_skip_their_sample(run, tmp_path):
    def change(header):
        ids = header["input_ids"]
        ids["shape"] = [*ids["shape"], *([1] * 80)]

    out = _rewrite_header(run, tmp_path, change)
    for how in ({"batch_size": 4}, {}):
        ds = ActivationDataset(
            out, sites=["layer_1"], labels=["token_id"], warn_skipped=False, **how
        )
        assert list(ds)
        assert [sid for sid, _ in ds.skipped] == [first_sample(run)[0].id]
