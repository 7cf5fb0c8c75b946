"""Helpers for the story pipeline, scene art and console tests (on top of tests/fakes/fake_engine.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from typing import Any

from bot.settings import BotSettings
from tests.fakes.fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
DEFAULT_REPLY = "The rain does not stop. *She taps the desk.* Tell me more."
DEFAULT_SCENE = "a rainy office at night, a detective in a fedora"
_IDS = count(10_000)


@dataclass
class Script:
    """A fake engine's `reply`: queued replies, then `default`; scene-art prompt requests get `scene`."""

    replies: list[str] = field(default_factory=list)
    default: str = DEFAULT_REPLY
    scene: str = DEFAULT_SCENE

    def __call__(self, body: dict[str, Any]) -> str:
        if "image generator" in str(body["messages"][0].get("content", "")):
            return self.scene
        return self.replies.pop(0) if self.replies else self.default


def chats(engine: FakeEngine) -> list[dict[str, Any]]:
    """The chat request bodies the engine got, oldest first."""
    return [r.json for r in engine.requests_to(CHAT)]


def settings_for(url: str, **extra: object) -> BotSettings:
    """BotSettings for a pipeline test against the engine at `url` (no retries, short timeouts)."""
    values = {"MASQUE_ENGINE_URL": url, "MASQUE_ENGINE_RETRIES": 0, "MASQUE_ENGINE_TIMEOUT_S": 5, **extra}
    return BotSettings(**values)


def next_id() -> int:
    """A fresh fake Discord message id."""
    return next(_IDS)


class Collector:
    """A reply sink that remembers what it was shown and hands out message ids."""

    def __init__(self) -> None:
        self.updates: list[str] = []
        self.finished: list[str] = []
        self.ids: list[int] = []

    async def update(self, text_so_far: str) -> None:
        self.updates.append(text_so_far)

    async def finish(self, text: str) -> list[int]:
        self.finished.append(text)
        self.ids = [next_id()]
        return self.ids
