"""Files are read by what they hold, never by their name; bad inputs give one-line errors.

Issue #11, items 10 and 11: a safetensors file named ``.pkl`` (the seed's own example), a file
with no suffix, a text file named ``.pt``, a corrupt pickle; deeply nested JSON, zero-element
tensors, a ``run.json`` that is no object, ``lens --token`` past the end, saving onto a folder.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from actcap.analysis import compare_files, directory_summary, file_stats, logit_lens
from actcap.cli.main import cli
from actcap.compat import generate_inference_with_activations
from actcap.errors import ActcapError, FormatError, UnsafeFileError, WriteError
from actcap.storage import ActivationFile, SampleMeta, load_activations, open_run, save_activations
from tests.conftest import REPO


def save(path: Path, **acts: torch.Tensor) -> Path:
    """A small actcap file with the given sites (two random sites by default)."""
    sites = acts or {"layer_0": torch.randn(3, 8), "layer_1": torch.randn(3, 8)}
    return save_activations(path, sites, SampleMeta("p", "r"), input_ids=torch.arange(3))


def one_line_error(r, *names: str) -> None:
    """A CLI result that failed with one ``Error: ...`` line naming each of ``names``."""
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for name in names:
        assert name in lines[0], r.output


def nested_json(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def safetensors_bytes(header: bytes) -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


# --- item 10: the content decides the format --------------------------------------------------


def test_seed_example_pkl_name_holds_safetensors(tiny_lm, tmp_path):
    """The seed's ``save_path="my_activations.pkl"`` then ``load_activations`` of it."""
    path = tmp_path / "my_activations.pkl"
    _, data = generate_inference_with_activations(
        "What is 2 + 2?", tiny_lm, save_path=path, layers_to_capture=[0], max_new_tokens=2
    )
    loaded = load_activations(path)
    assert torch.equal(loaded["activations"]["layer_0"], data["activations"]["layer_0"])
    assert list(load_activations(path, sites=["layer_0"])["activations"]) == ["layer_0"]
    for args in (["analyze", "--file", str(path)], ["inspect", str(path)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0 and "layer_0" in r.output, r.output
    r = CliRunner().invoke(cli, ["analyze", "--compare", str(path), str(path)])
    assert r.exit_code == 0, r.output


def test_analyze_activations_script_reads_a_pkl_named_safetensors_file(tmp_path):
    path = save(tmp_path / "my_activations.pkl")
    r = subprocess.run(
        [sys.executable, str(REPO / "analyze_activations.py"), "--file", str(path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "layer_1" in r.stdout, r.stderr


def test_files_without_suffix_are_read_whatever_their_header_size(tmp_path):
    """A header size ending in byte 0x80 looked like a pickle's PROTO opcode (1 time in 32)."""
    low_bytes = set()
    for n in range(300):
        path = save_activations(
            tmp_path / f"sample{n}", {"layer_0": torch.full((2, 4), float(n))}, SampleMeta("x" * n)
        )
        (size,) = struct.unpack("<Q", path.read_bytes()[:8])
        low_bytes.add(size % 256)
        assert load_activations(path)["activations"]["layer_0"][0, 0] == n
        with ActivationFile(path) as f:
            assert f.sites == ["layer_0"]
    assert 0x80 in low_bytes and len(low_bytes) == 32


def test_torch_save_file_is_read_by_content_whatever_its_name(tmp_path):
    acts = {"layer_0": torch.randn(3, 4), "layer_1": torch.randn(3, 4)}
    for name in ("legacy.safetensors", "legacy", "legacy.pt"):
        path = tmp_path / name
        torch.save({"prompt": "hi", "input_ids": torch.arange(3), "activations": acts}, path)
        data = load_activations(path)
        assert data["prompt"] == "hi" and torch.equal(
            data["activations"]["layer_1"], acts["layer_1"]
        )
        # the analysis commands read it too (torch.load(weights_only=True): no code runs)
        r = CliRunner().invoke(cli, ["analyze", "--file", str(path)])
        assert r.exit_code == 0 and "layer_1" in r.output, r.output
        r = CliRunner().invoke(cli, ["inspect", str(path)])
        assert r.exit_code == 0 and "layer_1" in r.output and "prompt: hi" in r.output, r.output


def test_text_file_named_pt_is_a_one_line_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, these are my notes\n")
    with pytest.raises(FormatError) as e:
        load_activations(path)
    assert str(path) in str(e.value) and "trust_pickle" not in str(e.value)
    assert not isinstance(e.value, UnsafeFileError)
    for args in (["inspect", str(path)], ["analyze", "--file", str(path)]):
        one_line_error(CliRunner().invoke(cli, args), str(path))


@pytest.mark.parametrize(
    "content",
    [b"\x80\x04garbage that is no pickle", b"\x80\x02", b"PK\x03\x04 not really a zip"],
)
def test_unreadable_pickle_never_suggests_trusting_it(tmp_path, content):
    path = tmp_path / "broken.pkl"
    path.write_bytes(content)
    for trust in (False, True):
        with pytest.raises(FormatError) as e:
            load_activations(path, trust_pickle=trust)
        assert not isinstance(e.value, UnsafeFileError)
        assert str(path) in str(e.value) and "trust" not in str(e.value)
    one_line_error(CliRunner().invoke(cli, ["analyze", "--file", str(path)]), str(path))


def test_unsafe_pickle_names_only_options_that_exist(tmp_path):
    """The refusal suggests the Python keyword, never a ``--trust-pickle`` flag (there is none)."""
    path = tmp_path / "mine.pkl"
    with open(path, "wb") as f:
        pickle.dump({"activations": {"layer_0": torch.ones(2)}, "note": Path("x")}, f)
    with pytest.raises(UnsafeFileError) as e:
        load_activations(path)
    assert "trust_pickle=True" in str(e.value) and "--trust-pickle" not in str(e.value)
    r = CliRunner().invoke(cli, ["analyze", "--file", str(path)])
    one_line_error(r, str(path))
    assert "--trust-pickle" not in r.output
    for command in ("analyze", "inspect", "lens"):
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--trust-pickle" not in help_text


# --- item 11: one-line errors, and directory scans that skip and count -------------------------


def test_deeply_nested_header_json(tmp_path):
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(safetensors_bytes(nested_json(100_000)))
    with pytest.raises(FormatError, match="deep.safetensors"):
        load_activations(deep)
    one_line_error(CliRunner().invoke(cli, ["analyze", "--file", str(deep)]), str(deep))
    one_line_error(CliRunner().invoke(cli, ["inspect", str(deep)]), str(deep))
    save(tmp_path / "good.safetensors")
    s = directory_summary(tmp_path)
    assert s.n_files == 1 and len(s.skipped) == 1
    r = CliRunner().invoke(cli, ["analyze", "--directory", str(tmp_path)])
    assert r.exit_code == 0 and "1 files read, 1 skipped" in r.output, r.output


def test_deeply_nested_extra_metadata(tmp_path):
    path = tmp_path / "extra.safetensors"
    save_activations(
        path,
        {"layer_0": torch.ones(2, 2)},
        SampleMeta("p", extra={"x": 1}),
    )
    header = {
        "__metadata__": {"format": "actcap", "extra": nested_json(100_000).decode()},
        "layer_0": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    }
    path.write_bytes(safetensors_bytes(json.dumps(header).encode()) + bytes(16))
    with pytest.raises(FormatError, match="extra"):
        load_activations(path)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0,)])
def test_zero_element_tensor(tmp_path, shape):
    empty = save(
        tmp_path / "empty.safetensors", layer_0=torch.ones(3, 8), layer_1=torch.ones(shape)
    )
    good = save(tmp_path / "good.safetensors")
    with pytest.raises(FormatError, match=r"empty\.safetensors.*layer_1"):
        file_stats(empty)
    with pytest.raises(FormatError, match=r"empty\.safetensors.*layer_1"):
        compare_files(good, empty)
    runner = CliRunner()
    one_line_error(runner.invoke(cli, ["analyze", "--file", str(empty)]), str(empty), "layer_1")
    r = runner.invoke(cli, ["analyze", "--compare", str(empty), str(good)])
    one_line_error(r, str(empty), "layer_1")
    # a scan skips and counts the file, and none of its sites enters the summary
    s = directory_summary(tmp_path)
    assert s.n_files == 1 and len(s.skipped) == 1
    assert {st.site: st.count for st in s.sites} == {"layer_0": 24, "layer_1": 24}
    r = runner.invoke(cli, ["analyze", "--directory", str(tmp_path)])
    assert r.exit_code == 0 and "1 files read, 1 skipped" in r.output, r.output
    assert "layer_1" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"run"', "null", nested_json(100_000).decode()])
def test_run_json_that_is_no_object(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(content)
    with pytest.raises(FormatError, match="run.json"):
        open_run(run)
    one_line_error(CliRunner().invoke(cli, ["analyze", "--directory", str(run)]), "run.json")
    one_line_error(CliRunner().invoke(cli, ["inspect", str(run), "--sample", "a"]), "run.json")


@pytest.fixture(scope="module")
def lens_file(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("lens") / "a.safetensors"
    r = CliRunner().invoke(
        cli,
        [
            "generate",
            "What is 2 + 2?",
            "--model",
            str(tiny_model_dir),
            "--save",
            str(path),
            "--layers",
            "0-1",
            "--max-new-tokens",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert str(path) in r.output
    return path


@pytest.mark.parametrize("token", [500, -500])
def test_lens_token_past_the_end(tiny_model_dir, lens_file, token):
    n = load_activations(lens_file)["activations"]["layer_0"].shape[0]
    r = CliRunner().invoke(
        cli, ["lens", str(lens_file), "--model", str(tiny_model_dir), "--token", str(token)]
    )
    one_line_error(r, str(lens_file), f"position {token}", "--token", f"{n} tokens")
    r = CliRunner().invoke(
        cli, ["lens", str(lens_file), "--model", str(tiny_model_dir), "--token", str(n - 1)]
    )
    assert r.exit_code == 0 and "layer_1" in r.output, r.output


def test_lens_on_a_zero_element_site(tiny_lm, tmp_path):
    path = save(tmp_path / "z.safetensors", layer_0=torch.ones(0, 32))
    with pytest.raises(FormatError, match=r"z\.safetensors.*layer_0"):
        logit_lens(path, tiny_lm)


def test_lens_k_has_help():
    r = CliRunner().invoke(cli, ["lens", "--help"])
    line = next(line for line in r.output.splitlines() if line.strip().startswith("-k"))
    assert len(line.split()) > 3, r.output  # more than "-k INTEGER RANGE [default: 5; x>=1]"
    assert "tokens" in r.output.split("-k", 1)[1]


def test_saving_onto_a_folder(tiny_lm, tiny_model_dir, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(WriteError, match="out"):
        generate_inference_with_activations("hi", tiny_lm, save_path=folder, max_new_tokens=1)
    r = CliRunner().invoke(
        cli, ["generate", "hi", "--model", str(tiny_model_dir), "--save", str(folder)]
    )
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert str(folder) in r.output and "--save" in r.output and r.output.count("Error") == 1
    assert list(folder.iterdir()) == []


def test_generate_without_save_says_nothing_was_written(tiny_model_dir):
    r = CliRunner().invoke(
        cli, ["generate", "hi", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]
    )
    assert r.exit_code == 0, r.output
    assert "not saved" in r.output and "--save" in r.output


def test_compare_says_its_numbers_are_cosine_similarities(tmp_path):
    a, b = save(tmp_path / "a.safetensors"), save(tmp_path / "b.safetensors")
    r = CliRunner().invoke(cli, ["analyze", "--compare", str(a), str(b)])
    assert r.exit_code == 0 and "cosine similarit" in r.output.lower(), r.output


def test_analyze_activations_script_help():
    r = subprocess.run(
        [sys.executable, str(REPO / "analyze_activations.py"), "-h"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "--directory" in r.stdout and "--compare" in r.stdout, r.stderr


def test_every_reader_raises_only_actcap_errors_on_bad_files(tmp_path):
    """The same bad files through each entry point: our own errors, naming the file."""
    bad = {
        "deep.safetensors": safetensors_bytes(nested_json(50_000)),
        "text.pt": b"plain text\n",
        "garbage.pkl": b"\x80\x05\x95garbage",
        "nosuffix": b"\x80\x02" + bytes(30),
    }
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        for read in (load_activations, ActivationFile, file_stats):
            with pytest.raises(ActcapError) as e:
                read(path)
            assert str(path) in str(e.value)


def test_save_activations_onto_a_folder_is_a_write_error(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(WriteError, match="is a folder"):
        save_activations(folder, {"layer_0": torch.ones(2, 4)}, SampleMeta("p"))
    assert list(folder.iterdir()) == []


def test_deeply_nested_manifest_line_and_results(tmp_path):
    from actcap.storage.manifest import read_manifest

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"format_version": "1"}')
    (run / "manifest.jsonl").write_bytes(nested_json(100_000) + b"\n" + b'{"id": "a"}\n')
    with pytest.raises(FormatError, match="line 1"):
        read_manifest(run / "manifest.jsonl")
    (run / "manifest.jsonl").write_text('{"id": "a", "file": null}\n')
    for content in (nested_json(100_000), b"[0.5]"):
        (run / "results.json").write_bytes(content)
        with pytest.raises(FormatError, match="results.json"):
            open_run(run)


def test_a_run_with_foreign_manifest_paths_warns_in_one_line_and_counts_them(tmp_path):
    from actcap.storage import RunWriter

    run = tmp_path / "run"
    with RunWriter.open(run, {"model": "m"}) as w:
        for i in range(3):
            w.write_sample(
                f"s{i}", {"correct": True}, {"layer_0": torch.ones(2, 4)}, SampleMeta("p")
            )
    lines = (run / "manifest.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"samples/', '"/etc/../samples/')
    lines[1] = lines[1].replace('"samples/', '"../samples/')
    (run / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "actcap", "analyze", "--directory", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(warned) == 2 and all(line.startswith("Warning: ") for line in warned), r.stderr
    assert "1 files read, 2 skipped" in r.stdout, r.stdout


def test_lens_says_which_token_and_refuses_a_token_on_a_reduced_file(tiny_model_dir, tmp_path):
    path = tmp_path / "last.safetensors"
    args = ["generate", "What is 2 + 2?", "--model", str(tiny_model_dir), "--save", str(path)]
    r = CliRunner().invoke(cli, [*args, "--token-selection", "last", "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output
    lens = ["lens", str(path), "--model", str(tiny_model_dir)]
    r = CliRunner().invoke(cli, lens)
    assert r.exit_code == 0 and "the last vector of each site" in r.output, r.output
    one_line_error(CliRunner().invoke(cli, [*lens, "--token", "0"]), str(path), "--token")


def test_lens_names_the_token_position_it_reads(tiny_model_dir, lens_file):
    n = load_activations(lens_file)["activations"]["layer_0"].shape[0]
    r = CliRunner().invoke(cli, ["lens", str(lens_file), "--model", str(tiny_model_dir)])
    assert r.exit_code == 0 and f"token position {n - 1} of {n}" in r.output, r.output
    r = CliRunner().invoke(
        cli, ["lens", str(lens_file), "--model", str(tiny_model_dir), "--token", "1"]
    )
    assert f"token position 1 of {n}" in r.output, r.output
