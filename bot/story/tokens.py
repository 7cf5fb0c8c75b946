"""Token estimates that keep a prompt inside a context window.

The bot talks to any OpenAI-compatible engine, so it cannot know the tokenizer
in advance. `TokenCounter` starts cautious (fewer characters per token than
English BPE vocabularies average, so estimates run high) and learns the real
ratio from exact counts (the server's `/tokenize`) when it gets them. A small
per-message overhead covers the chat template.
"""

from __future__ import annotations

import math

CHARS_PER_TOKEN = 4.0  # the common BPE average for English: stored token counts use it
CAUTIOUS_CHARS_PER_TOKEN = 3.0  # before any exact count: over-estimates most text, so prompts fit
MIN_CHARS_PER_TOKEN = 1.0  # a learned ratio never goes below (or above) these
MAX_CHARS_PER_TOKEN = 8.0
MESSAGE_OVERHEAD_TOKENS = 4
LEARN_WEIGHT = 0.5  # how much one exact count moves the learned ratio


def estimate_tokens(text: str) -> int:
    """Estimated tokens in `text` at the common ratio (0 for empty text); for stored counts."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def message_tokens(text: str) -> int:
    """Estimated tokens of one chat message holding `text`, template overhead included."""
    return estimate_tokens(text) + MESSAGE_OVERHEAD_TOKENS


class TokenCounter:
    """Estimates tokens the way one server counts them, learning its ratio from exact counts."""

    def __init__(self, chars_per_token: float = CAUTIOUS_CHARS_PER_TOKEN):
        self.chars_per_token = chars_per_token
        self.calibrated = False  # True once an exact count was learned

    def tokens(self, text: str) -> int:
        return math.ceil(len(text) / self.chars_per_token) if text else 0

    def message(self, text: str) -> int:
        """One chat message holding `text`, template overhead included."""
        return self.tokens(text) + MESSAGE_OVERHEAD_TOKENS

    def learn(self, chars: int, exact_tokens: int, messages: int = 0) -> None:
        """Move the ratio towards what the server counted for `chars` characters in `messages` messages."""
        text_tokens = exact_tokens - messages * MESSAGE_OVERHEAD_TOKENS
        if chars <= 0 or text_tokens <= 0:
            return
        seen = min(max(chars / text_tokens, MIN_CHARS_PER_TOKEN), MAX_CHARS_PER_TOKEN)
        weight = LEARN_WEIGHT if self.calibrated else 1.0
        self.chars_per_token = (1 - weight) * self.chars_per_token + weight * seen
        self.calibrated = True
