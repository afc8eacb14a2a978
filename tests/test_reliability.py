"""Faults and hostile inputs: kill -9 at random moments, full disks, unwritable folders, corrupt
files, malicious pickles, concurrent writers. See docs/reliability.md for the record."""

import errno
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.bench.questions import Benchmark, Question
from actcap.capture import CaptureSpec
from actcap.cli.main import cli
from actcap.errors import BenchmarkError, FormatError, RunError
from actcap.storage import SampleMeta, load_activations, open_run, read_manifest, save_activations

KILL_TRIALS = int(os.environ.get("ACTCAP_KILL_TRIALS", "20"))


def eval_cmd(model_dir, out, resume):
    return [
        sys.executable,
        "-m",
        "actcap",
        "eval",
        "--model",
        str(model_dir),
        "--benchmark",
        "demo",
        "--limit",
        "10",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--layers",
        "all",
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",
        *(["--resume"] if resume else []),
    ]


def check_consistent(out, expected_ids=None):
    """Every manifest line once, every listed file whole and matching, nothing else listed."""
    info = open_run(out)
    ids = [e.id for e in info.entries]
    assert len(ids) == len(set(ids)), f"duplicated samples: {ids}"
    if expected_ids is not None:
        assert set(ids) <= set(expected_ids)
    for entry, path in info.sample_paths():
        data = load_activations(path)
        assert data["response"] == entry.record["response"]
        assert data["metadata"]["extra"]["question_id"] == entry.id
        assert set(data["activations"]) == {"embeddings", "layer_0", "layer_1", "layer_2"}
    return info


def test_kill_minus_nine_at_random_moments(tiny_model_dir, tmp_path):
    rng = random.Random(1234)
    ref_out = tmp_path / "reference"
    t0 = time.perf_counter()
    subprocess.run(
        eval_cmd(tiny_model_dir, ref_out, False), check=True, capture_output=True, timeout=300
    )
    duration = time.perf_counter() - t0
    reference = {e.id: e.record for e in open_run(ref_out).entries}
    ref_results = json.loads((ref_out / "results.json").read_text())
    kills = completed = runs = 0
    out = tmp_path / "run0"
    while kills < KILL_TRIALS:
        started = (out / "run.json").exists()
        log = tmp_path / "stderr.txt"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                eval_cmd(tiny_model_dir, out, started), stdout=subprocess.DEVNULL, stderr=err
            )
            delay = rng.uniform(0.3, duration * 1.05)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, log.read_text()[-2000:]
        if (out / "run.json").exists():
            check_consistent(out, reference)
        if (out / "results.json").exists():
            # A finished run: identical to the uninterrupted one, no leftovers anywhere.
            records = {e.id: e.record for e in open_run(out).entries}
            assert set(records) == set(reference)
            for qid, rec in records.items():
                assert (rec["response"], rec["correct"]) == (
                    reference[qid]["response"],
                    reference[qid]["correct"],
                )
            results = json.loads((out / "results.json").read_text())
            assert (results["accuracy"], results["n"]) == (
                ref_results["accuracy"],
                ref_results["n"],
            )
            assert not [p for p in out.rglob("*.tmp")]
            completed += 1
            runs += 1
            out = tmp_path / f"run{runs}"
    # finish the last interrupted run too
    if (out / "run.json").exists():
        subprocess.run(
            eval_cmd(tiny_model_dir, out, True), check=True, capture_output=True, timeout=300
        )
        info = check_consistent(out, reference)
        assert {e.id for e in info.entries} == set(reference)
        assert not [p for p in out.rglob("*.tmp")]
        completed += 1
    print(f"\nkill -9 trials: {kills}, runs completed after resuming: {completed}, samples lost: 0")
    assert kills >= KILL_TRIALS and completed >= 1


