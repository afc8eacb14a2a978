import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from actcap.errors import FormatError, UnknownNameError, UnsafeFileError
from actcap.storage import ActivationFile, SampleMeta, load_activations, save_activations


def make_file(path, **meta_kwargs):
    acts = {
        "embeddings": torch.randn(5, 8),
        "layer_0": torch.randn(5, 8),
        "layer_10": torch.randn(5, 8),
        "layer_2": torch.randn(5, 8),
        "layer_2.mlp": torch.randn(5, 8).to(torch.bfloat16),
    }
    meta = SampleMeta(
        prompt="What is the capital of France?",
        response="Paris.",
        model="tiny",
        timestamp="2026-11-28T10:00:00+00:00",
        extra={"question_id": "q1", "correct": True},
        **meta_kwargs,
    )
    save_activations(
        path, acts, meta, input_ids=torch.tensor([1, 2, 3, 4, 5]), output_ids=torch.tensor([7, 2])
    )
    return acts


def test_round_trip(tmp_path):
    path = tmp_path / "a.safetensors"
    acts = make_file(path)
    data = load_activations(path)
    assert data["prompt"] == "What is the capital of France?"
    assert data["response"] == "Paris."
    assert data["model"] == "tiny"
    assert data["timestamp"] == "2026-11-28T10:00:00+00:00"
    assert data["input_ids"].tolist() == [1, 2, 3, 4, 5]
    assert data["output_ids"].tolist() == [7, 2]
    assert list(data["activations"]) == [
        "embeddings",
        "layer_0",
        "layer_2",
        "layer_2.mlp",
        "layer_10",
    ]
    for name, t in acts.items():
        assert torch.equal(data["activations"][name], t)
    assert data["activations"]["layer_2.mlp"].dtype == torch.bfloat16
    assert data["metadata"]["extra"] == {"question_id": "q1", "correct": True}


def test_golden_header_readable_without_actcap(tmp_path):
    path = tmp_path / "a.safetensors"
    make_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta == {
        "format": "actcap",
        "format_version": "1",
        "prompt": "What is the capital of France?",
        "response": "Paris.",
        "model": "tiny",
        "timestamp": "2026-11-28T10:00:00+00:00",
        "token_selection": "all",
        "dtype": "float32",
        "extra": '{"correct": true, "question_id": "q1"}',
    }
    assert keys == {
        "embeddings",
        "layer_0",
        "layer_2",
        "layer_10",
        "layer_2.mlp",
        "input_ids",
        "output_ids",
    }


def test_lazy_read_only_requested_sites(tmp_path):
    path = tmp_path / "a.safetensors"
    acts = make_file(path)
    data = load_activations(path, sites=["layer_2"])
    assert list(data["activations"]) == ["layer_2"]
    assert torch.equal(data["activations"]["layer_2"], acts["layer_2"])
    with ActivationFile(path) as f:
        assert f.shape("layer_0") == (5, 8)
        assert f.dtype("layer_2.mlp") == "BF16"
        assert torch.equal(f.get_slice("layer_0")[-1:], acts["layer_0"][-1:])
        with pytest.raises(UnknownNameError, match="Sites in this file: embeddings"):
            f.get("layer_99")


def test_write_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    make_file(path)
    before = path.read_bytes()

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("actcap.storage.files.save_file", fail)
    with pytest.raises(OSError):
        make_file(path)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_reserved_names(tmp_path):
    with pytest.raises(FormatError, match="reserved"):
        save_activations(tmp_path / "x.safetensors", {"input_ids": torch.zeros(2)}, SampleMeta("p"))


def rewrite_metadata(path, **changes):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_newer_format_version_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    make_file(path)
    rewrite_metadata(path, format_version="2")
    with pytest.raises(FormatError, match=r"a\.safetensors: format_version 2 is newer"):
        load_activations(path)


def test_foreign_format_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    make_file(path)
    rewrite_metadata(path, format="something-else")
    with pytest.raises(FormatError, match="not an actcap"):
        load_activations(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"hello, this is a text file\n", "not a safetensors file"),
        (struct.pack("<Q", 10**12) + b"{}", "not a safetensors file"),
        (struct.pack("<Q", 4) + b"[1,2", "corrupt"),
    ],
)
def test_bad_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=match) as e:
        load_activations(path)
    assert str(path) in str(e.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "a.safetensors"
    make_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated"):
        load_activations(path)


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_activations(tmp_path / "nope.safetensors")


def test_legacy_torch_save_loads_safely(tmp_path):
    path = tmp_path / "old.pt"
    acts = {"embeddings": torch.randn(3, 4), "layer_0": torch.randn(3, 4)}
    torch.save(
        {
            "prompt": "hi",
            "response": "yo",
            "model": "m",
            "timestamp": "t",
            "input_ids": torch.tensor([1, 2, 3]),
            "activations": acts,
        },
        path,
    )
    data = load_activations(path)
    assert data["prompt"] == "hi" and data["response"] == "yo"
    assert torch.equal(data["activations"]["layer_0"], acts["layer_0"])
    assert list(load_activations(path, sites=["layer_0"])["activations"]) == ["layer_0"]


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pkl", ".pt", ".safetensors"])
def test_malicious_pickle_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"activations": {"layer_0": Evil(marker)}}, f)
    with pytest.raises(FormatError) as e:
        load_activations(path)
    assert not marker.exists()
    if isinstance(e.value, UnsafeFileError):
        assert "trust_pickle=True" in str(e.value) and "arbitrary code" in str(e.value)


def test_trusted_pickle_loads(tmp_path):
    path = tmp_path / "mine.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"prompt": "p", "activations": {"layer_0": torch.ones(2)}, "note": Path("x")}, f
        )
    with pytest.raises(UnsafeFileError):
        load_activations(path)
    data = load_activations(path, trust_pickle=True)
    assert torch.equal(data["activations"]["layer_0"], torch.ones(2))
