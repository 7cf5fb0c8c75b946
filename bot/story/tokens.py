"""A cheap token estimate, good enough to keep a prompt inside a context budget.

The bot talks to any OpenAI-compatible engine, so it cannot know the exact
tokenizer; about four characters per token holds for English with the common
BPE vocabularies, and a small per-message overhead covers the chat template.
"""

from __future__ import annotations

import math

CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(text: str) -> int:
    """Estimated tokens in `text` (0 for empty text)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def message_tokens(text: str) -> int:
    """Estimated tokens of one chat message holding `text`, template overhead included."""
    return estimate_tokens(text) + MESSAGE_OVERHEAD_TOKENS
