"""Where the parts of a decoder-only transformer live, per architecture.

actcap names activation sites by what they are (``layer_3``, ``layer_3.attn``, ``final_norm``);
this module maps those names onto the module tree of each supported architecture, with a generic
fallback that finds the decoder blocks by shape for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from actcap.errors import UnknownNameError

# model_type -> (decoder blocks, final norm); blocks' attention and MLP children are found below.
_KNOWN: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "mixtral": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "qwen3": ("model.layers", "model.norm"),
    "qwen3_moe": ("model.layers", "model.norm"),
    "gemma": ("model.layers", "model.norm"),
    "gemma2": ("model.layers", "model.norm"),
    "gemma3_text": ("model.layers", "model.norm"),
    "phi3": ("model.layers", "model.norm"),
    "phi": ("model.layers", "model.final_layernorm"),
    "olmo": ("model.layers", "model.norm"),
    "olmo2": ("model.layers", "model.norm"),
    "smollm3": ("model.layers", "model.norm"),
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm"),
    "gptj": ("transformer.h", "transformer.ln_f"),
    "falcon": ("transformer.h", "transformer.ln_f"),
    "bloom": ("transformer.h", "transformer.ln_f"),
}
_ATTN_CHILDREN = ("self_attn", "attn", "attention", "self_attention")
_MLP_CHILDREN = ("mlp", "feed_forward", "block_sparse_moe", "fc2")
_NORM_GUESSES = (
    "model.norm",
    "transformer.ln_f",
    "model.final_layernorm",
    "model.decoder.final_layer_norm",
)


@dataclass(frozen=True)
class Layout:
    """The module paths of one model's parts."""

    blocks_path: str
    """Dotted path of the ``nn.ModuleList`` of decoder blocks."""
    blocks: nn.ModuleList
    """The decoder blocks, in order."""
    final_norm_path: str | None
    """Dotted path of the norm applied after the last block, when there is one."""

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.blocks)

    def block_path(self, index: int) -> str:
        """Dotted path of decoder block ``index`` (non-negative)."""
        return f"{self.blocks_path}.{index}"

    def child_path(self, index: int, kind: str) -> str:
        """Dotted path of block ``index``'s attention (``"attn"``) or MLP (``"mlp"``) module.

        Raises:
            UnknownNameError: When the block has no such child.
        """
        names = _ATTN_CHILDREN if kind == "attn" else _MLP_CHILDREN
        block = self.blocks[index]
        children = dict(block.named_children())
        for name in names:
            if name in children:
                return f"{self.block_path(index)}.{name}"
        raise UnknownNameError(
            f"Block {index} ({type(block).__name__}) has no {kind} module; its children are "
            f"{sorted(children)}. Name the module path directly instead."
        )


def find_layout(model: nn.Module) -> Layout:
    """Find the decoder blocks and final norm of a causal language model.

    Args:
        model: A Hugging Face causal LM (or any module holding a list of decoder blocks).

    Returns:
        The model's layout.

    Raises:
        UnknownNameError: When no list of decoder blocks can be found.
    """
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    known = _KNOWN.get(model_type) if isinstance(model_type, str) else None
    if known is not None and isinstance(modules.get(known[0]), nn.ModuleList):
        blocks_path, norm_path = known
        blocks = modules[blocks_path]
        assert isinstance(blocks, nn.ModuleList)
        return Layout(blocks_path, blocks, norm_path if norm_path in modules else None)
    return _guess_layout(model, modules)


def _guess_layout(model: nn.Module, modules: dict[str, nn.Module]) -> Layout:
    config = getattr(model, "config", None)
    wanted = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    lists = [(p, m) for p, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if wanted is not None:
        matching = [(p, m) for p, m in lists if len(m) == wanted]
        lists = matching or lists
    if not lists:
        raise UnknownNameError(
            f"Cannot find the decoder blocks of {type(model).__name__}: it holds no nn.ModuleList. "
            "Capture its modules by their dotted paths instead."
        )
    # The decoder stack is the shallowest such list (MoE experts are nested lists too).
    blocks_path, blocks = min(lists, key=lambda item: (item[0].count("."), -len(item[1])))
    assert isinstance(blocks, nn.ModuleList)
    norm = next((p for p in _NORM_GUESSES if p in modules), None)
    return Layout(blocks_path, blocks, norm)
