import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from actcap import answer_and_grade_benchmark_question, answer_benchmark_question_with_activations
from actcap.bench import EvalOptions, Question, load_benchmark, run_benchmark
from actcap.bench.questions import Benchmark
from actcap.capture import CaptureSpec
from actcap.cli.main import cli
from actcap.errors import BenchmarkError, RunError
from actcap.storage import RunWriter, load_activations, open_run
from tests.conftest import DATA, REPO

MMLU_FILE = DATA / "mmlu" / "test" / "high_school_geography_test.csv"


@pytest.fixture(scope="module")
def mmlu8():
    return load_benchmark(f"mmlu:{MMLU_FILE}").limited(8)


@pytest.fixture(scope="module")
def mixed():
    demo = load_benchmark("demo")
    picks = [q for q in demo.questions if q.choices][:3] + [
        q for q in demo.questions if not q.choices
    ][:3]
    return Benchmark("mixed", picks)


def check_run(out, n):
    info = open_run(out)
    ids = [e.id for e in info.entries]
    assert len(ids) == n and len(set(ids)) == n
    for entry, path in info.sample_paths():
        data = load_activations(path)
        assert data["response"] == entry.record["response"]
        assert data["metadata"]["extra"]["correct"] == entry.record["correct"]
        assert data["prompt"] == entry.record["prompt"]
    leftovers = [p for p in (out / "samples").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    return info


def test_run_directory_layout(tiny_lm, mmlu8, tmp_path):
    out = tmp_path / "run"
    result = run_benchmark(
        tiny_lm,
        mmlu8,
        capture=CaptureSpec(layers="0,-1", token_selection="last"),
        options=EvalOptions(few_shot=2, batch_size=3),
        out=out,
        progress=False,
    )
    assert result.n == 8 and 0 <= result.accuracy <= 1
    info = check_run(out, 8)
    assert info.config["model"] == "tiny-llama"
    assert info.config["capture"]["token_selection"] == "last"
    assert info.config["sites"] == ["layer_0", "layer_2"]
    assert "torch" in info.config["versions"]
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 8 and res["per_category"]["high_school_geography"]["n"] == 8
    assert res["questions_per_second"] > 0
    rec = info.entries[0].record
    for key in (
        "question",
        "response",
        "reference",
        "correct",
        "score",
        "category",
        "n_prompt_tokens",
        "choice_logprobs",
    ):
        assert key in rec
    assert rec["mode"] == "loglik" and rec["grader"] == "choice"
    assert (
        "Question:" in rec["prompt"] and rec["prompt"].count("Answer:") == 3
    )  # 2 shots + the question
    data = load_activations(out / info.entries[0].file)
    assert data["activations"]["layer_0"].shape == (32,)


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_batched_equals_one_at_a_time(tiny_lm, mmlu8, mode, tmp_path):
    opts = dict(mode=mode, max_new_tokens=4)
    one = run_benchmark(
        tiny_lm,
        mmlu8,
        capture=CaptureSpec(layers=[1]),
        options=EvalOptions(batch_size=1, **opts),
        out=tmp_path / "a",
        progress=False,
    )
    many = run_benchmark(
        tiny_lm,
        mmlu8,
        capture=CaptureSpec(layers=[1]),
        options=EvalOptions(batch_size=8, **opts),
        out=tmp_path / "b",
        progress=False,
    )
    for r1, r8 in zip(one.records, many.records, strict=True):
        assert r1["response"] == r8["response"]
        assert r1["correct"] == r8["correct"]
        if mode == "loglik":
            assert r1["choice_logprobs"] == pytest.approx(r8["choice_logprobs"], abs=1e-4)
    for e in open_run(tmp_path / "a").entries:
        a = load_activations(tmp_path / "a" / e.file)["activations"]["layer_1"]
        b = load_activations(tmp_path / "b" / e.file)["activations"]["layer_1"]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_text_choice_scoring(tiny_lm, mmlu8):
    r = run_benchmark(
        tiny_lm,
        mmlu8.limited(3),
        capture=None,
        options=EvalOptions(choice_format="text"),
        progress=False,
    )
    assert all(len(x["choice_logprobs"]) == 4 for x in r.records)


def test_resume_after_interruption_loses_nothing(tiny_lm, mixed, tmp_path):
    spec = CaptureSpec(layers=[0, 2])
    opts = EvalOptions(batch_size=2, max_new_tokens=4)
    reference = run_benchmark(
        tiny_lm, mixed, capture=spec, options=opts, out=tmp_path / "ref", progress=False
    )
    out = tmp_path / "run"
    written = []

    def crash(entry):
        written.append(entry.id)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(
            tiny_lm, mixed, capture=spec, options=opts, out=out, progress=False, on_sample=crash
        )
    assert len(open_run(out).entries) == 3
    # a leftover from a crash mid-write: a temporary and a file without a manifest line
    (out / "samples" / ".x.safetensors.0123abcd.tmp").write_bytes(b"partial")
    (out / "samples" / "orphan.safetensors").write_bytes(b"orphan")
    with pytest.raises(RunError, match="--resume"):
        run_benchmark(tiny_lm, mixed, capture=spec, options=opts, out=out, progress=False)
    result = run_benchmark(
        tiny_lm, mixed, capture=spec, options=opts, out=out, resume=True, progress=False
    )
    assert result.answered == 3
    check_run(out, 6)
    assert not (out / "samples" / "orphan.safetensors").exists()
    assert [r["response"] for r in result.records] == [r["response"] for r in reference.records]
    assert result.accuracy == reference.accuracy


def test_resume_refuses_other_config(tiny_lm, mixed, tmp_path):
    out = tmp_path / "run"
    run_benchmark(
        tiny_lm,
        mixed.limited(2),
        capture=CaptureSpec(layers=[0]),
        options=EvalOptions(max_new_tokens=2),
        out=out,
        progress=False,
    )
    with pytest.raises(RunError, match="--layers differs"):
        run_benchmark(
            tiny_lm,
            mixed.limited(2),
            capture=CaptureSpec(layers=[1]),
            out=out,
            resume=True,
            progress=False,
        )


def test_lock_refuses_second_writer(tmp_path):
    with RunWriter.open(tmp_path / "r", {"model": "m"}):
        with pytest.raises(RunError, match=r"another actcap process \(pid \d+\)"):
            RunWriter.open(tmp_path / "r", {"model": "m"})
        code = f"from actcap.storage import RunWriter; RunWriter.open({str(tmp_path / 'r')!r}, {{'model': 'm'}})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "another actcap process" in r.stderr
    RunWriter.open(tmp_path / "r", {"model": "m"}, resume=True).close()  # released


def test_unwritable_output_is_clear(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a file where the folder should be fails the same way
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "run"
    with pytest.raises(RunError, match="cannot"):
        RunWriter.open(target, {"model": "m"})


def test_no_capture_writes_no_files(tiny_lm, mixed, tmp_path):
    out = tmp_path / "run"
    run_benchmark(
        tiny_lm, mixed, capture=None, options=EvalOptions(max_new_tokens=2), out=out, progress=False
    )
    info = open_run(out)
    assert len(info.entries) == 6 and all(e.file is None for e in info.entries)
    assert not (out / "samples").exists() and not (out / "shards").exists()  # made on first use


def test_loglik_on_open_question_is_refused(tiny_lm):
    with pytest.raises(BenchmarkError, match="no choices"):
        run_benchmark(
            tiny_lm,
            Benchmark("x", [Question("q", "2+2", "4")]),
            options=EvalOptions(mode="loglik"),
            progress=False,
        )


def test_seed_functions(tiny_lm, tmp_path):
    q = {
        "question": "Which is a planet?",
        "choices": ["Mars", "Paris"],
        "answer": "A",
        "id": "planet",
    }
    plain = answer_and_grade_benchmark_question(q, tiny_lm)
    assert (
        set(plain) >= {"response", "correct", "score", "extracted"}
        and plain["activation_file"] is None
    )
    cap = answer_and_grade_benchmark_question(
        q, tiny_lm, capture_activations=True, activation_save_dir=tmp_path / "acts"
    )
    assert cap["correct"] == plain["correct"]
    data = load_activations(cap["activation_file"])
    assert data["metadata"]["extra"]["correct"] == cap["correct"]
    response, act = answer_benchmark_question_with_activations(
        {"question": "2 + 2?", "answer": "4"},
        tiny_lm,
        activation_save_dir=tmp_path / "b",
        max_new_tokens=3,
    )
    assert isinstance(response, str) and act["file"] and "layer_0" in act["activations"]
    assert os.path.exists(act["file"])


def test_cli_eval_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--benchmark",
        f"mmlu:{MMLU_FILE}",
        "--limit",
        "4",
        "--few-shot",
        "1",
        "--layers",
        "all",
        "--token-selection",
        "last",
        "--out",
        str(out),
        "--quiet",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and str(out) in r.output
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "--resume" in r.output
    r = CliRunner().invoke(cli, [*args, "--resume", "--limit", "6"])
    assert r.exit_code == 0, r.output
    check_run(out, 6)
    r = CliRunner().invoke(
        cli,
        ["eval", "--model", str(tiny_model_dir), "--grader", "nope", "--out", str(tmp_path / "x")],
    )
    assert r.exit_code == 1 and "Unknown grader" in r.output


def test_main_py_flags(tiny_model_dir, tmp_path):
    out = tmp_path / "acts"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            "--capture_activations",
            "--activation_save_dir",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--limit",
            "5",
            "--batch_size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout
    check_run(out, 5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_default_model_on_mmlu(default_lm, mode, tmp_path):
    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(4)
    result = run_benchmark(
        default_lm,
        bench,
        capture=CaptureSpec(layers=[0, -1], token_selection="last"),
        options=EvalOptions(mode=mode, batch_size=4, max_new_tokens=16),
        out=tmp_path / mode,
        progress=False,
    )
    assert result.n == 4
    info = check_run(tmp_path / mode, 4)
    data = load_activations(tmp_path / mode / info.entries[0].file)
    assert data["activations"]["layer_29"].shape == (576,)
    if mode == "generate":
        assert all(r["response"] for r in result.records)


@pytest.mark.parametrize("selection", ["all", "last"])
def test_shared_prefix_cache_equals_plain_path(tiny_lm, selection):
    from actcap.bench.prompts import build_prompt
    from actcap.bench.scoring import answer_loglik
    from actcap.capture import resolve_sites

    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(5)
    qs = bench.questions
    prompts = [build_prompt(tiny_lm.tokenizer, q, bench.shots_for(q, 3), "loglik") for q in qs]
    spec = CaptureSpec(layers=["embeddings", 0, -1], token_selection=selection)
    sites = resolve_sites(tiny_lm.model, tiny_lm.layout, spec.layers)
    plain = answer_loglik(tiny_lm, qs, prompts, spec, sites, 5, prefix_cache=False)
    cached = answer_loglik(tiny_lm, qs, prompts, spec, sites, 5, prefix_cache=True)
    for p, c in zip(plain, cached, strict=True):
        assert c.response == p.response
        assert c.choice_logprobs == pytest.approx(p.choice_logprobs, abs=1e-4)
        assert torch.equal(c.input_ids, p.input_ids)
        for name in p.activations:
            assert c.activations[name].shape == p.activations[name].shape
            torch.testing.assert_close(
                c.activations[name], p.activations[name], atol=1e-4, rtol=1e-4
            )


def test_prefix_cache_is_used_for_few_shot(tiny_lm, monkeypatch):
    from actcap.bench import scoring

    calls = []
    real = scoring._loglik_shared_prefix
    monkeypatch.setattr(
        scoring, "_loglik_shared_prefix", lambda *a: calls.append(r := real(*a)) or r
    )
    bench = load_benchmark(f"mmlu:{MMLU_FILE}").limited(4)
    run_benchmark(
        tiny_lm,
        bench,
        capture=CaptureSpec(layers=[0]),
        options=EvalOptions(few_shot=3, batch_size=4),
        progress=False,
    )
    assert calls and calls[0] is not None
