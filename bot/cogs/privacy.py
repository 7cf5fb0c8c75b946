"""Forgetting: /masque forget-me and /masque forget-server (their questions and answers; the commands sit
in the /masque group in bot/cogs/admin.py), and the guilds the bot left: their leave time is recorded
and their data is deleted MASQUE_GUILD_RETENTION_DAYS later unless the bot is added back first.

The deletions themselves live in bot/store/privacy.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import timedelta
from typing import TypeVar

import discord
from discord.ext import commands, tasks

from bot.discord_io.confirm import ConfirmView
from bot.store import GuildErased, Store, UserErased

log = logging.getLogger(__name__)

PURGE_EVERY_H = 12  # how often guilds past their retention are looked for (and once at start)
UNLOAD_WAIT_S = 30.0  # how long a shutdown waits for a purge round's database work to finish
T = TypeVar("T")


def _n(count: int, word: str, plural: str = "") -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def forgot_user(erased: UserErased, where: str) -> str:
    """The answer to a confirmed /masque forget-me."""
    text = (f"Done: deleted {_n(erased.turns, 'turn')} of yours {where} "
            f"({_n(erased.attachments, 'attachment')}) and {_n(erased.facts, 'pinned fact')}.")
    if erased.summaries:
        summaries = _n(erased.summaries, "story summary", "story summaries")
        text += f" {summaries} that retold them will be written again without you."
    if erased.personas_unlinked:
        made = _n(erased.personas_unlinked, "persona")
        text += f" {made} you made stay for the server, no longer linked to you."
    return text


def forgot_guild(erased: GuildErased) -> str:
    """The answer to a confirmed /masque forget-server."""
    return (f"Done: deleted {_n(erased.stories, 'story', 'stories')} ({_n(erased.turns, 'turn')}), "
            f"{_n(erased.personas, 'persona')}, {_n(erased.channels, 'channel setting')}, "
            f"{_n(erased.lorebooks, 'lorebook')} and this server's settings. Masque starts here from scratch.")


async def ask_forget_me(interaction: discord.Interaction, store: Store, everywhere: bool) -> None:
    """Ask the user to confirm, then delete their data in this server (or everywhere)."""
    user_id = interaction.user.id
    guild_id = None if everywhere else interaction.guild_id
    where = "in every server" if everywhere else "in this server"
    turns = await store.count_user_turns(user_id, guild_id)

    async def forget() -> str:
        erased = await store.erase_user(user_id, guild_id)
        log.info("forget-me: user %s, guild %s: %s", user_id, guild_id or "all", erased.as_dict())
        return forgot_user(erased, where)

    await ConfirmView(user_id, forget).ask(interaction, (
        f"Delete everything Masque keeps about you {where}? That is {_n(turns, 'turn')} you wrote or spoke "
        f"(with their attachments) and the facts you pinned. Summaries that retell your turns are rewritten; "
        f"the personas' replies stay. This cannot be undone."))


async def ask_forget_server(interaction: discord.Interaction, store: Store) -> None:
    """Ask the admin to confirm, then delete everything of this server at once."""
    guild_id = interaction.guild_id

    async def forget() -> str:
        erased = await store.erase_guild(guild_id)
        log.info("forget-server: guild %s by user %s: %s", guild_id, interaction.user.id, erased.as_dict())
        return forgot_guild(erased)

    await ConfirmView(interaction.user.id, forget).ask(interaction, (
        "Delete everything Masque keeps about this server now? Every story and turn, this server's personas, "
        "lorebooks, scene art, memories, channel and server settings. This cannot be undone."))


class Privacy(commands.Cog):
    """Guilds the bot left: recorded, and purged after the retention period."""

    def __init__(self, bot: commands.Bot):
        self.bot = bot
        self.store: Store = bot.store  # type: ignore[attr-defined]
        self._writing: asyncio.Task | None = None

    async def cog_load(self) -> None:
        self.purge.start()

    async def cog_unload(self) -> None:
        self.purge.cancel()
        if self._writing is not None and not self._writing.done():
            await asyncio.wait({self._writing}, timeout=UNLOAD_WAIT_S)

    async def _uncut(self, work: Awaitable[T]) -> T:
        """The loop's database work, finished even when the loop is cancelled (a shutdown right after
        start): SQLAlchemy ends a SQLite connection cut mid-query with a close that can never complete,
        and that task would then hang the event loop's exit. `cog_unload` waits for it instead."""
        self._writing = asyncio.ensure_future(work)
        return await asyncio.shield(self._writing)

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        await self.store.guild_left(guild.id, discord.utils.utcnow())

    @commands.Cog.listener()
    async def on_guild_join(self, guild: discord.Guild) -> None:
        await self.store.guilds_back([guild.id])

    @tasks.loop(hours=PURGE_EVERY_H)
    async def purge(self) -> None:
        days = self.bot.settings.guild_retention_days  # type: ignore[attr-defined]
        try:
            purged = await self._uncut(self.store.purge_departed_guilds(discord.utils.utcnow() - timedelta(days=days)))
        except Exception:  # a failed round must not end the loop; the next one tries again
            log.exception("purging the guilds the bot left failed")
            return
        for guild_id in purged:
            log.info("deleted the data of guild %s, which the bot left over %g days ago", guild_id, days)

    @purge.before_loop
    async def _present_guilds_stay(self) -> None:
        # A guild that added the bot back while it was offline sent no on_guild_join: it is here now.
        await self.bot.wait_until_ready()
        await self._uncut(self.store.guilds_back([g.id for g in self.bot.guilds]))


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Privacy(bot))
