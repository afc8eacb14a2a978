import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import actcap
from actcap import generate_inference_with_activations, load_activations
from actcap.cli.main import cli
from tests.conftest import REPO


def test_public_names():
    assert sorted(actcap.__all__) == sorted(
        [
            "ActcapError",
            "ActivationFile",
            "CaptureSpec",
            "SampleMeta",
            "__version__",
            "analyse",
            "answer_and_grade_benchmark_question",
            "answer_benchmark_question_with_activations",
            "evaluate",
            "export",
            "generate_inference_with_activations",
            "load_activations",
            "load_benchmark",
            "load_model",
            "run_benchmark",
            "run_prompts",
            "save_activations",
        ]
    )
    for name in actcap.__all__:
        assert getattr(actcap, name) is not None


def test_generate_on_tiny_model_saves_and_loads(tiny_lm, tmp_path):
    path = tmp_path / "out.safetensors"
    response, data = generate_inference_with_activations(
        "What is the capital of France?",
        tiny_lm,
        save_path=path,
        layers_to_capture="0-1,-1",
        max_new_tokens=4,
    )
    assert isinstance(response, str)
    assert set(data) >= {"prompt", "response", "model", "timestamp", "input_ids", "activations"}
    assert list(data["activations"]) == ["layer_0", "layer_1", "layer_2"]
    loaded = load_activations(path)
    assert loaded["prompt"] == "What is the capital of France?"
    assert loaded["model"] == "tiny-llama"
    for k, v in data["activations"].items():
        assert torch.equal(loaded["activations"][k], v)
    assert torch.equal(loaded["input_ids"], data["input_ids"])


def test_default_layers_are_embeddings_plus_all(tiny_lm):
    _, data = generate_inference_with_activations("hi", tiny_lm, max_new_tokens=2)
    assert list(data["activations"]) == ["embeddings", "layer_0", "layer_1", "layer_2"]


def test_cli_generate_and_inspect(tiny_model_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    runner = CliRunner()
    r = runner.invoke(
        cli,
        [
            "generate",
            "What is 2 + 2?",
            "--model",
            str(tiny_model_dir),
            "--save",
            str(out),
            "--layers",
            "0-1,-1",
            "--max-new-tokens",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    for text in (
        "layer_0",
        "layer_2",
        "input_ids",
        "format_version: 1",
        "prompt: What is 2 + 2?",
        "on disk",
    ):
        assert text in r.output
    r = runner.invoke(cli, ["inspect", str(out), "--json"])
    assert '"layer_1"' in r.output


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", "hi", "--model", str(tiny_model_dir), "--layers", "9"])
    assert r.exit_code == 1
    assert "Error: Layer 9 is out of range" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.safetensors"
    bad.write_text("plain text")
    r = runner.invoke(cli, ["inspect", str(bad)])
    assert r.exit_code == 1 and "not a safetensors file" in r.output


def test_python_dash_m_and_help_do_not_import_torch():
    code = "import sys; from actcap.cli.main import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    r = subprocess.run([sys.executable, "-m", "actcap", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout


@pytest.mark.slow
def test_default_model_end_to_end(default_lm, tmp_path):
    path = tmp_path / "paris.safetensors"
    response, data = generate_inference_with_activations(
        "What is the capital of France?", "default", save_path=path, layers_to_capture=[0, 5, -1]
    )
    assert "Paris" in response
    assert list(data["activations"]) == ["layer_0", "layer_5", "layer_29"]
    n = len(data["input_ids"])
    assert all(t.shape == (n, 576) for t in data["activations"].values())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["response"] == response
        assert f.metadata()["model"] == "SmolLM2-135M-Instruct"
    loaded = load_activations(path)
    assert torch.equal(loaded["activations"]["layer_29"], data["activations"]["layer_29"])


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "example_activation_capture.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Cosine similarity" in r.stdout and "layer_29" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "france.safetensors",
        "germany.safetensors",
    ]
