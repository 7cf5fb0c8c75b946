"""Make every prompt fit the server's context window, on any OpenAI-compatible server.

1. The window: `max_model_len` from /v1/models (vLLM and our engine report it), else
   MASQUE_CONTEXT_WINDOW, else a safe default.
2. The budget: window - reply tokens - margin (MASQUE_PROMPT_TOKEN_BUDGET=auto), or the
   setting when it is a number and smaller.
3. The count: the prompt is built on the token counter's estimate, then counted exactly
   by the server's `POST /tokenize` where it has one (the counter learns the server's
   ratio from each count); over the window, the budget shrinks by the excess and the
   prompt is built again. Without /tokenize, the cautious estimate and a wider margin hold.
The pipeline also shrinks and retries once if a server still refuses for length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from bot.engine_client import EngineClient
from bot.settings import BotSettings
from bot.story import Prompt, PromptParts, TokenCounter, build_prompt
from bot.story.prompt import prompt_chars

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_WINDOW = 2048  # when neither the server nor the settings say: small, so it fits most servers
WINDOW_RECHECK_S = 300.0  # the served model may change (a restarted vLLM with another model)
EXACT_MARGIN = 0.02  # of the window, when the server counted the prompt itself
ESTIMATE_MARGIN = 0.10  # of the window, when only our estimate says it fits
MIN_MARGIN_TOKENS = 16
MEDIA_RESERVE_TOKENS = 256  # per image/audio part: what our engine's fusion adds (a caption, a transcript)
MIN_BUDGET_TOKENS = 128
FIT_ATTEMPTS = 3
SKIP_COUNT_HEADROOM = 1.25  # a calibrated estimate this far under the room needs no exact count
RETRY_SHRINK = 0.6  # after a server's length refusal, the next prompt gets this share of the last


@dataclass
class Fitted:
    prompt: Prompt
    parts: PromptParts  # as built (its budget is the one that fitted)
    max_tokens: int  # the reply's max_tokens: the setting, or what the window leaves
    exact: int | None  # the server's count, when it gave one (plus an addition's estimate: see `fit`)
    window: int


class PromptFitter:
    """Knows one engine's context window and token ratio; builds prompts that fit it."""

    def __init__(self, engine: EngineClient, settings: BotSettings):
        self.engine, self.settings = engine, settings
        self.counter = TokenCounter()
        self._window: int | None = None
        self._window_until = 0.0

    @property
    def known_window(self) -> int | None:
        """The window learned so far (None before the first prompt)."""
        return self._window

    async def window(self) -> int:
        """The context window in tokens (asked of the server now and then)."""
        if self._window is None or time.monotonic() >= self._window_until:
            served = await self.engine.context_window()
            configured = self.settings.context_window
            self._window = served or configured or DEFAULT_CONTEXT_WINDOW
            if served and configured:  # a setting may only narrow what the server serves
                self._window = min(served, configured)
            self._window_until = time.monotonic() + (WINDOW_RECHECK_S if served else WINDOW_RECHECK_S / 10)
        return self._window

    def budget(self, window: int, reply_tokens: int, exact: bool) -> int:
        """Prompt tokens allowed: the window less the reply and a margin (and the setting, if a number)."""
        margin = max(MIN_MARGIN_TOKENS, int(window * (EXACT_MARGIN if exact else ESTIMATE_MARGIN)))
        room = max(window - reply_tokens - margin, MIN_BUDGET_TOKENS)
        setting = self.settings.prompt_token_budget
        return room if setting == "auto" else min(int(setting), room)

    async def smallest_budget(self) -> int:
        """The budget a text-only prompt gets at the least (no exact count), to size what must always fit."""
        window = await self.window()
        return self.budget(window, min(self.settings.reply_max_tokens, window // 2), exact=False)

    async def fit(self, parts: PromptParts, build: Callable[[PromptParts], Prompt] = build_prompt,
                  base: Fitted | None = None) -> Fitted:
        """Build the prompt of `parts` (its budget replaced by the window's) so that it fits.

        `base`: the same prompt fitted a moment ago without some addition (recalled turns, whose
        share the budget held back): when the server counted it, the addition is estimated on top
        of that count instead of asking the server again.
        """
        window = await self.window()
        reply = min(self.settings.reply_max_tokens, window // 2) + MEDIA_RESERVE_TOKENS * len(parts.media)
        exact_ok = self.engine.counts_tokens()
        parts = replace(parts, budget=self.budget(window, reply, exact_ok), counter=self.counter)
        prompt, exact = build(parts), None
        if base is not None and base.exact is not None:
            grown = base.exact + int(max(prompt.tokens - base.prompt.tokens, 0) * SKIP_COUNT_HEADROOM)
            if grown <= window - reply - MIN_MARGIN_TOKENS:
                max_tokens = max(1, min(self.settings.reply_max_tokens, window - grown - MIN_MARGIN_TOKENS))
                return Fitted(prompt, parts, max_tokens, grown, window)
        for _ in range(FIT_ATTEMPTS):
            room = window - reply - MIN_MARGIN_TOKENS
            if exact_ok is False or (self.counter.calibrated and prompt.tokens * SKIP_COUNT_HEADROOM <= room):
                break
            exact = await self.engine.count_tokens(prompt.messages)
            if exact is None:
                exact_ok = False
                break
            self.counter.learn(prompt_chars(prompt.messages), exact, len(prompt.messages))
            if exact <= room:
                break
            parts = replace(parts, budget=max(parts.budget - (exact - room) - MIN_MARGIN_TOKENS, MIN_BUDGET_TOKENS))
            prompt, exact = build(parts), None
        used = exact if exact is not None else prompt.tokens
        max_tokens = max(1, min(self.settings.reply_max_tokens, window - used - MIN_MARGIN_TOKENS))
        return Fitted(prompt, parts, max_tokens, exact, window)

    async def refit(self, fitted: Fitted, server_count: int | None) -> Fitted:
        """A prompt for the retry after the server refused `fitted` as too long.

        When the refusal said how many tokens the server counted, the counter learns from it and
        the prompt is fitted again; otherwise the budget shrinks to RETRY_SHRINK of the last prompt.
        """
        if server_count:
            self.counter.learn(prompt_chars(fitted.prompt.messages), server_count, len(fitted.prompt.messages))
            again = await self.fit(fitted.parts)
            if again.prompt.tokens < fitted.prompt.tokens:
                return again
        parts = replace(fitted.parts, budget=max(int(min(fitted.parts.budget, fitted.prompt.tokens) * RETRY_SHRINK),
                                                 MIN_BUDGET_TOKENS))
        prompt = build_prompt(parts)
        return Fitted(prompt, parts, fitted.max_tokens, None, fitted.window)
