"""The facade (actcap.api), the orchestrator behind it, the null writer, and who calls whom.

- capture/evaluate/analyse/export through ``actcap.api`` on the tiny model; evaluate locally and
  on a one-worker Ray pool through the same call;
- ``NullWriter`` and ``InlineWriter`` stand in for "no writer" and "no writer thread";
- ``main.py``, ``actcap eval`` and ``actcap eval --ray`` reach the run only through
  ``actcap.api.evaluate``; ``run_benchmark`` and ``run_benchmark_ray`` go through the one
  orchestrator;
- the chat-template check lives in ``models/chat.py`` only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from actcap import api
from actcap.analysis import DirectorySummary
from actcap.bench import orchestrator
from actcap.bench.runner import EvalOptions, EvalResult
from actcap.capture.spec import CaptureSpec
from actcap.cli.eval_cmd import EvalArgs, eval_command
from actcap.cli.main import cli
from actcap.errors import WriteError
from actcap.models.chat import adds_special_tokens, uses_chat_template
from actcap.storage.background import InlineWriter
from actcap.storage.records import FinishedSample
from actcap.storage.writers import NullWriter, SampleWriter
from tests.conftest import DATA, REPO

MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"
SMALL = CaptureSpec(layers=[0, 1])


# --- capture ---------------------------------------------------------------------------------


def test_capture_several_prompts_saves_one_file_each(tiny_lm, tmp_path):
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    got = api.capture(["hello", "2 + 2 ="], tiny_lm, layers=[0], max_new_tokens=2, save=files)
    assert [c.prompt for c in got] == ["hello", "2 + 2 ="]
    for c, f in zip(got, files, strict=True):
        assert c.file == f and f.is_file()
        assert list(c.activations) == ["layer_0"]
        data = c.to_dict()
        assert set(data) == {
            "prompt",
            "response",
            "model",
            "timestamp",
            "input_ids",
            "output_ids",
            "activations",
            "metadata",
        }
        from actcap import load_activations

        back = load_activations(f)
        assert torch.equal(back["activations"]["layer_0"], c.activations["layer_0"])
        assert back["response"] == c.response


def test_the_facade_re_exports_the_loaders():
    from actcap.bench.sources import load_benchmark
    from actcap.models.loading import load_model

    assert api.load_model is load_model and api.load_benchmark is load_benchmark


def test_capture_refuses_a_folder_or_a_wrong_count_before_loading(tmp_path):
    with pytest.raises(WriteError, match="is a folder"):
        api.capture("hi", "no/such-model", save=tmp_path)
    with pytest.raises(WriteError, match="2 file name"):
        api.capture(["a", "b", "c"], "no/such-model", save=[tmp_path / "1", tmp_path / "2"])


# --- evaluate, analyse, export ---------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("facade") / "run"
    result = api.evaluate(
        f"mmlu:{MMLU}",
        tiny_lm,
        out=out,
        capture=SMALL,
        options=EvalOptions(limit=3, batch_size=2),
        progress=False,
        verify=0,
    )
    return out, result


def test_evaluate_locally(local_run, tiny_lm):
    out, result = local_run
    assert result.n == 3 and result.answered == 3
    assert result.out == out and (out / "results.json").is_file()
    assert result.model == tiny_lm.display_name
    first = result.summary_lines()[0].text
    assert first.startswith(f"{tiny_lm.display_name} on {result.benchmark}: accuracy ")
    assert any(line.text.startswith("run directory: ") for line in result.summary_lines())


def test_evaluate_in_memory_writes_nothing(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = api.evaluate(
        f"mmlu:{MMLU}", tiny_lm, options=EvalOptions(limit=2), progress=False, verify=0
    )
    assert result.out is None and result.n == 2 and len(result.records) == 2
    assert list(tmp_path.iterdir()) == []


def test_analyse_and_export_through_the_facade(local_run, tmp_path):
    out, _ = local_run
    summary = api.analyse(out)
    assert isinstance(summary, DirectorySummary) and summary.n_files == 3
    files = sorted((out / "samples").glob("*.safetensors"))
    stats = api.analyse(files[0], sites=["layer_1"])
    assert isinstance(stats, list) and [s.site for s in stats] == ["layer_1"]
    rows = api.analyse(files[0], files[1])
    assert {r.site for r in rows} == {"layer_0", "layer_1"}  # type: ignore[union-attr]
    exported = api.export(out, "layer_1", tmp_path / "npy", to="npy", rows="samples")
    assert exported.n_samples == 3 and exported.n_rows == 3


def test_evaluate_on_ray_through_the_same_call(tiny_model_dir, local_run, tmp_path):
    pytest.importorskip("ray")
    from actcap.bench.distributed import RayOptions

    out = tmp_path / "ray-run"
    result = api.evaluate(
        f"mmlu:{MMLU}",
        str(tiny_model_dir),
        out=out,
        capture=SMALL,
        options=EvalOptions(limit=3, batch_size=2),
        ray=RayOptions(workers=1),
        load={"device": "cpu"},
        progress=False,
    )
    assert result.n == 3 and result.model == str(tiny_model_dir)
    results = json.loads((out / "results.json").read_text())
    assert results["ray"]["workers"] == 1
    assert [r["id"] for r in result.records] == [r["id"] for r in local_run[1].records]
    assert len(list((out / "workers").glob("*.json"))) == 1


# --- the null writer and the inline writer ---------------------------------------------------


def test_null_writer_takes_every_call_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writer: SampleWriter = NullWriter()
    entry = writer.write(FinishedSample("q1", {"correct": True}))
    assert (entry.id, entry.file, entry.record["correct"]) == ("q1", None, True)
    assert writer.root is None and writer.done == {}
    assert writer.merge_segments(["q1"]) == 0
    assert writer.write_results({"accuracy": 1.0}) == ""
    writer.flush()
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_inline_writer_writes_at_once_and_reports(tmp_path):
    seen = []
    sink = InlineWriter(NullWriter(), on_written=seen.append)
    sink.submit(FinishedSample("a", {}))
    assert [e.id for e in seen] == ["a"] and sink.blocked_seconds == 0.0
    sink.flush()
    sink.close()


def test_the_runner_has_no_optional_writer():
    """The runner and the orchestrator never ask whether they have a writer or a thread."""
    for name in ("runner.py", "orchestrator.py", "distributed.py"):
        text = (REPO / "src" / "actcap" / "bench" / name).read_text()
        assert not re.search(r"\b(writer|background|sink) is (not )?None", text), name


# --- who calls whom --------------------------------------------------------------------------


class Called(Exception):
    """Raised by the fake evaluate once it has recorded its arguments."""


def fake_evaluate(calls: list[dict[str, Any]]) -> Any:
    def evaluate(benchmark: Any, model: Any = "default", **kw: Any) -> EvalResult:
        calls.append({"benchmark": benchmark, "model": model, **kw})
        return EvalResult(1.0, 1, 1, {}, out=None, model="m", benchmark="b")

    return evaluate


def test_main_py_evaluates_through_the_facade(monkeypatch, tmp_path, capsys):
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(api, "evaluate", fake_evaluate(calls))
    spec = importlib.util.spec_from_file_location("actcap_main_facade", REPO / "main.py")
    assert spec is not None and spec.loader is not None
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    out = tmp_path / "acts"
    code = main.main(["--capture_activations", "--activation_save_dir", str(out), "--limit", "2"])
    assert code == 0
    (call,) = calls
    assert call["benchmark"] == "demo" and call["out"] == str(out)
    assert call["options"].limit == 2 and call["capture"] is not None
    assert capsys.readouterr().out.startswith("m on b: accuracy 1.000 (1/1)")
    assert not re.search(r"import[^\n]*\breport\b", (REPO / "main.py").read_text())


@pytest.mark.parametrize("ray", [False, True])
def test_cli_eval_evaluates_through_the_facade(monkeypatch, tmp_path, ray):
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(api, "evaluate", fake_evaluate(calls))
    args = ["eval", "--benchmark", "demo", "--out", str(tmp_path / "r"), "--limit", "2"]
    args += ["--ray", "--workers", "1"] if ray else []
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    (call,) = calls
    assert call["options"].limit == 2 and call["out"] == str(tmp_path / "r")
    assert (call["ray"].workers == 1) if ray else call["ray"] is None
    assert r.output.startswith("m on b: accuracy 1.000 (1/1)")


def test_eval_args_has_one_field_per_option():
    assert {p.name for p in eval_command.params} == {f.name for f in dataclasses.fields(EvalArgs)}


def test_local_and_ray_runs_share_the_orchestrator(monkeypatch, tiny_lm, tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    from actcap.bench import distributed
    from actcap.bench.orchestrator import run_benchmark
    from actcap.bench.sources import load_benchmark

    seen: list[str] = []

    def orchestrate(lm: Any, benchmark: Any, execution: Any, **kw: Any) -> Any:
        seen.append(type(execution).__name__)
        raise Called

    monkeypatch.setattr(orchestrator, "orchestrate", orchestrate)
    monkeypatch.setattr(distributed, "orchestrate", orchestrate)
    bench = load_benchmark("demo")
    with pytest.raises(Called):
        run_benchmark(tiny_lm, bench, progress=False)
    with pytest.raises(Called):
        distributed.run_benchmark_ray(str(tiny_model_dir), bench, tmp_path / "r", progress=False)
    assert seen == ["LocalExecution", "RayExecution"]


def test_ray_worker_record_is_written_atomically(tiny_model_dir, tmp_path, monkeypatch):
    from actcap.bench import distributed
    from actcap.bench.sources import load_benchmark
    from actcap.storage.writers import open_writer

    out = tmp_path / "run"
    writer = open_writer(out, {"model": "tiny"})
    written: list[Path] = []
    real = distributed.atomic_write_bytes

    def atomic(path: Path, data: bytes) -> None:
        written.append(path)
        real(path, data)

    monkeypatch.setattr(distributed, "atomic_write_bytes", atomic)
    try:
        actor = distributed.EvalActor(
            str(tiny_model_dir),
            {"device": "cpu"},
            load_benchmark("demo"),
            None,
            EvalOptions(),
            os.fspath(out),
            "files",
            1 << 20,
            1,
        )
        actor.writer.close()
    finally:
        writer.close()
    assert written == [out / "workers" / f"{actor.writer_id}.json"]
    assert json.loads(written[0].read_text())["writer_id"] == actor.writer_id


# --- the chat-template check -----------------------------------------------------------------


def test_the_chat_template_check_is_in_one_place(tiny_tokenizer):
    class Plain:
        chat_template = None

    assert uses_chat_template(Plain()) is False and adds_special_tokens(Plain()) is True
    assert uses_chat_template(Plain(), chat=True) is True
    templated = bool(getattr(tiny_tokenizer, "chat_template", None))
    assert uses_chat_template(tiny_tokenizer) is templated
    assert adds_special_tokens(tiny_tokenizer) is not templated
    src = REPO / "src" / "actcap"
    readers = [
        p.relative_to(src).as_posix()
        for p in src.rglob("*.py")
        if re.search(r"""["']chat_template["']""", p.read_text())
    ]
    assert readers == ["models/chat.py"]
