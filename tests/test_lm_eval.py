"""lm-evaluation-harness with capture (issue #15): ActcapLM, `eval --task`, `actcap lm-eval`.

Offline: the tasks are local YAMLs in tests/lm_eval_tasks/ over small files built from the MMLU
and GSM8K data the project ships (their `data_files` are relative to the repository root, as
lm-eval reads them relative to the working directory). Parity is with lm-eval's own `hf` model
on the same tiny model folder: per document, the same answers, filtered answers and metrics.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from actcap.cli.main import cli
from actcap.errors import MissingDependencyError, RunError, UnknownNameError
from tests.conftest import REPO

pytest.importorskip("lm_eval")  # make install puts it in .venv; the absence test simulates none

TASKS = REPO / "tests" / "lm_eval_tasks"
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lm_eval"),
    pytest.mark.filterwarnings("ignore::UserWarning:datasets"),
]


@pytest.fixture(scope="module", autouse=True)
def in_repo() -> Any:
    """lm-eval reads `data_files` relative to the working directory."""
    before = Path.cwd()
    os.chdir(REPO)
    yield
    os.chdir(before)


@pytest.fixture(scope="module", autouse=True)
def no_environment_report() -> Any:
    """lm-eval describes the machine after every evaluation (~1 s of subprocesses): not here."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda _: None), (lambda: None)
    yield
    evaluator.add_env_info, evaluator.get_git_commit_hash = saved


@pytest.fixture(scope="module")
def manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    from actcap.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", cache=False)


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model_dir), batch_size=4, device="cpu")


def evaluate(model: Any, manager: Any, task: str, **kw: Any) -> dict[str, Any]:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model, tasks=[task], task_manager=manager, bootstrap_iters=0, **kw
    )


def actcap_lm(loaded: Any, out: Path | None, **kw: Any) -> Any:
    from actcap.lm_eval import ActcapLM

    kw.setdefault("token_selection", "last")
    return ActcapLM(loaded, capture_dir=out, batch_size=4, progress=False, **kw)