def test_second_eval_process_is_refused_while_first_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        eval_cmd(tiny_model_dir, out, False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 60
        while not (out / ".lock").exists() or not (out / ".lock").read_text().strip():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        second = subprocess.run(
            eval_cmd(tiny_model_dir, out, True), capture_output=True, text=True, timeout=120
        )
        if first.poll() is None:  # only meaningful while the first still holds the lock
            assert second.returncode == 1
            assert "another actcap process" in second.stderr
    finally:
        first.kill()
        first.wait()
    # the stale lock of the killed process does not block a resume
    done = subprocess.run(
        eval_cmd(tiny_model_dir, out, True), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(open_run(out).entries) == 10


def fail_after(n_ok):
    """A stand-in for ``write_all`` (every file of a run): the disk fills after ``n_ok`` files."""
    calls = {"n": 0}
    from actcap.storage.safety import write_all as real

    def write_all(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return write_all


@pytest.mark.parametrize("background", [True, False])
def test_disk_full_mid_run_then_resume(tiny_lm, tmp_path, monkeypatch, background):
    bench = load_benchmark("demo").limited(8)
    opts = EvalOptions(
        batch_size=2, max_new_tokens=3, background_write=background, share_prefixes=False
    )
    out = tmp_path / "run"
    # run.json, then three samples (the shared-prefix file has a test of its own, below)
    monkeypatch.setattr("actcap.storage.safety.write_all", fail_after(4))
    with pytest.raises(RunError, match=r"No space left on device.*--resume"):
        run_benchmark(tiny_lm, bench, capture=CaptureSpec(), options=opts, out=out, progress=False)
    info = open_run(out)
    assert len(info.entries) == 3
    assert not list((out / "samples").glob(".*.tmp"))  # the failed write left no temporary
    monkeypatch.undo()  # space is back
    result = run_benchmark(
        tiny_lm, bench, capture=CaptureSpec(), options=opts, out=out, resume=True, progress=False
    )
    assert result.n == 8 and result.answered == 5
    assert len(read_manifest(out / "manifest.jsonl")) == 8


def test_disk_full_while_writing_a_shared_prefix_then_resume(tiny_lm, tmp_path, monkeypatch):
    mmlu = Path(__file__).parent.parent / "data" / "mmlu" / "test" / "world_religions_test.csv"
    bench = load_benchmark(f"mmlu:{mmlu}").limited(4)
    opts = EvalOptions(few_shot=3, batch_size=4)
    out = tmp_path / "run"
    monkeypatch.setattr("actcap.storage.safety.write_all", fail_after(1))  # run.json only
    with pytest.raises(RunError, match=r"No space left on device.*--resume"):
        run_benchmark(tiny_lm, bench, capture=CaptureSpec(), options=opts, out=out, progress=False)
    assert open_run(out).entries == []  # no sample listed without its prefix
    assert not list((out / "prefixes").iterdir())  # and no partial prefix left
    monkeypatch.undo()
    result = run_benchmark(
        tiny_lm, bench, capture=CaptureSpec(), options=opts, out=out, resume=True, progress=False
    )
    assert result.n == 4 and len(list((out / "prefixes").iterdir())) == 1
    for _, source in open_run(out).sample_paths():
        assert load_activations(source)["activations"]["layer_0"].shape[0] > 16


def test_real_full_filesystem(tiny_lm, tmp_path):
    """A small tmpfs where the machine allows mounting one (root in a container often may not)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the injected ENOSPC test covers this"
        )
    try:
        bench = load_benchmark("demo").limited(12)
        with pytest.raises(RunError, match="No space left"):
            run_benchmark(
                tiny_lm,
                bench,
                capture=CaptureSpec(),
                options=EvalOptions(batch_size=2, max_new_tokens=3),
                out=mnt / "run",
                progress=False,
            )
        n_done = len(open_run(mnt / "run").entries)
        assert 0 < n_done < 12
        check_consistent(mnt / "run")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_unwritable_output_folder_for_an_unprivileged_user(tiny_model_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    # Everything the unprivileged user reads (model, questions) lies in a folder of its own under
    # /tmp that any user can enter: the clone and pytest's temp folder may sit in 0700 folders.
    base = Path(tempfile.mkdtemp(prefix="actcap-unpriv-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        model = shutil.copytree(tiny_model_dir, base / "model")
        questions = base / "questions.jsonl"
        questions.write_text(
            '{"id": "q1", "question": "2 + 2 = ?", "answer": "4"}\n'
            '{"id": "q2", "question": "3 + 3 = ?", "answer": "6"}\n'
        )
        for p in [model, *model.iterdir(), questions]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        target = base / "locked"
        target.mkdir(mode=0o755)  # root's: the unprivileged user cannot write in it
        env = {**os.environ, "HOME": str(base), "ACTCAP_CACHE_DIR": str(base / "cache")}
        # Python's own files may live where the unprivileged user cannot read: import and load
        # everything first, then drop privileges, then run the command.
        code = (
            "import os, sys, json, tqdm, importlib.readers, encodings.utf_8_sig, actcap.bench.runner, actcap.bench.sources, actcap.capture.spec, actcap.api, actcap.cli.lm_eval_cmd;"
            "from actcap.cli.main import main; from actcap.models import load_model;"
            f"load_model({str(model)!r}, device='auto');"
            "os.setgid(65534); os.setuid(65534); main()"
        )
        args = ["eval", "--model", str(model), "--benchmark", str(questions)]
        args += ["--out", str(target / "run"), "--quiet"]
        r = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "cannot write the run directory" in r.stderr and "Traceback" not in r.stderr, r.stderr


def flipped(path, offset, value=0xFF):
    data = bytearray(path.read_bytes())
    data[offset] ^= value
    path.write_bytes(bytes(data))


def valid_file(path):
    save_activations(
        path,
        {"layer_0": torch.randn(4, 8), "layer_1": torch.randn(4, 8)},
        SampleMeta("p"),
        input_ids=torch.arange(4),
    )


def huge_header(path):
    header = json.dumps(
        {"layer_0": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 16]}}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-40]),
    "flipped header length": lambda p: flipped(p, 3),
    "flipped header JSON": lambda p: flipped(p, 12, 0x40),
    "huge tensors claimed": huge_header,
    "newer format_version": lambda p: p.write_bytes(
        p.read_bytes().replace(b'"format_version":"1"', b'"format_version":"9"')
    ),
    "text file": lambda p: p.write_text("hello\n"),
    "empty file": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_files_raise_our_error_naming_the_file(tmp_path, kind):
    path = tmp_path / "x.safetensors"
    valid_file(path)
    CORRUPTIONS[kind](path)
    with pytest.raises(FormatError) as e:
        load_activations(path)
    assert str(path) in str(e.value)
    r = CliRunner().invoke(cli, ["inspect", str(path)])
    assert r.exit_code == 1 and "Traceback" not in r.output and str(path) in r.output


def test_directory_analysis_skips_every_corruption(tmp_path):
    for i in range(3):
        valid_file(tmp_path / f"good{i}.safetensors")
    for kind, corrupt in CORRUPTIONS.items():
        p = tmp_path / f"bad-{kind.replace(' ', '_')}.safetensors"
        valid_file(p)
        corrupt(p)
    r = CliRunner().invoke(cli, ["analyze", "--directory", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert f"3 files read, {len(CORRUPTIONS)} skipped" in r.output


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["evil.pkl", "evil.pt", "evil.safetensors", "evil.bin"])
def test_malicious_pickle_never_runs_through_any_entry_point(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump({"activations": {"layer_0": Evil(marker)}}, f)
    with pytest.raises(FormatError):
        load_activations(path)
    runner = CliRunner()
    for args in (
        ["inspect", str(path)],
        ["analyze", "--file", str(path)],
        ["analyze", "--directory", str(tmp_path)],
        ["analyze", "--compare", str(path), str(path)],
    ):
        r = runner.invoke(cli, args)
        assert "Traceback" not in r.output
    assert not marker.exists()


def test_prompt_longer_than_the_context(tiny_lm):
    long_q = Question("long", "word " * 3000, "4")
    bench = Benchmark("long", [long_q])
    with pytest.raises(
        BenchmarkError,
        match=r"'long': the prompt has \d+ tokens, more than the \d+ .*--overflow truncate",
    ):
        run_benchmark(
            tiny_lm, bench, capture=None, options=EvalOptions(max_new_tokens=4), progress=False
        )
    with pytest.warns(UserWarning, match="truncated"):
        r = run_benchmark(
            tiny_lm,
            bench,
            capture=None,
            options=EvalOptions(max_new_tokens=4, overflow="truncate"),
            progress=False,
        )
    assert r.n == 1
    n_tokens = r.records[0]["n_prompt_tokens"]
    assert n_tokens > 1900 and n_tokens + 4 <= 2048


def test_ids_that_escape(tiny_lm, tmp_path):
    qs = [
        Question(i, f"{k} + 1 = ?", str(k + 1))
        for k, i in enumerate(["../x", "/etc/passwd", "a\x00b", "..", ".", "ok"])
    ]
    out = tmp_path / "run"
    run_benchmark(
        tiny_lm,
        Benchmark("ids", qs),
        capture=CaptureSpec(layers=[0]),
        options=EvalOptions(max_new_tokens=2),
        out=out,
        progress=False,
    )
    files = list((out / "samples").iterdir())
    assert len(files) == 6 and all(
        f.parent == out / "samples" and not f.name.startswith(".") for f in files
    )
    assert {e.id for e in open_run(out).entries} == {q.id for q in qs}
    assert (
        not (tmp_path / "x.safetensors").exists() and not Path("/etc/passwd.safetensors").exists()
    )


def test_torn_manifest_line_is_cut_on_resume(tiny_lm, tmp_path):
    bench = load_benchmark("demo").limited(4)
    out = tmp_path / "run"
    opts = EvalOptions(max_new_tokens=2)
    run_benchmark(
        tiny_lm,
        bench,  # the same question set as the resume's (its digest is in run.json); --limit 2
        capture=CaptureSpec(layers=[0]),
        options=EvalOptions(max_new_tokens=2, limit=2),
        out=out,
        progress=False,
    )
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b'{"id": "fact-01", "file": "samp')  # a crash mid-append
    r = run_benchmark(
        tiny_lm,
        bench,
        capture=CaptureSpec(layers=[0]),
        options=opts,
        out=out,
        resume=True,
        progress=False,
    )
    assert r.n == 4
    lines = (out / "manifest.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    check_manifest = read_manifest(Path(out) / "manifest.jsonl")
    assert len(check_manifest) == 4
