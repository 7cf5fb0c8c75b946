"""/masque settings: how the bot behaves in this server (admins only).

Stored as the guild's settings JSON through the store; `GuildPrefs` gives
them types and defaults, so a new setting needs no migration.
"""

from __future__ import annotations

import enum
from typing import Literal, TypeVar

import discord
from discord import app_commands
from discord.ext import commands
from pydantic import BaseModel, Field

from bot.store import Store

MAX_COOLDOWN_S = 600
MAX_ART_EVERY = 100
MIN_SILENCE_MS, MAX_SILENCE_MS = 200, 5000
MAX_IDLE_MIN = 24 * 60


class ReplyMode(enum.StrEnum):
    EVERY = "every"  # every message in a story channel
    MENTIONS = "mentions"  # only messages that @mention the bot or name the persona
    REPLIES = "replies"  # only replies to the persona's messages


class VoiceReplies(enum.StrEnum):
    OFF = "off"  # text only
    SPOKEN = "spoken"  # a voice message answers a voice message
    ALWAYS = "always"  # every reply also comes as a voice message


class GuildPrefs(BaseModel):
    """A server's settings, with defaults for anything never set."""

    reply_mode: ReplyMode = ReplyMode.EVERY
    scene_art: bool = False
    scene_art_every: int = Field(default=5, ge=1, le=MAX_ART_EVERY)  # at most one image every N persona replies
    cooldown_s: float = Field(default=3.0, ge=0, le=MAX_COOLDOWN_S)  # per user, between messages answered
    # Voice channels (bot/voice/session.py).
    voice_silence_ms: int = Field(default=700, ge=MIN_SILENCE_MS, le=MAX_SILENCE_MS)  # silence that ends a turn
    voice_barge_in: bool = True  # talking over the persona stops it
    voice_alone_leave_s: float = Field(default=60.0, ge=5, le=3600)  # leave when no human is in the call
    voice_idle_leave_min: float = Field(default=15.0, ge=0, le=MAX_IDLE_MIN)  # leave when nobody spoke (0: never)


class ChannelPrefs(BaseModel):
    """A story channel's own settings."""

    voice_replies: VoiceReplies = VoiceReplies.SPOKEN


Prefs = TypeVar("Prefs", GuildPrefs, ChannelPrefs)


def _typed(model: type[Prefs], stored: dict) -> Prefs:
    """Stored settings with defaults filled in; unknown or broken keys fall back to defaults."""
    known = {k: v for k, v in stored.items() if k in model.model_fields}
    try:
        return model.model_validate(known)
    except ValueError:
        return model()


async def guild_prefs(store: Store, guild_id: int) -> GuildPrefs:
    """The guild's settings."""
    return _typed(GuildPrefs, await store.guild_settings(guild_id))


async def channel_prefs(store: Store, channel_id: int) -> ChannelPrefs:
    """The channel's own settings."""
    return _typed(ChannelPrefs, await store.channel_settings(channel_id))


def describe(prefs: GuildPrefs, here: ChannelPrefs) -> str:
    art = f"on, at most every {prefs.scene_art_every} replies" if prefs.scene_art else "off"
    idle = f"{prefs.voice_idle_leave_min:g} min" if prefs.voice_idle_leave_min else "never"
    return (f"Reply to: **{prefs.reply_mode.value}** · scene art: **{art}** · "
            f"cooldown per user: **{prefs.cooldown_s:g} s**\n"
            f"Voice replies in this channel: **{here.voice_replies.value}** · voice calls: end of a turn after "
            f"**{prefs.voice_silence_ms} ms** of silence · talking over the persona stops it: "
            f"**{'on' if prefs.voice_barge_in else 'off'}** · leave when alone after "
            f"**{prefs.voice_alone_leave_s:g} s**, when nobody spoke for **{idle}**")


class Admin(commands.Cog):
    """Server settings."""

    masque = app_commands.Group(name="masque", description="Masque server settings", guild_only=True,
                                default_permissions=discord.Permissions(manage_guild=True))

    def __init__(self, bot: commands.Bot):
        self.store: Store = bot.store  # type: ignore[attr-defined]

    @masque.command()
    @app_commands.checks.has_permissions(manage_guild=True)
    @app_commands.describe(
        reply_mode="Answer every message, only mentions of the bot/persona, or only replies to the persona",
        scene_art="Illustrate the scene now and then", scene_art_every="At most one image every N replies",
        cooldown="Seconds each user waits between answered messages",
        voice_replies="In this channel: replies as voice messages never, when the user spoke, or always",
        voice_silence_ms="Voice calls: milliseconds of silence that end someone's turn",
        voice_barge_in="Voice calls: talking over the persona stops it",
        voice_alone_leave="Voice calls: seconds alone before leaving",
        voice_idle_leave="Voice calls: minutes nobody spoke before leaving (0: never)")
    async def settings(self, interaction: discord.Interaction,
                       reply_mode: Literal["every", "mentions", "replies"] | None = None,
                       scene_art: bool | None = None,
                       scene_art_every: app_commands.Range[int, 1, MAX_ART_EVERY] | None = None,
                       cooldown: app_commands.Range[float, 0, MAX_COOLDOWN_S] | None = None,
                       voice_replies: Literal["off", "spoken", "always"] | None = None,
                       voice_silence_ms: app_commands.Range[int, MIN_SILENCE_MS, MAX_SILENCE_MS] | None = None,
                       voice_barge_in: bool | None = None,
                       voice_alone_leave: app_commands.Range[float, 5, 3600] | None = None,
                       voice_idle_leave: app_commands.Range[float, 0, MAX_IDLE_MIN] | None = None) -> None:
        """Show or change how Masque behaves in this server (voice replies: in this channel)."""
        changes = {k: v for k, v in {"reply_mode": reply_mode, "scene_art": scene_art,
                                     "scene_art_every": scene_art_every, "cooldown_s": cooldown,
                                     "voice_silence_ms": voice_silence_ms, "voice_barge_in": voice_barge_in,
                                     "voice_alone_leave_s": voice_alone_leave,
                                     "voice_idle_leave_min": voice_idle_leave}.items()
                   if v is not None}
        if changes:
            merged = GuildPrefs.model_validate({**(await guild_prefs(self.store, interaction.guild_id)).model_dump(),
                                                **changes})
            await self.store.update_guild_settings(interaction.guild_id, **merged.model_dump(mode="json"))
        if voice_replies is not None:
            await self.store.update_channel_settings(interaction.channel_id, interaction.guild_id,
                                                     voice_replies=voice_replies)
        prefs = await guild_prefs(self.store, interaction.guild_id)
        here = await channel_prefs(self.store, interaction.channel_id)
        verb = "Saved. " if changes or voice_replies is not None else ""
        await interaction.response.send_message(verb + describe(prefs, here), ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Admin(bot))
