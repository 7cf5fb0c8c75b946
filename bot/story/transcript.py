"""The plain-text transcript of a story (/story export)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from bot.story.prompt import TurnLike, render_turn

TRANSCRIPT_SEPARATOR = "\n\n"


class StoryLike(Protocol):
    title: str
    created_at: datetime


def format_transcript(story: StoryLike, turns: Sequence[TurnLike]) -> str:
    """Plain-text transcript: a header, then `Name: text` per turn with media notes."""
    header = f"# {story.title or 'Story'} (started {story.created_at:%Y-%m-%d %H:%M} UTC)"
    lines = [f"{t.author_name or str(t.author_kind)}: {render_turn(t)}" for t in turns]
    return TRANSCRIPT_SEPARATOR.join([header, *lines]) + "\n"
