"""The rolling summary's prompt: fold turns that left the window into the previous summary.

Pure: the memory worker (bot/memory/worker.py) sends these messages and stores the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bot.story.prompt import TurnLike, speaker_line

SUMMARY_SYSTEM = (
    "You keep the running summary of a role-play story. Write in the past tense, third person, as plain prose. "
    "Keep every name, place, object, promise, secret and fact a character told; keep who did what to whom. "
    "Drop greetings and small talk. Never invent anything. Answer with the updated summary only."
)


def summary_messages(previous: str, turns: Sequence[TurnLike], max_words: int) -> list[dict[str, Any]]:
    """The chat messages that ask for `previous` extended with what happened in `turns`."""
    events = "\n".join(speaker_line(t) for t in turns)
    earlier = previous.strip() or "(nothing yet: this is the start of the story)"
    user = (f"Summary so far:\n{earlier}\n\nWhat happened next:\n{events}\n\n"
            f"Write the updated summary of the whole story, at most {max_words} words.")
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": user}]


def chunk_turns(turns: Sequence[TurnLike], limit: int, count: Callable[[str], int]) -> list[list[TurnLike]]:
    """`turns` in consecutive chunks of at most `limit` tokens each (a turn longer than that is alone)."""
    chunks: list[list[TurnLike]] = []
    used = 0
    for turn in turns:
        cost = count(speaker_line(turn)) + 1
        if not chunks or used + cost > limit:
            chunks.append([])
            used = 0
        chunks[-1].append(turn)
        used += cost
    return chunks


def clean_summary(text: str) -> str:
    """The model's answer without a heading it may add ("Updated summary:")."""
    text = text.strip()
    first, _, rest = text.partition("\n")
    if rest and first.rstrip().endswith(":") and len(first) < 40:
        text = rest.strip()
    for prefix in ("Updated summary:", "Summary:"):
        if text.lower().startswith(prefix.lower()):
            text = text[len(prefix):].strip()
    return text
