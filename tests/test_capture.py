import pytest
import torch

from actcap.capture import (
    CaptureSpec,
    GenerationOptions,
    Recorder,
    forward_kwargs,
    recording,
    resolve_sites,
    run_prompts,
)
from actcap.errors import UnknownNameError
from actcap.models import find_layout, wrap_model
from tests.conftest import TINY_CONFIGS, build_tiny_model

PROMPTS = [
    "What is the capital of France?",
    "2 + 2 = ?",
    "the quick brown fox jumps over the lazy dog and the capital of France is Paris",
]


def hidden_states(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_matches_output_hidden_states(model_type, tiny_tokenizer):
    """embeddings == hidden_states[0]; layer_i == hidden_states[i+1] except the last, which
    transformers returns after the final norm: that one equals our final_norm site."""
    lm = wrap_model(build_tiny_model(model_type), tiny_tokenizer, model_type)
    spec = CaptureSpec(layers=["embeddings", "0-2", "final_norm"])
    (sample,) = run_prompts(lm, [PROMPTS[0]], spec)
    hs = hidden_states(lm.model, tiny_tokenizer, PROMPTS[0])
    acts = sample.activations
    torch.testing.assert_close(acts["embeddings"], hs[0][0])
    torch.testing.assert_close(acts["layer_0"], hs[1][0])
    torch.testing.assert_close(acts["layer_1"], hs[2][0])
    torch.testing.assert_close(acts["final_norm"], hs[3][0])
    assert not torch.allclose(acts["layer_2"], hs[3][0])  # documented: pre-norm vs post-norm


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "opt", "gemma2", "qwen3"])
def test_batched_with_padding_equals_one_at_a_time(model_type, tiny_tokenizer):
    lm = wrap_model(build_tiny_model(model_type), tiny_tokenizer, model_type)
    spec = CaptureSpec(layers=None, kinds=("resid", "attn", "mlp"))
    batched = run_prompts(lm, PROMPTS, spec, batch_size=3)
    for text, b in zip(PROMPTS, batched, strict=True):
        (alone,) = run_prompts(lm, [text], spec, batch_size=1)
        assert torch.equal(b.input_ids, alone.input_ids)
        assert b.activations.keys() == alone.activations.keys()
        for name in alone.activations:
            assert b.activations[name].shape == alone.activations[name].shape
            torch.testing.assert_close(
                b.activations[name], alone.activations[name], atol=1e-5, rtol=1e-4
            )


def test_padding_is_removed(tiny_lm, tiny_tokenizer):
    samples = run_prompts(tiny_lm, PROMPTS, CaptureSpec(layers=[0]), batch_size=3)
    for text, s in zip(PROMPTS, samples, strict=True):
        n = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
        assert s.input_ids.shape == (n,)
        assert s.activations["layer_0"].shape == (n, 32)


