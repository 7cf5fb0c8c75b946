"""Pure story logic: persona card + story state + recent turns + memory -> OpenAI-style messages.

No Discord, no database, no network here, so the same code serves Discord and
the console and is unit-tested on its own.
"""

from bot.story.memory import Memory
from bot.story.prompt import (
    Prompt,
    PromptParts,
    TurnLike,
    build_messages,
    build_prompt,
    continue_instruction,
    render_turn,
    speaker_line,
)
from bot.story.scene import scene_prompt_messages
from bot.story.tokens import CHARS_PER_TOKEN, TokenCounter, estimate_tokens
from bot.story.transcript import format_transcript

__all__ = [
    "CHARS_PER_TOKEN", "Memory", "Prompt", "PromptParts", "TokenCounter", "TurnLike", "build_messages",
    "build_prompt", "continue_instruction", "estimate_tokens", "format_transcript", "render_turn",
    "scene_prompt_messages", "speaker_line",
]
