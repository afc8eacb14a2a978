"""Shared fixtures: tiny random models built offline from configs, a tiny tokenizer, paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Keep the suite offline and away from the user's own cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
"""Benchmark files shipped with the repository (MMLU subjects, GSM8K), with their LICENSE."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Question: 2 + 2 = ? Answer: 4. The answer is (B). A B C D",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ? ! : ; ( ) $",
    "Which of the following is a planet? Mars Venus Earth Jupiter Saturn",
] * 20

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "phi3": {},
    "gpt2": {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 2048},
    "gpt_neox": {},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 2048},
}
VOCAB = 384


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(model_type: str, seed: int = 0) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=2048,
    )
    extra = TINY_CONFIGS[model_type]
    if model_type == "gpt2":
        kwargs = {
            **extra,
            "vocab_size": VOCAB,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        }
    else:
        kwargs = {**common, **extra}
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer: Any) -> Any:
    """A tiny random Llama wrapped as a LoadedModel (read-only: do not modify)."""
    from actcap.models import wrap_model

    return wrap_model(build_tiny_model("llama"), tiny_tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """The tiny Llama saved as a model folder, for the loading paths and the CLI."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_lm() -> Any:
    """The real built-in model. Fails, not skips, when missing: `make test` installs it."""
    from actcap.models import load_model

    return load_model("default", device="cpu")
