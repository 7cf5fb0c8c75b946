"""Show a reply as the persona while it is being written: post, then edit as tokens arrive.

Discord allows about five message edits per five seconds per channel, so the
sink edits at most once per `EDIT_INTERVAL_S` and simply skips the updates in
between (the next one carries all the text so far); it never sleeps. Past
2000 characters the reply continues in a further message. The last message is
finished by `seal()`, which also puts the buttons on it, so a short reply
costs two REST calls: one post and one final edit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import discord

from bot.discord_io.split import split_message
from bot.discord_io.webhooks import INVALID_FORM_BODY, NO_MENTIONS, PersonaIdentity, WebhookChannel, WebhookPoster

log = logging.getLogger(__name__)

EDIT_INTERVAL_S = 1.2  # at most one streaming edit per this many seconds (Discord: ~5 edits / 5 s / channel)
STREAM_CURSOR = " ▌"  # shown after the text while the persona is still "writing"
CONTROLS_TEXT = "-# ↑ story controls"


class WebhookReplySink:
    """A `ReplySink` that shows a reply in Discord as the persona, through the channel webhook.

    Give `existing_ids` to rewrite a reply in place (regenerate, continue, swipe).
    """

    def __init__(self, poster: WebhookPoster, channel: WebhookChannel, who: PersonaIdentity, *,
                 existing_ids: Sequence[int] = (), interval_s: float = EDIT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self._poster, self._channel, self._who = poster, channel, who
        self._ids = list(existing_ids)
        self._shown: list[str | None] = [None] * len(self._ids)  # None: unknown (an earlier reply)
        self._interval_s, self._clock = interval_s, clock
        self._last_edit = float("-inf")
        self._final: list[str] | None = None
        self.edits = 0  # REST calls made, for the benchmark

    @property
    def message_ids(self) -> list[int]:
        return list(self._ids)

    async def update(self, text_so_far: str) -> None:
        """Show the text so far, unless the last edit was under `interval_s` ago."""
        text = text_so_far.strip()
        if not text or self._final is not None:
            return
        now = self._clock()
        if self._ids and now - self._last_edit < self._interval_s:
            return
        self._last_edit = now
        try:
            await self._show(split_message(text + STREAM_CURSOR))
        except discord.Forbidden:
            raise
        except discord.HTTPException as exc:
            # A frame of the stream, given up after discord.py's retries (a 429 storm, a 5xx): the next
            # update, or the final text, shows all of it. Losing the reply over a frame would be worse.
            log.warning("skipped a streaming update in channel %s: %s", self._channel.id, exc)

    async def finish(self, text: str) -> list[int]:
        """Show the final text (all but the last message's final edit, which `seal` does); returns ids."""
        pieces = split_message(text) or ["…"]
        self._final = pieces
        await self._show(pieces[:-1] + [None])
        for message_id in self._ids[len(pieces):]:
            await self._poster.delete(self._channel, self._who, message_id)
        self._ids, self._shown = self._ids[: len(pieces)], self._shown[: len(pieces)]
        return self.message_ids

    async def seal(self, view: discord.ui.View | None = None) -> None:
        """Write the final text of the last message with the buttons under it."""
        if not self._ids:
            return
        text = self._final[-1] if self._final else (self._shown[-1] or "").removesuffix(STREAM_CURSOR)
        if view is None or self._poster.components_ok is False:
            if self._shown[-1] != text:
                await self._edit(len(self._ids) - 1, text)
            if view is not None:
                await self._post_controls(view)
            return
        try:
            await self._edit(len(self._ids) - 1, text, view)
            self._poster.components_ok = True
        except discord.HTTPException as exc:
            if exc.code != INVALID_FORM_BODY:
                raise
            # This webhook host refuses buttons on webhook messages: the bot posts them itself.
            log.info("webhook messages cannot carry buttons here; posting them from the bot")
            self._poster.components_ok = False
            if self._shown[-1] != text:
                await self._edit(len(self._ids) - 1, text)
            await self._post_controls(view)

    async def discard(self) -> None:
        """Delete whatever was posted (the engine failed half-way)."""
        for message_id in self._ids:
            await self._poster.delete(self._channel, self._who, message_id)
        self._ids, self._shown = [], []

    async def _show(self, pieces: list[str | None]) -> None:
        """Make message i show pieces[i] (None: post it empty-free later or leave as is)."""
        for index, piece in enumerate(pieces):
            if index < len(self._ids):
                if piece is not None and self._shown[index] != piece:
                    await self._edit(index, piece)
            else:
                content = piece if piece is not None else (self._final or ["…"])[-1]
                message = await self._poster.send(self._channel, self._who, content)
                self.edits += 1
                self._ids.append(message.id)
                self._shown.append(content)

    async def _edit(self, index: int, text: str, view: discord.ui.View | None = None) -> None:
        try:
            await self._poster.edit(self._channel, self._who, self._ids[index], text, view=view)
        except discord.NotFound:
            # Deleted by someone, or posted by a webhook of this channel that is gone (deleted mid-stream):
            # post it anew, and take the old one down as the bot, so the reply is not shown twice.
            message = await self._poster.send(self._channel, self._who, text, view=view)
            orphan, self._ids[index] = self._ids[index], message.id
            await self._poster.delete_orphan(self._channel, orphan)
        self.edits += 1
        self._shown[index] = text

    async def _post_controls(self, view: discord.ui.View) -> None:
        target = self._channel
        await target.send(CONTROLS_TEXT, view=view, allowed_mentions=NO_MENTIONS)
        self.edits += 1