def manifest(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def assert_close(x: Any, y: Any) -> None:
    """Equal, floats to float noise (log-likelihoods of one math in other batch shapes)."""
    if isinstance(x, float) and not isinstance(x, bool):
        assert x == pytest.approx(y, abs=1e-4, rel=1e-5)
    elif isinstance(x, list | tuple):
        assert isinstance(y, list | tuple) and len(x) == len(y), (x, y)
        for a, b in zip(x, y, strict=True):
            assert_close(a, b)
    else:
        assert x == y


def assert_same_per_document(ours: dict[str, Any], theirs: dict[str, Any], task: str) -> None:
    """Per document: the same answers, filtered answers and metrics; the same aggregates."""
    a, b = ours["samples"][task], theirs["samples"][task]
    assert [(s["doc_id"], s["filter"]) for s in a] == [(s["doc_id"], s["filter"]) for s in b]
    for x, y in zip(a, b, strict=True):
        assert x["arguments"] == y["arguments"]
        assert_close(x["resps"], y["resps"])
        assert_close(x["filtered_resps"], y["filtered_resps"])
        for metric in x["metrics"]:
            assert_close(
                float(x[metric]) if not isinstance(x[metric], tuple) else x[metric], y[metric]
            )
    for key, value in theirs["results"][task].items():
        if isinstance(value, float):
            assert ours["results"][task][key] == pytest.approx(value, rel=1e-5), key


# --- parity with lm-eval's `hf` ------------------------------------------------------------


def test_letters_task_same_as_hf_and_every_document_stored_with_its_metrics(
    loaded, hf, manager, tmp_path
):
    """MMLU by letters, 2-shot: the shared few-shot prefix runs once; one pass per document."""
    run = tmp_path / "letters"
    ours = evaluate(actcap_lm(loaded, run), manager, "actcap_mmlu_letters", num_fewshot=2)
    theirs = evaluate(hf, manager, "actcap_mmlu_letters", num_fewshot=2, log_samples=True)
    assert_same_per_document(ours, theirs, "actcap_mmlu_letters")

    lines = manifest(run)
    assert [r["id"] for r in lines] == [f"actcap_mmlu_letters/{i}" for i in range(24)]
    by_doc = {s["doc_id"]: s for s in theirs["samples"]["actcap_mmlu_letters"]}
    for r in lines:
        hf_doc = by_doc[r["doc_id"]]
        assert r["metrics"] == {"acc,none": hf_doc["acc"]}
        assert r["correct"] is bool(hf_doc["acc"]) and r["acc"] == hf_doc["acc"]
        assert r["prompt"] == hf_doc["arguments"][0][0]
        assert r["continuations"] == [" A", " B", " C", " D"]
        assert r["reference"] == " ABCD"[1 + hf_doc["target"]]
    results = json.loads((run / "results.json").read_text())
    assert results["accuracy"] == pytest.approx(
        theirs["results"]["actcap_mmlu_letters"]["acc,none"]
    )
    assert results["lm_eval"]["results"]["actcap_mmlu_letters"]["acc,none"] == results["accuracy"]

    from actcap.storage import load_activations

    sample = load_activations(run / lines[0]["file"])
    expected = [f"layer_{i}" for i in range(3)] + ["embeddings"]
    assert sorted(sample["activations"]) == sorted(expected)
    assert sample["activations"]["layer_1"].shape == (32,)  # last token of the context
    ids = loaded.tokenizer.encode(lines[0]["prompt"])
    assert sample["input_ids"].tolist() == ids


def test_chat_template_prompts_same_as_hf(loaded, hf, manager):
    """lm-eval's --apply-chat-template: the model's chat template writes the few-shot turns."""
    kw = {"num_fewshot": 1, "limit": 4, "apply_chat_template": True}
    ours = evaluate(actcap_lm(loaded, None), manager, "actcap_mmlu_letters", **kw)
    theirs = evaluate(hf, manager, "actcap_mmlu_letters", log_samples=True, **kw)
    assert_same_per_document(ours, theirs, "actcap_mmlu_letters")
    assert ours["samples"]["actcap_mmlu_letters"][0]["arguments"][0][0].startswith("<|user|>")


def test_choice_texts_with_acc_norm_same_as_hf(loaded, hf, manager, tmp_path):
    """HellaSwag style: multi-token continuations run after the context on its cache."""
    run = tmp_path / "texts"
    ours = evaluate(actcap_lm(loaded, run), manager, "actcap_mmlu_texts", limit=12)
    theirs = evaluate(hf, manager, "actcap_mmlu_texts", limit=12, log_samples=True)
    assert_same_per_document(ours, theirs, "actcap_mmlu_texts")
    for r, s in zip(manifest(run), theirs["samples"]["actcap_mmlu_texts"], strict=True):
        assert (r["acc"], r["acc_norm"]) == (s["acc"], s["acc_norm"])
        assert r["metrics"] == {"acc,none": s["acc"], "acc_norm,none": s["acc_norm"]}


def test_generation_with_regex_filters_same_as_hf(loaded, hf, manager, tmp_path):
    """GSM8K style: the same greedy text, the same answers taken out by each regex filter."""
    run = tmp_path / "gsm"
    model = actcap_lm(loaded, run, capture_generated=True, token_selection="all")
    ours = evaluate(model, manager, "actcap_gsm8k", limit=8)
    theirs = evaluate(hf, manager, "actcap_gsm8k", limit=8, log_samples=True)
    assert_same_per_document(ours, theirs, "actcap_gsm8k")
    words = [
        s["filtered_resps"]
        for s in theirs["samples"]["actcap_gsm8k"]
        if s["filter"] == "first-word"
    ]
    assert any(w != ["[invalid]"] for w in words)  # the filter takes something out
    lines = manifest(run)
    strict = {
        s["doc_id"]: s for s in theirs["samples"]["actcap_gsm8k"] if s["filter"] == "strict-match"
    }
    for r in lines:
        assert r["generations"] == strict[r["doc_id"]]["resps"][0]
        assert set(r["metrics"]) == {
            "exact_match,strict-match",
            "exact_match,flexible-extract",
            "exact_match,first-word",
        }
        assert r["main_metric"] == "exact_match,strict-match"
        assert r["extracted"] == strict[r["doc_id"]]["filtered_resps"][0]
    from actcap.storage import load_activations

    first = load_activations(run / lines[0]["file"])
    n_out = lines[0]["n_output_tokens"]
    assert first["output_ids"].numel() == n_out
    # capture_generated: the prompt's tokens and every answer token the model read
    assert first["activations"]["layer_0"].shape[0] == lines[0]["n_prompt_tokens"] + n_out - 1


def test_a_generated_answer_ends_at_its_stop_token_or_stop_string(loaded):
    model = actcap_lm(loaded, None)
    tok = loaded.tokenizer
    ids = tok.encode("the answer is 4.\n\nQuestion: and then")
    kept = model._kept_length(ids, ["\n\n", "Question:"])
    assert tok.decode(ids[:kept]).endswith("\n\n") and "\n\n" not in tok.decode(ids[: kept - 1])
    eos = [*ids[:3], tok.eos_token_id, *ids[3:]]
    assert model._kept_length(eos, ["\n\n"]) == 4  # the stop token, kept
    assert model._kept_length(ids[:4], ["\n\n"]) == 4  # no stop: every token


def test_rolling_loglikelihood_same_as_hf(loaded, hf, manager, tmp_path):
    run = tmp_path / "rolling"
    ours = evaluate(actcap_lm(loaded, run), manager, "actcap_gsm8k_rolling", limit=4)
    theirs = evaluate(hf, manager, "actcap_gsm8k_rolling", limit=4, log_samples=True)
    assert_same_per_document(ours, theirs, "actcap_gsm8k_rolling")
    lines = manifest(run)
    assert all(r["correct"] is None and "word_perplexity" in r for r in lines)  # no 0/1 grade


# --- the engine ----------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [0, 40], ids=["plain", "shared-prefix"])
def test_engine_scores_and_activations_equal_one_context_alone(tiny_lm, shared):
    from actcap.capture import CaptureSpec, resolve_sites
    from actcap.lm_eval.engine import score_contexts

    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 380, (shared,), generator=g).tolist()
    contexts = [prefix + torch.randint(3, 380, (n,), generator=g).tolist() for n in (5, 9, 2)]
    conts = [[[7], [11, 12, 13]], [[5, 6]], [[9], [4, 4, 4, 4]]]
    spec = CaptureSpec(layers=[0, 1], token_selection="all")
    sites = resolve_sites(tiny_lm.model, tiny_lm.layout, spec.layers, spec.kinds)
    rows = score_contexts(tiny_lm, contexts, conts, spec, sites)
    with torch.inference_mode():
        for ctx, cs, row in zip(contexts, conts, rows, strict=True):
            for c, (ll, greedy) in zip(cs, row.scores, strict=True):
                out = tiny_lm.model(torch.tensor([ctx + c]), output_hidden_states=True)
                lp = torch.log_softmax(out.logits[0, len(ctx) - 1 : -1].float(), -1)
                picked = lp[torch.arange(len(c)), torch.tensor(c)]
                assert ll == pytest.approx(float(picked.sum()), abs=1e-4)
                assert greedy == bool((lp.argmax(-1) == torch.tensor(c)).all())
            alone = tiny_lm.model(torch.tensor([ctx]), output_hidden_states=True).hidden_states
            torch.testing.assert_close(
                row.activations["layer_0"], alone[1][0], atol=1e-5, rtol=1e-4
            )
            torch.testing.assert_close(
                row.activations["layer_1"], alone[2][0], atol=1e-5, rtol=1e-4
            )