@pytest.mark.parametrize("selection", ["last", "mean"])
def test_token_selection(tiny_lm, selection):
    full = run_prompts(tiny_lm, PROMPTS, CaptureSpec(layers=[0, 1]), batch_size=3)
    reduced = run_prompts(
        tiny_lm, PROMPTS, CaptureSpec(layers=[0, 1], token_selection=selection), batch_size=3
    )
    for f, r in zip(full, reduced, strict=True):
        for name in ("layer_0", "layer_1"):
            want = f.activations[name][-1] if selection == "last" else f.activations[name].mean(0)
            assert r.activations[name].shape == (32,)
            torch.testing.assert_close(r.activations[name], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_dtype(tiny_lm, dtype):
    name = str(dtype).removeprefix("torch.")
    (s,) = run_prompts(tiny_lm, PROMPTS[:1], CaptureSpec(layers=[0], dtype=name))
    (ref,) = run_prompts(tiny_lm, PROMPTS[:1], CaptureSpec(layers=[0]))
    assert s.activations["layer_0"].dtype == dtype
    assert s.activations["layer_0"].device.type == "cpu"
    torch.testing.assert_close(
        s.activations["layer_0"].float(), ref.activations["layer_0"], atol=0.05, rtol=0.02
    )


def test_hooks_removed_after_block_and_on_exception(tiny_lm):
    sites = resolve_sites(tiny_lm.model, tiny_lm.layout, None)
    modules = [m for m in tiny_lm.model.modules()]

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    before = n_hooks()
    with pytest.raises(RuntimeError, match="boom"), recording(tiny_lm.model, Recorder(sites)):
        assert n_hooks() == before + len(sites)
        raise RuntimeError("boom")
    assert n_hooks() == before


def test_hooks_do_not_change_outputs(tiny_lm, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        plain = tiny_lm.model(**ids).logits
        sites = resolve_sites(tiny_lm.model, tiny_lm.layout, None, kinds=("resid", "attn", "mlp"))
        with recording(tiny_lm.model, Recorder(sites)) as rec:
            hooked = tiny_lm.model(**ids).logits
    assert torch.equal(plain, hooked)
    assert all(len(c) == 1 for c in rec.chunks.values())


def test_generation_capture_covers_prompt_and_answer(tiny_lm, tiny_tokenizer):
    """Per-step capture during generate equals one forward pass over prompt + answer."""
    spec = CaptureSpec(layers=[0, 2], capture_generated=True)
    samples = run_prompts(
        tiny_lm, PROMPTS, spec, generation=GenerationOptions(max_new_tokens=6), batch_size=3
    )
    for s in samples:
        assert s.output_ids is not None and len(s.output_ids) >= 1
        full = torch.cat([s.input_ids, s.output_ids[:-1]])
        n = len(full)
        assert s.activations["layer_0"].shape == (n, 32)
        with torch.no_grad():
            hs = tiny_lm.model(full[None], output_hidden_states=True).hidden_states
        torch.testing.assert_close(s.activations["layer_0"], hs[1][0], atol=1e-5, rtol=1e-4)


def test_generation_batched_equals_alone(tiny_lm):
    spec = CaptureSpec(layers=[1], capture_generated=True)
    opts = GenerationOptions(max_new_tokens=5)
    batched = run_prompts(tiny_lm, PROMPTS, spec, generation=opts, batch_size=3)
    for text, b in zip(PROMPTS, batched, strict=True):
        (alone,) = run_prompts(tiny_lm, [text], spec, generation=opts, batch_size=1)
        assert torch.equal(b.output_ids, alone.output_ids)
        assert b.response == alone.response
        torch.testing.assert_close(
            b.activations["layer_1"], alone.activations["layer_1"], atol=1e-5, rtol=1e-4
        )


def test_generation_without_generated_capture_keeps_prompt_only(tiny_lm):
    (s,) = run_prompts(
        tiny_lm,
        PROMPTS[:1],
        CaptureSpec(layers=[0]),
        generation=GenerationOptions(max_new_tokens=4),
    )
    assert s.activations["layer_0"].shape[0] == len(s.input_ids)


def test_forward_kwargs_positions_skip_padding(tiny_lm):
    from actcap.capture import encode

    batch = encode(tiny_lm, ["a", "the quick brown fox"])
    kwargs = forward_kwargs(tiny_lm.model, batch)
    row = kwargs["position_ids"][0][batch["attention_mask"][0].bool()]
    assert row.tolist() == list(range(len(row)))


def test_spec_rejects_bad_values():
    with pytest.raises(UnknownNameError, match="all, last, mean"):
        CaptureSpec(token_selection="first")  # type: ignore[arg-type]
    with pytest.raises(UnknownNameError, match="float32, float16, bfloat16"):
        CaptureSpec(dtype="int8")


def test_find_layout_for_every_architecture():
    for model_type in TINY_CONFIGS:
        assert find_layout(build_tiny_model(model_type)).num_layers == 3
