"""Turning a user message into the exact text a model reads: its chat template, or plain text."""

from __future__ import annotations

from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer: Any, chat: bool | None = None) -> bool:
    """Whether a prompt gets the chat template: ``chat`` when given, else when there is one."""
    return has_chat_template(tokenizer) if chat is None else chat


def adds_special_tokens(tokenizer: Any) -> bool:
    """Whether tokenising a formatted prompt adds the tokenizer's special tokens (its BOS).

    A chat-formatted prompt already holds them, written out by the template; a plain prompt
    (a tokenizer without a chat template) gets them from the tokenizer.
    """
    return not has_chat_template(tokenizer)


def format_prompt(
    tokenizer: Any,
    user: str,
    *,
    chat: bool | None = None,
    system: str | None = None,
    assistant_prefix: str = "",
) -> str:
    """Build the prompt text for one user message.

    Args:
        tokenizer: The model's tokenizer.
        user: The user's message.
        chat: Use the chat template; by default, when the tokenizer has one.
        system: An optional system message (chat only).
        assistant_prefix: Text the answer starts with (e.g. ``"Answer:"``), appended after the
            generation prompt.

    Returns:
        The full prompt text, special tokens written out, ready to tokenize without adding more.
    """
    if not uses_chat_template(tokenizer, chat):
        return user + assistant_prefix
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text) + assistant_prefix


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end an answer: end of sequence and, for chat models, end of turn."""
    ids: list[int] = []
    for source in (
        getattr(model, "generation_config", None),
        getattr(model, "config", None),
        tokenizer,
    ):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.append(eos)
        elif isinstance(eos, list | tuple):
            ids.extend(int(e) for e in eos)
    vocab = tokenizer.get_vocab()  # a full copy of the vocabulary: fetch it once
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
        tid = vocab.get(token)
        if isinstance(tid, int):
            ids.append(tid)
    return list(dict.fromkeys(ids))
