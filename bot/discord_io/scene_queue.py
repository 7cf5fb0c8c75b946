"""Per channel: the people's messages waiting for an answer, answered in order, together when they
come close together.

Every message is already a story turn when it gets here; the queue only decides when the scene
answers. A message waits:
- for the merge window (`merge_window_s`), when more than one person is writing in the channel: a
  second person's message inside the window joins the same answer instead of getting its own;
- for its author's cooldown, when they wrote again too soon (a ⏳ shows it): the message is answered
  once the cooldown is over, or with the next answer that comes before.
One task per channel runs the answers, so a channel's answers come in the order of its messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import discord

from bot.pipeline import UserInput
from bot.store import Turn

log = logging.getLogger(__name__)

GROUP_ACTIVITY_S = 300.0  # another person wrote this recently: the channel is a group, answers wait the window


@dataclass
class Waiting:
    """A stored message waiting for its answer."""

    message: discord.Message
    user: UserInput
    turn: Turn
    ready_at: float = 0.0  # when its author's cooldown ends, in the event loop's clock (`_now`)


@dataclass
class _Channel:
    waiting: list[Waiting] = field(default_factory=list)
    last_added: float = 0.0
    window_s: float = 0.0
    task: asyncio.Task | None = None
    sleeping: bool = False  # the task waits for the due time (not answering): a new message may restart it
    answering: int = 0  # messages of the batch being answered now
    authors: dict[int, float] = field(default_factory=dict)  # who wrote, and when


def _now() -> float:
    """The event loop's clock (monotonic; the one its timers run on)."""
    return asyncio.get_running_loop().time()


Answer = Callable[[list[Waiting]], Awaitable[None]]
Depth = Callable[[int, int], None]  # (channel id, messages waiting or being answered): bot/metrics.py


class SceneQueue:
    """Collects each channel's waiting messages and hands them to `answer` in batches."""

    def __init__(self, answer: Answer, depth: Depth | None = None):
        self._answer, self._depth = answer, depth
        self._channels: dict[int, _Channel] = {}

    def add(self, item: Waiting, window_s: float) -> None:
        """Queue a message; `window_s` applies only when several people write in the channel."""
        now = _now()
        channel = self._channels.setdefault(item.message.channel.id, _Channel())
        author = item.message.author.id
        group = any(other != author and now - seen < GROUP_ACTIVITY_S for other, seen in channel.authors.items())
        channel.authors[author] = now
        channel.waiting.append(item)
        channel.last_added = now
        channel.window_s = window_s if group else 0.0
        self._report(item.message.channel.id, channel)
        if channel.task is not None and not channel.task.done() and channel.sleeping:
            channel.task.cancel()  # the due time may now be sooner (a message merged into a cooldown's wait)
        if channel.task is None or channel.task.done() or channel.sleeping:
            channel.task = asyncio.create_task(self._run(item.message.channel.id, channel))

    def waiting(self, channel_id: int) -> int:
        """Messages of the channel not answered yet."""
        channel = self._channels.get(channel_id)
        return len(channel.waiting) if channel else 0

    async def _run(self, channel_id: int, channel: _Channel) -> None:
        while channel.waiting:
            delay = self._due(channel) - _now()
            if delay > 0:
                channel.sleeping = True
                try:
                    await asyncio.sleep(delay)
                finally:
                    channel.sleeping = False
                continue
            batch, channel.waiting = channel.waiting, []
            channel.answering = len(batch)
            try:
                await self._answer(batch)
            except Exception:  # one failed answer must not stop the channel's queue
                log.exception("answering %d message(s) in channel %s failed", len(batch), channel_id)
            finally:
                channel.answering = 0
                self._report(channel_id, channel)

    def _report(self, channel_id: int, channel: _Channel) -> None:
        if self._depth is not None:
            self._depth(channel_id, len(channel.waiting) + channel.answering)

    @staticmethod
    def _due(channel: _Channel) -> float:
        """When the waiting messages are answered: after the merge window, and not before the earliest
        cooldown ends (later ones are merged in: their words are already in the story)."""
        return max(channel.last_added + channel.window_s, min(w.ready_at for w in channel.waiting))

    async def close(self) -> None:
        """Stop every channel's task (their messages stay in the story, unanswered)."""
        tasks = [c.task for c in self._channels.values() if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # not `await task` in suppress(): that would swallow our own cancel
