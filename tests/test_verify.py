"""Verification (issue #14): every run re-checks its stored activations against the model run on
each prompt alone, and a storage dtype too small for the values is never silent."""

import json
import uuid

import fsspec
import pytest
import torch
from click.testing import CliRunner

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.bench.verify import (
    VerificationWarning,
    default_count,
    record_verification,
    tolerance_for,
    verify_run,
)
from actcap.capture import CaptureSpec
from actcap.cli.main import cli
from actcap.errors import UnknownNameError
from actcap.models import wrap_model
from actcap.storage import ActivationFile, open_run, save_activations
from tests.conftest import DATA, build_tiny_model

MMLU = DATA / "mmlu" / "test" / "high_school_geography_test.csv"
ALL_SITES = CaptureSpec(layers=["embeddings", "all", "final_norm"], kinds=("resid", "attn", "mlp"))


def evaluate(lm, out, capture=ALL_SITES, n=6, verify=0, storage="files", **options):
    bench = load_benchmark(f"mmlu:{MMLU}").limited(n)
    opts = {"few_shot": 3, "batch_size": n, "max_new_tokens": 4, **options}
    return run_benchmark(
        lm,
        bench,
        capture=capture,
        options=EvalOptions(**opts),
        out=out,
        progress=False,
        storage=storage,
        verify=verify,
    )


def assert_passed(v, n):
    assert v.passed is True, v.problems
    assert v.n_checked == n and not v.problems
    assert all(s.answer == "match" for s in v.samples), [s.answer_detail for s in v.samples]
    assert all(d["max_rel"] <= v.tolerance for d in v.sites.values())


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "qwen3", "gpt_neox", "opt"])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_passes_on_correct_runs_of_several_architectures(
    model_type, prefix_cache, tiny_tokenizer, tmp_path
):
    lm = wrap_model(build_tiny_model(model_type), tiny_tokenizer, model_type)
    evaluate(lm, tmp_path / "run", prefix_cache=prefix_cache)
    v = verify_run(tmp_path / "run", lm, n=6, seed=0)
    assert_passed(v, 6)
    last = f"layer_{lm.layout.num_layers - 1}"
    refs = {c.site: c.reference for c in v.samples[0].sites}
    assert refs["embeddings"] == "hidden_states[0]" and refs["layer_0"] == "hidden_states[1]"
    assert refs[last] == "hook" and refs["final_norm"] == "hook" and refs["layer_0.mlp"] == "hook"
    assert v.seed == 0 and v.basis["compute_dtype"] == "float32"


@pytest.mark.parametrize(
    ("mode", "selection", "generated", "storage", "options"),
    [
        ("loglik", "all", False, "files", {"prefix_cache": False}),
        ("loglik", "last", False, "shards", {}),
        ("loglik", "mean", False, "files", {}),
        ("loglik", "all", False, "files", {"choice_format": "text", "few_shot": 0}),
        ("generate", "all", True, "shards", {}),
        ("generate", "last", True, "files", {}),
        ("generate", "mean", False, "files", {}),
    ],
)
def test_eval_verify_passes_for_modes_selections_and_layouts(
    tiny_lm, tmp_path, mode, selection, generated, storage, options
):
    capture = CaptureSpec(
        layers=["embeddings", 0, -1], token_selection=selection, capture_generated=generated
    )
    out = tmp_path / "run"
    result = evaluate(
        tiny_lm, out, capture=capture, verify=4, storage=storage, mode=mode, **options
    )
    v = result.verification
    assert v["passed"] is True, v["problems"]
    assert v["n_checked"] == 4 and isinstance(v["seed"], int)
    assert {s["answer"] for s in v["samples"]} == {"match"}
    assert set(v["sites"]) == {"embeddings", "layer_0", "layer_2"}
    assert json.loads((out / "results.json").read_text())["verification"] == v


def test_a_url_run_verifies_and_records(tiny_lm):
    url = f"memory://actcap-verify-{uuid.uuid4().hex[:8]}/run"
    try:
        result = evaluate(tiny_lm, url, verify=2, storage="auto")  # a URL run is sharded
        assert result.verification["passed"] is True
        v = verify_run(url, tiny_lm, n=6)
        assert_passed(v, 6)
        record_verification(url, v.to_json())
        assert open_run(url).results["verification"]["n_checked"] == 6
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(url.removeprefix("memory://")):
            fs.rm(url.removeprefix("memory://"), recursive=True)


