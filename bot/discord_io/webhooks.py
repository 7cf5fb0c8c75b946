"""Speak as a persona: one webhook per channel, dressed in the persona's name and avatar.

Threads use their parent channel's webhook with `thread=`. A webhook someone
deleted (Discord error 10015, Unknown Webhook) is recreated once. The webhook
is created with the persona's avatar and named after it, so after a restart
the name tells which persona it is dressed as; a different persona gets a
fresh webhook. Every send and edit passes `AllowedMentions.none()`: model
output must never ping anyone.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import discord

log = logging.getLogger(__name__)
T = TypeVar("T")

UNKNOWN_WEBHOOK = 10015  # Discord JSON error code: the webhook was deleted
INVALID_FORM_BODY = 50035
WEBHOOK_NAME_LIMIT = 80
FALLBACK_NAME = "Persona"
NO_MENTIONS = discord.AllowedMentions.none()
WebhookChannel = discord.TextChannel | discord.Thread | discord.VoiceChannel | discord.StageChannel
_HAIR_SPACE = "\u200a"
# Discord refuses webhook names containing these words (case-insensitive) or equal to these names.
_FORBIDDEN_WORDS = re.compile(r"(clyde|discord)", re.I)
_FORBIDDEN_NAMES = {"everyone", "here"}


def sanitise_webhook_name(name: str) -> str:
    """A webhook username Discord accepts that still reads as the persona's name.

    Breaks "clyde"/"discord" with a hair space (as PluralKit does), drops `@`,
    `#`, `:` and backtick runs Discord rejects, avoids the names "everyone" and
    "here", and keeps within 1..80 characters.
    """
    cleaned = re.sub(r"[@#:]|```", "", " ".join(name.split()))
    cleaned = _FORBIDDEN_WORDS.sub(lambda m: m.group(0)[:1] + _HAIR_SPACE + m.group(0)[1:], cleaned)
    cleaned = cleaned[:WEBHOOK_NAME_LIMIT].strip()
    if cleaned.casefold() in _FORBIDDEN_NAMES:
        cleaned = f"{cleaned} (persona)"
    return cleaned or FALLBACK_NAME


@dataclass(frozen=True)
class PersonaIdentity:
    """How a persona appears in Discord."""

    name: str
    avatar: bytes | None = None
    avatar_url: str | None = None  # a public image URL, when one is known (group scenes later)

    @property
    def webhook_name(self) -> str:
        return sanitise_webhook_name(self.name)


MAX_OWN_WEBHOOKS = 10  # per channel: a cast of 8 and room to spare, under Discord's 15


class WebhookPoster:
    """Get-or-create the channel webhook and send/edit/delete messages through it."""

    def __init__(self, client: discord.Client):
        self._client = client
        # (parent channel id, persona's webhook name) -> webhook: one per persona of the channel's cast, so a
        # persona's messages stay editable (swipes, continue) whoever spoke after it.
        self._hooks: dict[tuple[int, str], discord.Webhook] = {}
        # One lookup/creation at a time per channel, so a reply and a button press never make two webhooks.
        self._setup_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Discord lets application-owned webhooks carry buttons; some proxies and
        # test servers refuse them. None until the first try tells us.
        self.components_ok: bool | None = None

    async def send(self, channel: WebhookChannel, who: PersonaIdentity, content: str, *,
                   view: discord.ui.View | None = None,
                   files: Sequence[discord.File] = ()) -> discord.WebhookMessage:
        """Post `content` as the persona (in a thread: on the parent's webhook, into the thread)."""
        async def post(hook: discord.Webhook) -> discord.WebhookMessage:
            kwargs = {"view": view} if view is not None else {}
            return await hook.send(
                content, username=who.webhook_name, avatar_url=who.avatar_url, wait=True,
                allowed_mentions=NO_MENTIONS, files=list(files), **kwargs, **_thread(channel),
            )
        return await self.with_webhook(channel, who, post)

    async def edit(self, channel: WebhookChannel, who: PersonaIdentity, message_id: int, content: str, *,
                   view: discord.ui.View | None = None) -> discord.WebhookMessage:
        """Replace the text (and buttons) of a message the persona posted."""
        async def change(hook: discord.Webhook) -> discord.WebhookMessage:
            kwargs = {"view": view} if view is not None else {}
            return await hook.edit_message(message_id, content=content, allowed_mentions=NO_MENTIONS,
                                           **kwargs, **_thread(channel))
        return await self.with_webhook(channel, who, change)

    async def delete(self, channel: WebhookChannel, who: PersonaIdentity, message_id: int) -> None:
        """Delete a message the persona posted (a shorter regenerate, a rewind); gone already is fine."""
        async def remove(hook: discord.Webhook) -> None:
            await hook.delete_message(message_id, **_thread(channel))
        try:
            await self.with_webhook(channel, who, remove)
        except discord.NotFound:
            log.debug("message %s was already gone", message_id)

    async def webhook(self, channel: WebhookChannel, who: PersonaIdentity) -> discord.Webhook:
        """The parent channel's webhook of persona `who` (its name and avatar), found or created.

        Each persona has its own: a message can only be edited through the webhook that posted it. When
        the channel already holds `MAX_OWN_WEBHOOKS` of ours (Discord allows 15 per channel), the oldest
        other one is deleted first (personas of stories long over).
        """
        parent = _parent(channel)
        key = (parent.id, who.webhook_name)
        hook = self._hooks.get(key)
        if hook is not None:
            return hook
        async with self._setup_locks[parent.id]:
            if (hook := self._hooks.get(key)) is not None:
                return hook
            own = await self._own(parent)
            hook = next((h for h in own if h.name == who.webhook_name), None)
            if hook is None:
                for old in sorted(own, key=lambda h: h.id)[: max(0, len(own) - MAX_OWN_WEBHOOKS + 1)]:
                    await _delete_quietly(old)
                    self._hooks.pop((parent.id, old.name), None)
                hook = await parent.create_webhook(name=who.webhook_name, avatar=who.avatar,
                                                   reason="Masque: speak as a persona of this channel's story")
            self._hooks[key] = hook
            return hook

    async def delete_orphan(self, channel: WebhookChannel, message_id: int) -> None:
        """Delete a persona message no webhook of ours can reach any more (its webhook was deleted): as
        the bot, which needs Manage Messages. Gone already, or not allowed, leaves it be."""
        try:
            await channel.get_partial_message(message_id).delete()
        except (discord.NotFound, discord.Forbidden) as exc:
            log.info("could not delete orphaned persona message %s: %s", message_id, exc)

    def forget(self, channel: WebhookChannel) -> None:
        """Drop the channel's cached webhooks (one was deleted)."""
        parent = _parent(channel).id
        for key in [k for k in self._hooks if k[0] == parent]:
            del self._hooks[key]

    async def _own(self, parent: discord.abc.GuildChannel) -> list[discord.Webhook]:
        """The channel's webhooks this bot made (and can post through)."""
        me = self._client.user
        return [hook for hook in await parent.webhooks()
                if hook.token and hook.user is not None and me is not None and hook.user.id == me.id]

    async def with_webhook(self, channel: WebhookChannel, who: PersonaIdentity,
                            action: Callable[[discord.Webhook], Awaitable[T]]) -> T:
        """Run `action` on the channel's webhook dressed as `who`; a deleted webhook is recreated once."""
        hook = await self.webhook(channel, who)
        try:
            return await action(hook)
        except discord.NotFound as exc:
            if exc.code != UNKNOWN_WEBHOOK:
                raise
            log.info("webhook for channel %s was deleted; recreating it once", _parent(channel).id)
            self.forget(channel)
            return await action(await self.webhook(channel, who))


def _parent(channel: WebhookChannel) -> discord.abc.GuildChannel:
    if isinstance(channel, discord.Thread):
        if channel.parent is None:
            raise ValueError(f"thread {channel.id} has no parent channel in the cache")
        return channel.parent
    return channel


def _thread(channel: WebhookChannel) -> dict[str, discord.abc.Snowflake]:
    return {"thread": channel} if isinstance(channel, discord.Thread) else {}


async def _delete_quietly(hook: discord.Webhook) -> None:
    try:
        await hook.delete(reason="Masque: the channel's persona changed")
    except discord.NotFound:
        pass
