"""A newcomer's first hour (issue #11, items 12-14): clear refusals, fast failures, helpful hints.

GSM8K references that are no number; prompts far longer than the context refused before they
are tokenised; misspelled models and sites answered with the nearest names; Ray workers asking
for resources the cluster lacks; Ctrl-C saying how to resume; every option with help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import socket
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from actcap.bench.graders import numeric, parse_number
from actcap.bench.questions import Benchmark, Question
from actcap.bench.runner import EvalOptions, plan_questions
from actcap.bench.sources import load_benchmark, load_gsm8k
from actcap.capture.sites import resolve_sites
from actcap.cli.main import cli
from actcap.errors import BenchmarkError, CaptureError, ModelLoadError, UnknownNameError
from actcap.models import MAX_CHARS_PER_TOKEN, context_length, load_model
from tests.conftest import DATA, REPO

MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"
HUGE = "word " * 10_000_000  # 50 MB
"""The 50 MB prompt of the issue (it took 6.8 GB to tokenise before being refused)."""


# --- item 12: GSM8K references -------------------------------------------------------------


def write_gsm8k(path: Path, references: list[str]) -> Path:
    lines = [
        json.dumps({"question": f"Question {i}?", "answer": f"Work it out.\n#### {ref}"})
        for i, ref in enumerate(references)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad", ["", "   ", "twelve", "about 5", "3/4 of it", "1/0"])
def test_gsm8k_reference_that_is_no_number_is_refused_naming_the_line(tmp_path, bad):
    f = write_gsm8k(tmp_path / "gsm.jsonl", ["42", bad])
    with pytest.raises(BenchmarkError) as e:
        load_gsm8k(f)
    message = str(e.value)
    assert str(f) in message and "line 2" in message and "not a number" in message
    assert "\n" not in message


def test_gsm8k_numbers_fractions_and_thousands_are_references_graded_right(tmp_path):
    f = write_gsm8k(tmp_path / "gsm.jsonl", ["1,234", "-3", "2.5", "3/4", "$18"])
    bench = load_benchmark(f"gsm8k:{f}")
    refs = [q.answer for q in bench.questions]
    assert refs == ["1234", "-3", "2.5", "3/4", "18"]
    responses = [
        "So the total is 1,234.",
        "The answer is -3",
        "She runs 2.5 miles.",
        "He ate 3/4 of the pie.",
        "It costs $18.",
    ]
    for response, ref in zip(responses, refs, strict=True):
        assert numeric(response, ref).correct, (response, ref)
    assert numeric("That is 0.75 of it", "3/4").correct
    assert not numeric("He ate 3/5 of the pie.", "3/4").correct
    assert not numeric("The date was 3/4/2020", "3/4").correct  # a date is no fraction


def test_parse_number_fractions_and_non_numbers():
    assert parse_number("3/4") == 0.75
    assert parse_number("-1/2") == -0.5
    assert parse_number("1,234") == 1234.0
    for text in ("", "twelve", "nan", "inf", "1/0", "3/4/5"):
        assert parse_number(text) is None, text


def test_shipped_gsm8k_loads_with_every_reference_a_number():
    bench = load_gsm8k(DATA / "gsm8k" / "test.jsonl")
    assert all(parse_number(q.answer) is not None for q in bench.questions)


# --- item 13: prompts far longer than the context --------------------------------------------


class RecordingTokenizer:
    """A tokenizer that records how many characters it is asked to tokenise.

    Refuses (fails the test at once) anything over 1 MB, instead of spending gigabytes on it.
    """

    def __init__(self, inner: Any) -> None:
        self.__dict__["inner"] = inner
        self.__dict__["lengths"] = []

    def _record(self, text: Any) -> None:
        texts = [text] if isinstance(text, str) else list(text)
        longest = max((len(t) for t in texts), default=0)
        self.lengths.append(longest)
        assert longest < 1_000_000, f"asked to tokenise {longest:,} characters"

    def encode(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self._record(text)
        return self.inner.encode(text, *args, **kwargs)

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self._record(text)
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)


@pytest.fixture
def spied_lm(tiny_lm):
    return dataclasses.replace(tiny_lm, tokenizer=RecordingTokenizer(tiny_lm.tokenizer))


def test_generate_refuses_a_50_mb_prompt_at_once_without_tokenising_it(spied_lm):
    from actcap import generate_inference_with_activations

    t0 = time.perf_counter()
    with pytest.raises(CaptureError) as e:
        generate_inference_with_activations(HUGE, spied_lm, max_new_tokens=8)
    assert time.perf_counter() - t0 < 2.0
    assert "50,000,000 characters" in str(e.value) and "before tokenising" in str(e.value)
    assert spied_lm.tokenizer.lengths == []  # not a single token computed


def test_generate_refuses_a_prompt_longer_than_the_context_in_tokens(spied_lm):
    from actcap import generate_inference_with_activations

    prompt = "the quick brown fox " * 1000  # ~20,000 characters, more tokens than 2048
    with pytest.raises(CaptureError, match="tokens, more than the"):
        generate_inference_with_activations(prompt, spied_lm, max_new_tokens=8)
    assert max(spied_lm.tokenizer.lengths) < context_length(spied_lm) * MAX_CHARS_PER_TOKEN


def huge_benchmark() -> Benchmark:
    return Benchmark("huge", [Question("big", HUGE, "4"), Question("small", "2 + 2?", "4")])


def test_eval_planning_refuses_a_50_mb_question_before_tokenising_it(spied_lm):
    bench = huge_benchmark()
    t0 = time.perf_counter()
    with pytest.raises(BenchmarkError) as e:
        plan_questions(spied_lm, bench, bench.questions, EvalOptions())
    assert time.perf_counter() - t0 < 5.0
    assert "'big'" in str(e.value) and "characters" in str(e.value)
    assert "--overflow truncate" in str(e.value)
    assert all(n < 1_000_000 for n in spied_lm.tokenizer.lengths)


def test_eval_truncate_keeps_the_end_of_a_50_mb_question_tokenising_a_bounded_part(spied_lm):
    bench = huge_benchmark()
    options = EvalOptions(overflow="truncate", max_new_tokens=8)
    with pytest.warns(UserWarning, match="truncated from 50,0"):
        plan = plan_questions(spied_lm, bench, bench.questions, options)
    big = next(p for p in plan if p.question.id == "big")
    room = context_length(spied_lm) - options.max_new_tokens
    assert len(spied_lm.tokenizer.inner.encode(big.prompt, add_special_tokens=False)) <= room
    assert big.prompt.rstrip().endswith("<|assistant|>")  # the end of the prompt is kept
    assert max(spied_lm.tokenizer.lengths) <= room * MAX_CHARS_PER_TOKEN


# --- item 14: misspelled models ---------------------------------------------------------------


def test_misspelled_default_model_suggests_default_at_once(monkeypatch):
    import transformers

    def no_hub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_pretrained called: the hub would be retried for ~50 s")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model("defualt", cache=False)
    assert time.perf_counter() - t0 < 1.0
    assert "Did you mean 'default'?" in str(e.value)


def test_misspelled_local_folder_suggests_it(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "my-modle"), cache=False)
    assert f"Did you mean {str(folder)!r}?" in str(e.value)


def test_name_that_is_no_hub_id_is_refused_without_the_hub():
    with pytest.raises(ModelLoadError, match="not a valid hub id"):
        load_model("my model!", cache=False)


def test_offline_hub_id_not_in_cache_fails_without_calling_transformers(monkeypatch):
    import transformers

    def no_hub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_pretrained called for a model that cannot load offline")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    with pytest.raises(ModelLoadError) as e:
        load_model("nobody-here/no-such-model-xyz", cache=False)
    assert "HF_HUB_OFFLINE" in str(e.value) and "not in the Hugging Face cache" in str(e.value)


def test_unreachable_hub_fails_fast_instead_of_retrying(monkeypatch):
    from huggingface_hub import constants

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    try:
        t0 = time.perf_counter()
        with pytest.raises(ModelLoadError, match="Cannot reach the Hugging Face hub"):
            load_model("nobody-here/no-such-model-xyz", cache=False)
        assert time.perf_counter() - t0 < 5.0
    finally:
        closed.close()


# --- item 14: misspelled sites ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "first"),
    [
        ("layer_2.mpl", "layer_2.mlp"),
        ("layer_1.atn", "layer_1.attn"),
        ("embedings", "embeddings"),
        ("final_nrom", "final_norm"),
        ("model.layers.0.mlpp", "model.layers.0.mlp"),
    ],
)
def test_misspelled_site_suggests_the_nearest_site_name_first(tiny_lm, request_, first):
    with pytest.raises(UnknownNameError) as e:
        resolve_sites(tiny_lm.model, tiny_lm.layout, request_)
    assert f"Did you mean: {first}" in str(e.value)


def test_misspelled_site_kind_suggests_the_kind(tiny_lm):
    with pytest.raises(UnknownNameError, match="Did you mean 'mlp'"):
        resolve_sites(tiny_lm.model, tiny_lm.layout, None, ("resid", "mpl"))  # type: ignore[arg-type]


def test_cli_misspelled_layer_site_is_one_line_with_the_suggestion(tiny_model_dir, tmp_path):
    r = CliRunner().invoke(
        cli,
        ["generate", "hi", "--model", str(tiny_model_dir), "--layers", "layer_2.mpl"],
    )
    assert r.exit_code == 1, r.output
    assert "Did you mean: layer_2.mlp" in r.output and "Traceback" not in r.output


# --- item 14: Ray resources and options -------------------------------------------------------


def test_missing_ray_resources_are_named():
    from actcap.bench.distributed import RayOptions, missing_resources

    opts = RayOptions(workers=2, gpus_per_worker=1, cpus_per_worker=1)
    assert missing_resources({"CPU": 16.0, "GPU": 2.0}, opts) == []
    (line,) = missing_resources({"CPU": 16.0}, opts)
    assert line.startswith("2 GPU needed") and "0 in the cluster" in line
    assert len(missing_resources({"CPU": 1.0}, opts)) == 2


def test_ray_gpu_workers_on_a_machine_without_gpus_fail_at_once(tiny_model_dir, tmp_path):
    from actcap.bench.distributed import RayOptions, run_benchmark_ray
    from actcap.errors import RunError

    bench = load_benchmark(f"mmlu:{MMLU}").limited(2)
    t0 = time.perf_counter()
    with pytest.raises(RunError, match=r"1 GPU needed .*0 in the cluster"):
        run_benchmark_ray(
            str(tiny_model_dir),
            bench,
            tmp_path / "run",
            ray_options=RayOptions(workers=1, gpus_per_worker=1, cpus_per_worker=1),
            progress=False,
        )
    assert time.perf_counter() - t0 < 120


@pytest.mark.parametrize(
    "flags",
    [["--workers", "4"], ["--gpus-per-worker", "1"], ["--ray-address", "auto"]],
)
def test_ray_options_without_ray_are_refused(tiny_model_dir, tmp_path, flags):
    args = ["eval", "--model", str(tiny_model_dir), "--limit", "1", "--no-capture"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "run"), "--quiet", *flags])
    assert r.exit_code == 2, r.output
    assert f"{flags[0]} needs --ray" in r.output
    assert not (tmp_path / "run").exists()


# --- item 14: Ctrl-C, the end-of-run line ------------------------------------------------------


def interrupt_second_batch(monkeypatch):
    import actcap.bench.runner as runner

    real = runner.answer_batch
    calls = {"n": 0}

    def answer_batch(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "answer_batch", answer_batch)


def test_ctrl_c_during_eval_says_how_to_resume(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", f"mmlu:{MMLU}"]
    args += ["--limit", "4", "--batch-size", "2", "--out", str(out), "--quiet"]
    interrupt_second_batch(monkeypatch)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 130, r.output
    assert "Aborted!" not in r.output
    assert f"safe in {out}" in r.output and "--resume" in r.output and f"--out {out}" in r.output
    monkeypatch.undo()
    r = CliRunner().invoke(cli, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4


def load_main_script() -> Any:
    spec = importlib.util.spec_from_file_location("actcap_main_script", REPO / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ctrl_c_in_main_py_says_how_to_resume(tiny_model_dir, tmp_path, monkeypatch, capsys):
    main = load_main_script()
    out = tmp_path / "acts"
    interrupt_second_batch(monkeypatch)
    try:
        code = main.main(
            ["--capture_activations", "--activation_save_dir", str(out)]
            + ["--model", str(tiny_model_dir), "--limit", "4", "--batch_size", "2"]
        )
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C reached the user of main.py as a traceback")
    err = capsys.readouterr().err
    assert code == 130
    assert "--resume" in err and f"--activation_save_dir {out}" in err


@pytest.mark.parametrize(
    ("flags", "shown", "absent"),
    [
        (["--storage", "files"], "samples/", "shards/"),
        (["--storage", "shards"], "shards/", "samples/"),
        (["--no-capture"], "no activation files", "samples/"),
    ],
)
def test_end_of_run_line_names_the_layout_used(tiny_model_dir, tmp_path, flags, shown, absent):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", f"mmlu:{MMLU}"]
    r = CliRunner().invoke(cli, [*args, "--limit", "2", "--out", str(out), "--quiet", *flags])
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("run directory:")]
    assert shown in line and absent not in line, line
    # the prompts share their opening tokens: the run names the prefixes its samples need
    assert ("prefixes/" in line) == ("--no-capture" not in flags), line


# --- item 14: help text on every option ---------------------------------------------------------


def walk(command: click.Command, path: str) -> list[tuple[str, click.Command]]:
    out = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            out += walk(sub, f"{path} {name}")
    return out


def test_every_option_of_every_command_has_help_text():
    missing = [
        f"{path} {'/'.join(param.opts)}"
        for path, command in walk(cli, "actcap")
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()
    ]
    assert not missing, f"options without help text: {missing}"


def test_every_main_py_flag_has_help_text():
    parser = load_main_script().build_parser()
    missing = [
        "/".join(action.option_strings)
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, argparse._HelpAction)
        and not (action.help or "").strip()
    ]
    assert not missing, f"main.py flags without help text: {missing}"


def test_ctrl_c_message_starts_on_its_own_line_after_the_progress_bar(
    tiny_model_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", f"mmlu:{MMLU}"]
    args += ["--limit", "4", "--batch-size", "2", "--out", str(out)]  # progress bar on
    interrupt_second_batch(monkeypatch)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 130, r.output
    line = next(line for line in r.output.splitlines() if "Interrupted." in line)
    assert line.startswith("Interrupted."), r.output  # not glued to the bar's last line
    assert r.output.rstrip().endswith("finished samples are skipped."), r.output  # no bar after


@pytest.mark.parametrize(
    ("benchmark", "folder"),
    [
        ("demo", "runs/demo"),
        ("data/questions.jsonl", "runs/questions"),
        ("mmlu:data/mmlu/test", "runs/mmlu-test"),
        ("gsm8k:data/gsm8k/test.jsonl", "runs/gsm8k-test"),
    ],
)
def test_default_run_folder_keeps_the_benchmark_kind(benchmark, folder):
    from actcap.cli.eval_cmd import default_out

    assert default_out(benchmark) == folder
