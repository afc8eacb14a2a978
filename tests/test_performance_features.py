"""The optimisations keep results identical: early stop, background writes, head skipping."""

import time

import pytest
import torch

from actcap.capture import CaptureSpec, run_prompts
from actcap.capture.hooks import Site, deepest_block
from actcap.errors import RunError
from actcap.storage import RunWriter, SampleMeta, load_activations, open_run
from actcap.storage.background import BackgroundWriter
from actcap.storage.records import FinishedSample

PROMPTS = ["What is the capital of France?", "2 + 2 = ?", "the quick brown fox"]


def test_deepest_block():
    paths = ["m.layers.0", "m.layers.1", "m.layers.2"]
    assert (
        deepest_block(
            [Site("embeddings", "m.layers.0", "input"), Site("layer_1.mlp", "m.layers.1.mlp")],
            paths,
        )
        == 1
    )
    assert deepest_block([Site("final_norm", "m.norm")], paths) is None
    assert (
        deepest_block(
            [Site("layer_10", "m.layers.10")], [*paths, *[f"m.layers.{i}" for i in range(3, 11)]]
        )
        == 10
    )


def test_early_stop_gives_the_same_activations_and_skips_later_layers(tiny_lm):
    spec = CaptureSpec(layers=["embeddings", "layer_0", "layer_0.mlp"])

    def n_hooks():
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_lm.model.modules()
        )

    before = n_hooks()
    calls = []
    handle = tiny_lm.layout.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = run_prompts(tiny_lm, PROMPTS, spec, batch_size=3)
        assert calls == []  # block 2 never ran
        full = run_prompts(tiny_lm, PROMPTS, spec, batch_size=3, early_stop=False)
        assert calls == [1]
    finally:
        handle.remove()
    for a, b in zip(fast, full, strict=True):
        for name in b.activations:
            assert torch.equal(a.activations[name], b.activations[name])
    assert n_hooks() == before  # our hooks, the stop hook included, are gone


def test_early_stop_not_used_for_final_norm(tiny_lm):
    (s,) = run_prompts(tiny_lm, PROMPTS[:1], CaptureSpec(layers=["layer_0", "final_norm"]))
    assert set(s.activations) == {"layer_0", "final_norm"}


def sample(i):
    return FinishedSample(
        f"q{i}",
        {"response": str(i)},
        {"layer_0": torch.full((2, 4), float(i))},
        SampleMeta(f"p{i}"),
    )


def test_background_writer_keeps_order_and_files(tmp_path):
    with RunWriter.open(tmp_path / "r", {"model": "m"}) as w:
        bg = BackgroundWriter(w, max_queue=2)
        for i in range(10):
            bg.submit(sample(i))
        bg.close()
        assert bg.written == 10
    info = open_run(tmp_path / "r")
    assert [e.id for e in info.entries] == [f"q{i}" for i in range(10)]
    for e, p in info.sample_paths():
        assert float(load_activations(p)["activations"]["layer_0"][0, 0]) == float(e.id[1:])


def test_background_writer_measures_waiting_on_a_slow_disk(tmp_path, monkeypatch):
    with RunWriter.open(tmp_path / "r", {"model": "m"}) as w:
        real = w.write

        def slow(*a, **k):
            time.sleep(0.05)
            return real(*a, **k)

        monkeypatch.setattr(w, "write", slow)
        bg = BackgroundWriter(w, max_queue=1)
        for i in range(6):
            bg.submit(sample(i))
        bg.close()
    assert bg.blocked_seconds > 0.05


def test_background_writer_raises_the_workers_error_and_writes_nothing_after(tmp_path, monkeypatch):
    with RunWriter.open(tmp_path / "r", {"model": "m"}) as w:
        real = w.write
        seen = []

        def failing(item):
            seen.append(item.id)
            if item.id == "q2":
                raise RunError("disk full")
            return real(item)

        monkeypatch.setattr(w, "write", failing)
        bg = BackgroundWriter(w, max_queue=8)
        with pytest.raises(RunError, match="disk full"):
            for i in range(6):
                bg.submit(sample(i))
            bg.close()
        bg.close()  # idempotent once the error is out
    assert [e.id for e in open_run(tmp_path / "r").entries] == ["q0", "q1"]