def test_default_count_and_tolerances():
    assert [default_count(n) for n in (0, 1, 42, 200, 201, 1600, 14_042)] == [0, 1, 1, 1, 2, 8, 8]
    f32, _ = tolerance_for(torch.float32, torch.float32)
    bf16_store, _ = tolerance_for(torch.float32, torch.bfloat16)
    bf16, answer = tolerance_for(torch.bfloat16, torch.bfloat16)
    assert f32 < bf16_store < bf16 and answer > tolerance_for(torch.float32, torch.float32)[1]


def test_tolerance_follows_the_runs_compute_precision(tiny_lm):
    from actcap.bench.verify import run_setup

    config = {"capture": {"dtype": "float32"}, "compute": {"dtype": "float32"}}
    assert run_setup(config, tiny_lm).compute == torch.float32
    config["compute"]["matmul_precision"] = "medium"  # float32 matmuls in bfloat16
    assert run_setup(config, tiny_lm).compute == torch.bfloat16
    config["compute"] = {"dtype": "float16", "matmul_precision": "highest"}
    assert run_setup(config, tiny_lm).compute == torch.float16
    config["compute"] = {"dtype": "int3"}  # unreadable: the verifying model's own
    assert run_setup(config, tiny_lm).compute == torch.float32


def tamper(path, site, scale=1e-2):
    """Rewrite a sample file with one site changed by ``scale`` of its size."""
    with ActivationFile(path) as f:
        tensors = {name: f.get(name).clone() for name in f.names}
        meta = f.meta
    t = tensors[site]
    t[0] += scale * t[0].norm() / t.shape[-1] ** 0.5
    ids = {k: tensors.pop(k, None) for k in ("input_ids", "output_ids")}
    save_activations(path, tensors, meta, **ids)


def test_altered_activations_fail(tiny_lm, tmp_path):
    out = tmp_path / "run"
    evaluate(tiny_lm, out)
    entry = open_run(out).entries[2]
    tamper(out / entry.file, "layer_1.mlp")
    v = verify_run(out, tiny_lm, sample_ids=[entry.id])
    assert v.passed is False and v.n_checked == 1
    (bad,) = [c for c in v.samples[0].sites if not c.ok]
    assert bad.site == "layer_1.mlp" and bad.max_rel > v.tolerance
    assert "layer_1.mlp" in v.summary() and "FAILED" in v.summary()
    others = [e.id for e in open_run(out).entries if e.id != entry.id]
    assert verify_run(out, tiny_lm, sample_ids=others).passed is True
    with pytest.raises(UnknownNameError, match="no-such-id"):
        verify_run(out, tiny_lm, sample_ids=["no-such-id"])
    (out / open_run(out).entries[3].file).write_bytes(b"not a safetensors file")
    v = verify_run(out, tiny_lm, sample_ids=[open_run(out).entries[3].id])
    assert v.passed is False and "unreadable" in v.problems[0]


def positions_over_padding(mask):
    """The bug: positions counted over the padding too, so left-padded rows start late."""
    return torch.arange(mask.shape[1], device=mask.device).expand_as(mask)


@pytest.mark.parametrize("bug", ["positions", "right_padding"])
def test_wrong_batching_fails(tiny_tokenizer, tmp_path, monkeypatch, bug):
    from actcap.capture import collect

    if bug == "positions":
        # GPT-2 has absolute position embeddings (RoPE models are blind to a constant shift).
        lm = wrap_model(build_tiny_model("gpt2"), tiny_tokenizer, "gpt2")
        monkeypatch.setattr(collect, "position_ids_for", positions_over_padding)
    else:
        lm = wrap_model(build_tiny_model("llama"), tiny_tokenizer, "llama")
        monkeypatch.setattr(tiny_tokenizer, "padding_side", "right")
    capture = CaptureSpec(layers=[0, -1])
    with pytest.warns(VerificationWarning, match="FAILED"):
        result = evaluate(lm, tmp_path / "run", capture, verify=6, few_shot=0, prefix_cache=False)
    v = result.verification
    assert v["passed"] is False
    assert any("relative difference" in p for p in v["problems"])
    lengths = [r["n_prompt_tokens"] for r in result.records]
    assert len(set(lengths)) > 1  # padding was there to get wrong


def huge_lm(tiny_tokenizer):
    """A tiny Llama whose embeddings are scaled so the residual stream exceeds float16's 65,504."""
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)
    return wrap_model(model, tiny_tokenizer, name="huge-llama")


