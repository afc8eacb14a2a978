"""The same checks on a CUDA device: statistics accumulated on the GPU, float8, shared prefixes.

Marked ``gpu`` and skipped without CUDA; run with ``python -m pytest tests/gpu`` on a GPU machine
(no hub needed: the models are tiny and random, built from configs).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

DEVICE = os.environ.get("ACTCAP_GPU_TEST_DEVICE", "cuda")
"""``cpu`` runs these checks on the CPU, to try them before a GPU machine is at hand."""

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def cuda_lm(tiny_tokenizer: Any) -> Any:
    from actcap.models import wrap_model
    from tests.conftest import build_tiny_model

    return wrap_model(build_tiny_model("llama").to(DEVICE), tiny_tokenizer, name="tiny-llama")


def test_site_stats_on_cuda_equal_those_on_the_cpu() -> None:
    from actcap.capture.stats import SiteStats

    g = torch.Generator().manual_seed(0)
    on = {"cpu": SiteStats(16, "cpu", k=4), "gpu": SiteStats(16, DEVICE, k=4)}
    for batch, seq in [(3, 7), (2, 11), (4, 5)]:
        x = torch.randn(batch, seq, 16, generator=g) * 4
        mask = torch.rand(batch, seq, generator=g) > 0.3
        ids = torch.arange(batch)
        for stats in on.values():
            stats.update(x.to(stats.device), mask.to(stats.device), ids.to(stats.device))
    cpu, gpu = on["cpu"], on["gpu"]
    assert gpu.mean.device.type == DEVICE  # accumulated where the model runs
    assert int(cpu.count) == int(gpu.count)
    torch.testing.assert_close(gpu.mean.cpu(), cpu.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gpu.m2.cpu(), cpu.m2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gpu.max_abs.cpu(), cpu.max_abs)
    assert torch.equal(gpu.norm_hist.cpu(), cpu.norm_hist)
    torch.testing.assert_close(gpu.top_value.cpu(), cpu.top_value)


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_eval_stats_on_cuda_equal_numpy_over_every_token(tiny_model_dir, tmp_path, mode):
    from actcap.capture.stats import SiteStats
    from actcap.storage import load_activations, open_run
    from actcap.storage.stats_file import read_stats
    from tests.test_stats import _assert_matches, _eval, _numpy_stats

    gen = ["--capture-generated"] if mode == "generate" else []
    cuda = ["--device", DEVICE]
    _eval(tiny_model_dir, tmp_path / "all", mode, "--token-selection", "all", *gen, *cuda)
    _eval(
        tiny_model_dir,
        tmp_path / "last",
        mode,
        "--token-selection",
        "last",
        "--stats",
        "all",
        *gen,
        *cuda,
    )
    full = [
        load_activations(s)["activations"] for _, s in open_run(tmp_path / "all").sample_paths()
    ]
    contents = read_stats(tmp_path / "last")
    assert contents is not None and contents.n_samples == 5
    for site, tensors in contents.sites.items():
        _assert_matches(SiteStats.from_tensors(tensors), _numpy_stats([a[site] for a in full]))


def test_stats_collector_keeps_its_sums_on_the_gpu(cuda_lm) -> None:
    from actcap.capture import CaptureSpec
    from actcap.capture.collect import run_prompts
    from actcap.capture.stats import StatsCollector

    collector = StatsCollector(["layer_0", "layer_2"])
    run_prompts(
        cuda_lm,
        ["What is the capital of France?", "2 + 2 = ? Answer: 4"],
        CaptureSpec(layers=[0, 2], token_selection="last"),
        stats=collector,
    )
    assert {s.mean.device.type for s in collector.stats.values()} == {DEVICE}
    assert sum(int(s.count) for s in collector.stats.values()) > 0


def test_float8_on_cuda_equals_float8_on_the_cpu() -> None:
    from actcap.storage.float8 import dequantize, quantize

    x = torch.randn(64, 128) * torch.logspace(-3, 3, 64)[:, None]
    values, scale = quantize(x)
    values_gpu, scale_gpu = quantize(x.to(DEVICE))
    torch.testing.assert_close(scale_gpu.cpu(), scale)
    assert torch.equal(values_gpu.cpu().view(torch.uint8), values.view(torch.uint8))
    torch.testing.assert_close(dequantize(values_gpu, scale_gpu).cpu(), dequantize(values, scale))


def test_shared_prefixes_on_cuda_read_back_whole(cuda_lm, tmp_path) -> None:
    from tests.test_prefixes import PREFIXES, _loaded, _run

    _run(cuda_lm, tmp_path / "prefixed")
    _run(cuda_lm, tmp_path / "whole", share=False)
    assert len(list((tmp_path / "prefixed" / PREFIXES).iterdir())) == 1
    shared, whole = _loaded(tmp_path / "prefixed"), _loaded(tmp_path / "whole")
    for qid, data in shared.items():
        for site, t in whole[qid]["activations"].items():
            torch.testing.assert_close(data["activations"][site], t, atol=1e-4, rtol=1e-4)
