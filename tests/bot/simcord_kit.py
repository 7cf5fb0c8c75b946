"""Shared set-up for the SimCord behaviour tests: the real MasqueBot on a virtual Discord.

The bot runs unmodified (real discord.py, real cogs, real webhooks through
SimCord's backend) with a real SQLite store and the fake engine over real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import discord
import simcord

from bot.app import MasqueBot
from bot.engine_client import EngineClient
from bot.settings import BotSettings
from bot.store import Store

TEST_ENGINE_TIMEOUT_S = 1.5  # short, so "slow engine" tests finish inside SimCord's settle window
SETTLE_TIMEOUT_S = 15.0  # room for an engine timeout plus the error message
BUILTIN = "Wren Halloway"  # a built-in persona (personas/wren_halloway.json)


def test_settings(settings: BotSettings) -> BotSettings:
    """The fixture's settings with a short engine timeout and no retries (failures show at once)."""
    return settings.model_copy(update={"engine_timeout_s": TEST_ENGINE_TIMEOUT_S, "engine_retries": 0,
                                       "engine_connect_timeout_s": 1.0, "engine_unhealthy_s": 0.0})


def make_bot(settings: BotSettings, store: Store) -> MasqueBot:
    settings = test_settings(settings)
    return MasqueBot(settings, store, EngineClient.from_settings(settings))


@dataclass
class World:
    """A guild with a story channel, an admin (Manage Server) and a plain player."""

    env: simcord.Env
    bot: MasqueBot
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    admin: simcord.MemberActor
    player: simcord.MemberActor

    def persona_messages(self, channel: simcord.ChannelHandle | None = None) -> list[discord.Message]:
        """Messages posted through a webhook (as a persona), oldest first."""
        return [m for m in (channel or self.channel).history() if m.webhook_id is not None]

    def error_types(self) -> list[str]:
        """Every error the bot's handlers met so far, by the type of the original exception (a command's
        CommandInvokeError by what it wraps). Reading them acknowledges them: SimCord fails a test whose errors
        nobody looked at, so a test asserts exactly the ones it expects."""
        return [type(getattr(error, "original", error)).__name__ for error in self.env.errors]

    def stored(self, message: discord.Message):
        """SimCord's own record of a message (ping lists, allowed mentions) for assertions."""
        return self.env.backend.get_message(message.channel.id, message.id)


@asynccontextmanager
async def world(bot: MasqueBot, settle_timeout: float = SETTLE_TIMEOUT_S) -> AsyncIterator[World]:
    """Run `bot` in SimCord with a guild, a channel, an admin and a player."""
    # MasqueBot is an AutoShardedBot that asks Discord for its shard count unless it was set: one here
    shards = None if bot.shard_count is not None else 1
    async with simcord.run(bot, settle_timeout=settle_timeout, shard_count=shards) as env:
        guild = env.create_guild("Role-play club")
        channel = guild.create_text_channel("tavern")
        admins = guild.create_role("Admins", permissions=discord.Permissions(manage_guild=True))
        admin = guild.add_member(env.create_user("ada"), roles=[admins])
        player = guild.add_member(env.create_user("pip", global_name="Pip"))
        await bot.store.update_guild_settings(guild.id, cooldown_s=0)  # tests send fast; cooldowns tested alone
        await env.settle()
        try:
            yield World(env, bot, guild, channel, admin, player)
        finally:
            for engine in {id(b.engine): b.engine for b in (bot, env.bot)}.values():
                await engine.close()  # an unclosed HTTP client would close itself in a later test's loop


async def start_story(w: World, persona: str = BUILTIN) -> simcord.InteractionResult:
    result = await w.admin.slash(w.channel, "story start", persona=persona)
    assert result.acknowledged
    return result