@pytest.mark.parametrize(
    ("selection", "options"),
    [
        ("all", {"few_shot": 0, "prefix_cache": False}),
        ("last", {"few_shot": 3}),  # the shared-prefix path
        ("all", {"mode": "generate"}),
    ],
)
def test_float16_overflow_is_counted_recorded_and_fails_verification(
    tiny_tokenizer, tmp_path, selection, options
):
    lm = huge_lm(tiny_tokenizer)
    capture = CaptureSpec(
        layers=["embeddings", 0, 1],
        dtype="float16",
        token_selection=selection,
        capture_generated="mode" in options,
    )
    out = tmp_path / "run"
    with pytest.warns(VerificationWarning, match="bfloat16") as caught:
        result = evaluate(lm, out, capture, n=4, verify=4, **options)
    assert any("embeddings" in str(w.message) for w in caught)
    info = open_run(out)
    total = 0
    for entry, source in info.sample_paths():
        with ActivationFile(source) as f:
            stored = {s: int(torch.isinf(f.get(s)).sum()) for s in f.sites}
            in_meta = f.meta.extra.get("nonfinite", {})
        counted = entry.record.get("nonfinite", {})
        assert counted == {s: c for s, c in stored.items() if c} == in_meta
        total += sum(counted.values())
    assert total > 0 and info.results["nonfinite"]["values"] == total
    assert info.results["nonfinite"]["sites"]["embeddings"] > 0
    v = result.verification
    assert v["passed"] is False
    assert any("float16 cannot hold" in p for p in v["problems"])
    assert any(c["nonfinite"] for s in v["samples"] for c in s["sites"])


def test_bfloat16_holds_what_float16_cannot(tiny_tokenizer, tmp_path):
    lm = huge_lm(tiny_tokenizer)
    capture = CaptureSpec(layers=["embeddings", 0, 1], dtype="bfloat16")
    result = evaluate(lm, tmp_path / "run", capture, n=4, verify=4)  # no warning
    assert result.verification["passed"] is True
    assert "nonfinite" not in open_run(tmp_path / "run").results


def test_cli_eval_verify_and_verify_command(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", f"mmlu:{MMLU}", "--limit", "5"]
    args += ["--few-shot", "2", "--layers", "0,-1", "--quiet", "--out", str(out)]
    r = CliRunner().invoke(cli, [*args, "--verify", "2"])
    assert r.exit_code == 0, r.output
    assert "verification passed: 2 of 5 samples" in r.output
    assert json.loads((out / "results.json").read_text())["verification"]["n_checked"] == 2
    r = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "off"), "--verify", "0"])
    assert r.exit_code == 0 and "verification" not in r.output
    assert "verification" not in json.loads((tmp_path / "off" / "results.json").read_text())

    r = CliRunner().invoke(cli, ["verify", str(out), "--n", "5", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "layer_0" in r.output and "verification passed: 5 of 5" in r.output
    assert json.loads((out / "results.json").read_text())["verification"]["seed"] == 3

    entry = open_run(out).entries[1]
    tamper(out / entry.file, "layer_2")
    r = CliRunner().invoke(cli, ["verify", str(out), "--samples", entry.id, "--no-record"])
    assert r.exit_code == 1
    assert "WARNING: verification FAILED" in r.output and "layer_2" in r.output
    assert json.loads((out / "results.json").read_text())["verification"]["passed"] is True
    r = CliRunner().invoke(cli, ["verify", str(out), "--samples", "nope"])
    assert r.exit_code == 1 and "no activations for sample(s) nope" in r.output
    assert "Traceback" not in r.output


def test_report_shows_the_verdict_red_when_it_failed(tiny_lm, tmp_path):
    from actcap.analysis import build_report

    out = tmp_path / "run"
    evaluate(tiny_lm, out, capture=CaptureSpec(layers=[0, 1]), n=4, verify=2)
    page = build_report(out, tmp_path / "ok.html").read_text()
    assert "<p class='ok' id='verification'>Verification passed: 2 of 4 samples" in page
    entry = open_run(out).entries[0]
    tamper(out / entry.file, "layer_1")
    record_verification(out, verify_run(out, tiny_lm, sample_ids=[entry.id]).to_json())
    page = build_report(out, tmp_path / "bad.html").read_text()
    assert "<p class='bad' id='verification'>Verification FAILED: 1 of 4 samples" in page
    assert "layer_1: relative difference" in page


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b'{"a":' * 100_000])
def test_recording_into_an_unreadable_results_json_is_a_one_line_error(tmp_path, content):
    from actcap.bench.verify import record_verification
    from actcap.errors import FormatError

    (tmp_path / "results.json").write_bytes(content)
    with pytest.raises(FormatError, match="results.json"):
        record_verification(tmp_path, {"passed": True})
    assert (tmp_path / "results.json").read_bytes() == content
