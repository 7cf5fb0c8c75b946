"""/masque settings and /masque samplers: how the bot behaves in this server (admins only);
/masque forget-me (anyone) and /masque forget-server (admins), answered in bot/cogs/privacy.py.

The settings themselves (types, defaults, storage) live in bot/prefs.py.
"""

from __future__ import annotations

from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.privacy import ask_forget_me, ask_forget_server
from bot.engine_client import EngineFeatureOff
from bot.prefs import (
    MAX_ART_EVERY,
    MAX_COOLDOWN_S,
    MAX_IDLE_MIN,
    MAX_REPLY_TOKENS,
    MAX_SILENCE_MS,
    MIN_REPLY_TOKENS,
    MIN_SILENCE_MS,
    ChannelPrefs,
    GuildPrefs,
    channel_prefs,
    guild_prefs,
)
from bot.store import Store
from bot.story.generation import PRESETS, Samplers

ART_NEEDS_A_MODEL = EngineFeatureOff("", "images").user_message  # says which setting turns it on


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

    # No default_permissions: /masque forget-me is for everyone. The admin commands check Manage Server
    # when they run (a member without it gets a short refusal).
    masque = app_commands.Group(name="masque", description="Masque server settings, and forgetting your data",
                                guild_only=True)

    def __init__(self, bot: commands.Bot):
        self.bot = bot
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
        text = verb + describe(prefs, here)
        if prefs.scene_art and await self.bot.engine.makes_images() is False:  # type: ignore[attr-defined]
            text += f"\n{ART_NEEDS_A_MODEL}"
        await interaction.response.send_message(text, ephemeral=True)

    @masque.command()
    @app_commands.checks.has_permissions(manage_guild=True)
    @app_commands.describe(
        preset="A named sampler preset (roleplay is the default)",
        temperature="Randomness: 0 always picks the likeliest word; 0.7-1.0 suits role-play",
        top_p="Nucleus sampling: keep the likeliest words up to this probability mass (1: off)",
        top_k="Keep only the K likeliest words (0: off)",
        min_p="Drop words less likely than this share of the likeliest one (0: off; 0.05-0.1 suits role-play)",
        repetition_penalty="Penalise words already in the story (1: off; 1.05-1.15 breaks loops)",
        frequency_penalty="Penalise words by how often the reply used them (-2 to 2)",
        presence_penalty="Penalise words the reply already used at all (-2 to 2)",
        reply_tokens="The longest reply, in tokens",
        reset="Forget this server's sampler values and length (back to the bot's defaults)")
    async def samplers(self, interaction: discord.Interaction,
                       preset: Literal["roleplay", "creative", "precise", "neutral"] | None = None,
                       temperature: app_commands.Range[float, 0.0, 2.0] | None = None,
                       top_p: app_commands.Range[float, 0.01, 1.0] | None = None,
                       top_k: app_commands.Range[int, 0, 1000] | None = None,
                       min_p: app_commands.Range[float, 0.0, 1.0] | None = None,
                       repetition_penalty: app_commands.Range[float, 1.0, 2.0] | None = None,
                       frequency_penalty: app_commands.Range[float, -2.0, 2.0] | None = None,
                       presence_penalty: app_commands.Range[float, -2.0, 2.0] | None = None,
                       reply_tokens: app_commands.Range[int, MIN_REPLY_TOKENS, MAX_REPLY_TOKENS] | None = None,
                       reset: bool = False) -> None:
        """Show or tune how replies are sampled in this server (as SillyTavern's sampler settings)."""
        prefs = await guild_prefs(self.store, interaction.guild_id)
        values = {k: v for k, v in {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                                    "repetition_penalty": repetition_penalty, "frequency_penalty": frequency_penalty,
                                    "presence_penalty": presence_penalty}.items() if v is not None}
        changed = reset or bool(values) or preset is not None or reply_tokens is not None
        if reset:
            prefs = prefs.model_copy(update={"sampler_preset": "", "samplers": Samplers(), "reply_tokens": None})
        if preset is not None:  # a new preset starts clean: its own values, not the old overrides
            prefs = prefs.model_copy(update={"sampler_preset": preset, "samplers": Samplers()})
        if values:
            prefs = prefs.model_copy(update={"samplers": Samplers(**values).over(prefs.samplers)})
        if reply_tokens is not None:
            prefs = prefs.model_copy(update={"reply_tokens": reply_tokens})
        if changed:
            await self.store.update_guild_settings(interaction.guild_id, **prefs.model_dump(mode="json"))
        settings = self.bot.settings  # type: ignore[attr-defined]
        text = describe_samplers(prefs, settings.sampler_preset, settings.reply_max_tokens)
        await interaction.response.send_message(("Saved. " if changed else "") + text, ephemeral=True)

    @masque.command(name="forget-me")
    @app_commands.describe(scope="Your data in this server only, or in every server Masque is in")
    async def forget_me(self, interaction: discord.Interaction,
                        scope: Literal["this server", "everywhere"] = "this server") -> None:
        """Delete what Masque keeps about you: your turns, attachments and pinned facts (asks first)."""
        await ask_forget_me(interaction, self.store, everywhere=scope == "everywhere")

    @masque.command(name="forget-server")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def forget_server(self, interaction: discord.Interaction) -> None:
        """Delete everything Masque keeps about this server, now (asks first)."""
        await ask_forget_server(interaction, self.store)


def describe_samplers(prefs: GuildPrefs, base: str, reply_max_tokens: int) -> str:
    """The server's sampler layer, in words."""
    preset = prefs.sampler_preset or f"{base} (the bot's default)"
    values = prefs.samplers.model_dump(exclude_none=True)
    shown = ", ".join(f"{k} **{v:g}**" for k, v in values.items()) or "none: the preset's"
    tokens = prefs.reply_tokens or f"{reply_max_tokens} (the bot's default)"
    return (f"Sampler preset: **{preset}** · values over it: {shown} · longest reply: **{tokens}** tokens "
            f"(lowered when a persona's card asks for shorter replies). A persona's card may set its own "
            f"samplers in `extensions.masque.samplers`. Presets: {', '.join(PRESETS)}.")


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Admin(bot))