# --- actcap eval --task: the run directory, resume, crashes -----------------------------------


def eval_task(model_dir: Path, out: Path, *extra: str) -> Any:
    args = ["eval", "--model", str(model_dir), "--task", "actcap_mmlu_letters"]
    args += ["--tasks-path", str(TASKS), "--layers", "0-1", "--token-selection", "last"]
    return CliRunner().invoke(cli, [*args, "--out", str(out), "--quiet", *extra])


def test_eval_task_writes_lm_eval_metrics_with_stderrs_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = eval_task(tiny_model_dir, out, "--limit", "6")
    assert r.exit_code == 0, r.output
    assert "acc,none" in r.output and "accuracy" in r.output
    results = json.loads((out / "results.json").read_text())
    task = results["lm_eval"]["results"]["actcap_mmlu_letters"]
    assert set(task) >= {"acc,none", "acc_stderr,none"} and task["acc_stderr,none"] > 0
    assert results["n_questions"] == 6 and results["answered_this_session"] == 6
    first = manifest(out)

    again = eval_task(tiny_model_dir, out, "--limit", "6")
    assert again.exit_code == 1 and "--resume" in again.output
    more = eval_task(tiny_model_dir, out, "--limit", "8", "--resume")
    assert more.exit_code == 0, more.output
    results = json.loads((out / "results.json").read_text())
    assert results["answered_this_session"] == 2 and results["n_questions"] == 8
    lines = manifest(out)
    assert [r["id"] for r in lines] == [f"actcap_mmlu_letters/{i}" for i in range(8)]
    assert lines[:6] == first  # finished documents answered from the run, unchanged
    changed = eval_task(tiny_model_dir, out, "--limit", "8", "--resume", "--num-fewshot", "1")
    assert changed.exit_code == 1 and "num_fewshot differs" in changed.output


