"""How long an input a model takes, and prompt length checks that never tokenise more than that.

Tokenising costs memory in proportion to the text (a 50 MB prompt took 6.8 GB), so a prompt is
first measured in characters: no token is longer than :data:`MAX_CHARS_PER_TOKEN` characters in
practice, so a text longer than the context times that bound cannot fit and is refused at once.
Only a text that may fit is tokenised.
"""

from __future__ import annotations

from typing import Any

from actcap.errors import CaptureError
from actcap.models.chat import adds_special_tokens

MAX_CHARS_PER_TOKEN = 64
"""More characters than any real token spans; bounds the text a context of N tokens can hold."""
UNKNOWN_CONTEXT = 1 << 30
"""The context length assumed for a model whose config gives none."""


def context_length(lm: Any) -> int:
    """The longest input the model takes (its position table), or a very large number if unknown.

    Args:
        lm: A :class:`~actcap.models.loading.LoadedModel` (or anything with ``.model.config``).
    """
    config = getattr(getattr(lm, "model", None), "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return UNKNOWN_CONTEXT


def max_prompt_chars(room: int) -> int:
    """The most characters a prompt of at most ``room`` tokens can have."""
    return max(room, 1) * MAX_CHARS_PER_TOKEN


def check_prompt_chars(text: str, room: int, what: str = "The prompt") -> None:
    """Refuse, without tokenising it, a text too long in characters to fit in ``room`` tokens.

    Raises:
        CaptureError: When ``text`` has more than :func:`max_prompt_chars` characters.
    """
    if len(text) > max_prompt_chars(room):
        raise CaptureError(
            f"{what} has {len(text):,} characters, far more than the {room:,} tokens this model "
            f"can take (at most {MAX_CHARS_PER_TOKEN} characters a token), so it was refused "
            "before tokenising it. Shorten it, or ask for fewer new tokens."
        )


def check_prompt_length(lm: Any, text: str, room: int, what: str = "The prompt") -> int:
    """Refuse a prompt of more than ``room`` tokens, tokenising it only when it may fit.

    Args:
        lm: The loaded model (its tokenizer; no special tokens are added under a chat template).
        text: The full prompt text.
        room: The most tokens the prompt may have (the context less the answer's tokens).
        what: How the message names the text.

    Returns:
        The prompt's number of tokens.

    Raises:
        CaptureError: When ``room`` is below 1, or the prompt has more than ``room`` tokens (or,
            without tokenising it, more characters than that many tokens can hold).
    """
    if room < 1:
        raise CaptureError(
            f"No room left for {what.lower()}: the answer's tokens fill this model's context of "
            f"{context_length(lm):,} tokens. Ask for fewer new tokens."
        )
    check_prompt_chars(text, room, what)
    add_special = adds_special_tokens(lm.tokenizer)
    n = len(lm.tokenizer.encode(text, add_special_tokens=add_special))
    if n > room:
        raise CaptureError(
            f"{what} has {n:,} tokens, more than the {room:,} this model can take (its context "
            "less the new tokens asked for). Shorten it, or ask for fewer new tokens."
        )
    return n
