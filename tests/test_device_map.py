"""Models spread over devices with accelerate: hooks keep working on dispatched and offloaded layers.

No machine here has two GPUs, so the tiny model is dispatched across the CPU and disk offload
(accelerate moves each offloaded layer's weights in for its forward, with its own hooks); the
activations must equal the undispatched model's.
"""

import pytest
import torch
from click.testing import CliRunner

from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec, GenerationOptions, run_prompts
from actcap.cli.main import cli
from actcap.models import load_model
from actcap.storage import load_activations, open_run
from tests.conftest import DATA

PROMPTS = ["What is the capital of France?", "2 + 2 = ?", "the quick brown fox jumps over the dog"]
EVERY_SITE = CaptureSpec(layers=None, kinds=("resid", "attn", "mlp"))
MMLU = DATA / "mmlu" / "test" / "world_religions_test.csv"


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", cache=False)


@pytest.fixture(scope="module", params=["150KB", "1KB"], ids=["cpu+disk", "all-on-disk"])
def dispatched(request, tiny_model_dir, tmp_path_factory):
    lm = load_model(
        str(tiny_model_dir),
        device_map="auto",
        max_memory={"cpu": request.param},
        offload_folder=str(tmp_path_factory.mktemp("offload")),
        cache=False,
    )
    placed = set(lm.model.hf_device_map.values())
    assert "disk" in placed
    if request.param == "150KB":
        assert placed == {"cpu", "disk"}  # some layers in memory, the rest offloaded
    return lm


def assert_same_samples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
        assert x.response == y.response
        assert x.activations.keys() == y.activations.keys()
        for site in x.activations:
            torch.testing.assert_close(
                x.activations[site], y.activations[site], atol=1e-6, rtol=1e-5
            )


def test_prompt_capture_equals_the_undispatched_model(plain, dispatched):
    spec = CaptureSpec(layers=["embeddings", "0-2", "final_norm"], kinds=("resid", "attn", "mlp"))
    a = run_prompts(plain, PROMPTS, spec, batch_size=3)
    b = run_prompts(dispatched, PROMPTS, spec, batch_size=3)
    assert "layer_2.mlp" in b[0].activations and "final_norm" in b[0].activations
    assert_same_samples(a, b)


def test_generation_capture_equals_the_undispatched_model(plain, dispatched):
    spec = CaptureSpec(layers=None, capture_generated=True)
    gen = GenerationOptions(max_new_tokens=6)
    a = run_prompts(plain, PROMPTS, spec, generation=gen, batch_size=3)
    b = run_prompts(dispatched, PROMPTS, spec, generation=gen, batch_size=3)
    assert b[0].output_ids is not None and len(b[0].output_ids) > 0
    assert_same_samples(a, b)


def test_evaluation_equals_the_undispatched_model(plain, dispatched, tmp_path):
    bench = load_benchmark(f"mmlu:{MMLU}").limited(8)
    options = EvalOptions(batch_size=4, few_shot=2)  # log-likelihood with the shared-prefix cache
    ra = run_benchmark(
        plain, bench, capture=EVERY_SITE, options=options, out=tmp_path / "a", progress=False
    )
    rb = run_benchmark(
        dispatched, bench, capture=EVERY_SITE, options=options, out=tmp_path / "b", progress=False
    )
    assert [r["correct"] for r in ra.records] == [r["correct"] for r in rb.records]
    for x, y in zip(ra.records, rb.records, strict=True):
        assert x["choice_logprobs"] == pytest.approx(y["choice_logprobs"], abs=1e-5)
    for e in open_run(tmp_path / "a").entries:
        xa = load_activations(tmp_path / "a", sample_id=e.id)["activations"]
        xb = load_activations(tmp_path / "b", sample_id=e.id)["activations"]
        for site in xa:
            torch.testing.assert_close(xa[site], xb[site], atol=1e-6, rtol=1e-5)


def test_cli_device_map(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--limit", "3", "--quiet", "--out", str(out)]
    placed = [
        "--device-map",
        "auto",
        "--max-memory",
        "cpu=150KB",
        "--offload-folder",
        str(tmp_path / "off"),
    ]
    result = CliRunner().invoke(cli, args + placed)
    assert result.exit_code == 0, result.output
    assert len(open_run(out).entries) == 3
    bad = CliRunner().invoke(cli, [*args, "--max-memory", "cpu=1GB"])
    assert bad.exit_code != 0 and "needs --device-map" in bad.output
    save = tmp_path / "g.safetensors"
    gen = [
        "generate",
        "Hello",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "4",
        "--save",
        str(save),
    ]
    result = CliRunner().invoke(cli, gen + placed)
    assert result.exit_code == 0, result.output
    plain = CliRunner().invoke(cli, [*gen[:-1], str(tmp_path / "p.safetensors"), "--device", "cpu"])
    assert plain.exit_code == 0, plain.output
    a, b = (
        load_activations(save)["activations"],
        load_activations(tmp_path / "p.safetensors")["activations"],
    )
    for site in a:
        torch.testing.assert_close(a[site], b[site], atol=1e-6, rtol=1e-5)