def test_crash_keeps_answered_documents_and_resume_equals_an_uninterrupted_run(
    loaded, manager, tmp_path, monkeypatch
):
    import lm_eval.evaluator as evaluator

    from actcap.lm_eval import engine

    clean = tmp_path / "clean"
    evaluate(actcap_lm(loaded, clean), manager, "actcap_mmlu_letters", limit=12)

    crashed = tmp_path / "crashed"
    real = engine.score_contexts
    calls = {"n": 0}

    def dies_on_third_batch(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is stopped mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "score_contexts", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(actcap_lm(loaded, crashed), manager, "actcap_mmlu_letters", limit=12)
    monkeypatch.setattr(engine, "score_contexts", real)
    done = manifest(crashed)
    assert len(done) == 8 and all(r["correct"] is None for r in done)  # two batches of four
    assert not (crashed / "results.json").exists()

    # Scored by lm-eval but finished before the metrics were attached: answered, correct=None.
    half = tmp_path / "half"
    model = actcap_lm(loaded, half)
    plain = evaluator.simple_evaluate.__wrapped__
    plain(
        model=model,
        tasks=["actcap_mmlu_letters"],
        task_manager=manager,
        limit=12,
        bootstrap_iters=0,
    )
    model.close()
    assert all(r["correct"] is None for r in manifest(half))

    for run in (crashed, half):
        resumed = actcap_lm(loaded, run, resume=True)
        out = evaluate(resumed, manager, "actcap_mmlu_letters", limit=12, log_samples=False)
        assert "samples" not in out  # asked for by the wrapper, not by the caller
        assert manifest(run) == [
            {**r, "file": mine["file"]}
            for r, mine in zip(manifest(clean), manifest(run), strict=True)
        ]
    assert resumed.results is not None and resumed.results["answered_this_session"] == 0


def test_resume_refuses_documents_answered_for_other_prompts(loaded, manager, tmp_path):
    run = tmp_path / "run"
    evaluate(actcap_lm(loaded, run, capture=False), manager, "actcap_mmlu_letters", limit=4)
    assert not (run / "samples").exists()  # capture off: the manifest only
    lines = manifest(run)
    lines[1]["prompt"] = "another prompt"
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(RunError, match="actcap_mmlu_letters/1.*other requests"):
        model = actcap_lm(loaded, run, capture=False, resume=True)
        evaluate(model, manager, "actcap_mmlu_letters", limit=4)


def test_analysis_commands_work_on_an_lm_eval_run(loaded, manager, tmp_path):
    run = tmp_path / "run"
    evaluate(actcap_lm(loaded, run, layers="0|1"), manager, "actcap_mmlu_letters")
    probe = CliRunner().invoke(cli, ["probe", str(run), "--target", "correct", "--folds", "2"])
    assert probe.exit_code == 0, probe.output
    assert "layer_1" in probe.output
    report = CliRunner().invoke(cli, ["report", str(run), "-o", str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "r.html").read_text()
    assert "actcap_mmlu_letters/0" in html


# --- lm-eval's own command line ------------------------------------------------------------


def test_actcap_lm_eval_runs_lm_evals_command_line_with_the_actcap_model(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = f"pretrained={tiny_model_dir},capture_dir={run},layers=0|2,token_selection=mean"
    r = CliRunner().invoke(
        cli,
        ["lm-eval", "--model", "actcap", "--model_args", args, "--tasks", "actcap_mmlu_letters"]
        + ["--include_path", str(TASKS), "--limit", "4", "--batch_size", "2"],
    )
    assert r.exit_code == 0, r.output
    lines = manifest(run)
    assert len(lines) == 4 and all(isinstance(x["correct"], bool) for x in lines)
    from actcap.storage import load_activations

    sample = load_activations(run / lines[0]["file"])
    assert sorted(sample["activations"]) == ["layer_0", "layer_2"]


# --- refusals ------------------------------------------------------------------------------


def test_unknown_task_and_unknown_model_argument_are_refused_with_suggestions(manager, loaded):
    from actcap.lm_eval.runner import check_names

    with pytest.raises(UnknownNameError) as e:
        check_names(manager, ["actcap_mmlu_letters", "actcap_mmlu_leters"], TASKS)
    message = str(e.value)
    assert "Unknown lm-eval task(s) 'actcap_mmlu_leters'" in message and "\n" not in message
    assert "Did you mean 'actcap_mmlu_letters'" in message and str(TASKS) in message
    with pytest.raises(UnknownNameError, match="unknown argument.*layer_s"):
        actcap_lm(loaded, None, layer_s="all")


def test_task_options_refused_where_they_mean_nothing():
    r = CliRunner().invoke(cli, ["eval", "--task", "x", "--few-shot", "2", "--mode", "loglik"])
    assert r.exit_code == 2 and "--few-shot, --mode cannot go with --task" in r.output
    assert "--num-fewshot" in r.output
    r = CliRunner().invoke(cli, ["eval", "--num-fewshot", "2"])
    assert r.exit_code == 2 and "--num-fewshot needs --task" in r.output


def test_without_lm_eval_task_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    r = CliRunner().invoke(cli, ["eval", "--task", "arc_easy", "--out", "unused"])
    assert r.exit_code == 1
    assert "pip install 'actcap[lm-eval]'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["lm-eval", "--tasks", "arc_easy"])
    assert r.exit_code == 1 and "pip install 'actcap[lm-eval]'" in r.output
    import actcap.lm_eval

    with pytest.raises(MissingDependencyError, match=r"actcap\[lm-eval\]"):
        actcap.lm_eval.ActcapLM  # noqa: B018


# --- our own sources read lm-eval's spellings ----------------------------------------------


def test_our_sources_take_lm_eval_task_spellings(tmp_path):
    from actcap.bench import load_benchmark
    from actcap.errors import BenchmarkError

    mmlu = load_benchmark("mmlu_world_religions:data/mmlu")
    assert (
        mmlu.questions == load_benchmark("mmlu:data/mmlu/test/world_religions_test.csv").questions
    )
    assert list(mmlu.few_shot) == ["world_religions"]
    with pytest.raises(BenchmarkError, match="no astronomy_test.csv"):
        load_benchmark("mmlu_astronomy:data/mmlu")
    tqa = tmp_path / "tqa.csv"
    tqa.write_text(
        "Question,Best Answer,Correct Answers,Incorrect Answers\n"
        "What colour is the sky?,Blue,Blue; Azure,Green; Red\n"
    )
    mc = load_benchmark(f"truthfulqa_mc1:{tqa}")
    assert mc.questions[0].choices and mc.questions == load_benchmark(f"truthfulqa:{tqa}").questions
    gen = load_benchmark(f"truthfulqa_gen:{tqa}")
    assert not gen.questions[0].choices


def test_lm_eval_benchmark_smoke(tiny_model_dir, tmp_path):
    from benchmarks import bench_lm_eval

    figures = bench_lm_eval.main(
        ["--model", str(tiny_model_dir), "--quick", "--tasks", "letters,gsm8k"]
        + ["--threads", str(torch.get_num_threads()), "--json", str(tmp_path / "f.json")]
    )
    assert {f["task"] for f in figures} == {"actcap_mmlu_geography", "actcap_gsm8k_zero_shot"}
    assert all(f["answers_equal_hf"] and f["qps"] > 0 for f in figures)
