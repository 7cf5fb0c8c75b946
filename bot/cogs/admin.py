"""/masque settings: how the bot behaves in this server (admins only).

Stored as the guild's settings JSON through the store; `GuildPrefs` gives
them types and defaults, so a new setting needs no migration.
"""

from __future__ import annotations

import enum
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands
from pydantic import BaseModel, Field

from bot.store import Store

MAX_COOLDOWN_S = 600
MAX_ART_EVERY = 100


class ReplyMode(enum.StrEnum):
    EVERY = "every"  # every message in a story channel
    MENTIONS = "mentions"  # only messages that @mention the bot or name the persona
    REPLIES = "replies"  # only replies to the persona's messages


class GuildPrefs(BaseModel):
    """A server's settings, with defaults for anything never set."""

    reply_mode: ReplyMode = ReplyMode.EVERY
    scene_art: bool = False
    scene_art_every: int = Field(default=5, ge=1, le=MAX_ART_EVERY)  # at most one image every N persona replies
    cooldown_s: float = Field(default=3.0, ge=0, le=MAX_COOLDOWN_S)  # per user, between messages answered


async def guild_prefs(store: Store, guild_id: int) -> GuildPrefs:
    """The guild's settings (defaults filled in; unknown or broken keys fall back to defaults)."""
    stored = await store.guild_settings(guild_id)
    known = {k: v for k, v in stored.items() if k in GuildPrefs.model_fields}
    try:
        return GuildPrefs.model_validate(known)
    except ValueError:
        return GuildPrefs()


def describe(prefs: GuildPrefs) -> str:
    art = f"on, at most every {prefs.scene_art_every} replies" if prefs.scene_art else "off"
    return (f"Reply to: **{prefs.reply_mode.value}** · scene art: **{art}** · "
            f"cooldown per user: **{prefs.cooldown_s:g} s**")


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
        cooldown="Seconds each user waits between answered messages")
    async def settings(self, interaction: discord.Interaction,
                       reply_mode: Literal["every", "mentions", "replies"] | None = None,
                       scene_art: bool | None = None,
                       scene_art_every: app_commands.Range[int, 1, MAX_ART_EVERY] | None = None,
                       cooldown: app_commands.Range[float, 0, MAX_COOLDOWN_S] | None = None) -> None:
        """Show or change how Masque behaves in this server."""
        changes = {k: v for k, v in {"reply_mode": reply_mode, "scene_art": scene_art,
                                     "scene_art_every": scene_art_every, "cooldown_s": cooldown}.items()
                   if v is not None}
        if changes:
            merged = GuildPrefs.model_validate({**(await guild_prefs(self.store, interaction.guild_id)).model_dump(),
                                                **changes})
            await self.store.update_guild_settings(interaction.guild_id, **merged.model_dump(mode="json"))
        prefs = await guild_prefs(self.store, interaction.guild_id)
        verb = "Saved. " if changes else ""
        await interaction.response.send_message(verb + describe(prefs), ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Admin(bot))
