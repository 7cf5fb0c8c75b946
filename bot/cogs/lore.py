"""/lore: standalone lorebooks (SillyTavern World Info or V3 `lorebook_v3`) for a story or the whole server.

A story reads its persona card's own book, the books attached to it, and the
server's books. Importing and removing needs Manage Server; listing and
showing does not.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.cards import MAX_CARD_BYTES, CardError, Lorebook, parse_lorebook
from bot.discord_io.uploads import refuse_if_too_big
from bot.pipeline import StoryPipeline
from bot.store import Store
from bot.story.lorebook import book_problems

SHOW_ENTRIES = 15
SHOW_PROBLEMS = 8
NAME_CHARS = 100
manage_server = app_commands.checks.has_permissions(manage_guild=True)


class LoreCog(commands.Cog, name="Lore"):
    """Lorebooks."""

    lore = app_commands.Group(name="lore", description="Lorebooks (World Info) for stories", guild_only=True)

    def __init__(self, bot: commands.Bot):
        self.pipeline: StoryPipeline = bot.pipeline  # type: ignore[attr-defined]
        self.store: Store = bot.store  # type: ignore[attr-defined]

    async def _story_id(self, interaction: discord.Interaction) -> int | None:
        story = await self.store.active_story(interaction.channel_id)
        return story.id if story else None

    async def book_autocomplete(self, interaction: discord.Interaction,
                                current: str) -> list[app_commands.Choice[str]]:
        records = await self.store.lorebooks(interaction.guild_id, await self._story_id(interaction))
        names = [r.name for r in records if current.casefold() in r.name_key]
        return [app_commands.Choice(name=n, value=n) for n in dict.fromkeys(names)][:25]

    @lore.command(name="import")
    @manage_server
    @app_commands.describe(file="SillyTavern World Info JSON, or a V3 lorebook_v3 JSON",
                           scope="This channel's story (default) or every story in the server")
    async def import_(self, interaction: discord.Interaction, file: discord.Attachment,
                      scope: Literal["story", "guild"] = "story") -> None:
        """Import a lorebook for this story or for the whole server."""
        refuse_if_too_big(file, MAX_CARD_BYTES)
        story_id = await self._story_id(interaction) if scope == "story" else None
        if scope == "story" and story_id is None:
            raise app_commands.CheckFailure("There is no story in this channel to attach a book to. Start one "
                                            "with /story start, or import with scope: guild.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            book = parse_lorebook(await file.read(), file.filename)
        except CardError as exc:
            await interaction.followup.send(f"{exc}. Nothing was stored.", ephemeral=True)
            return
        name = (book.name or PurePath(file.filename).stem or "Lorebook").strip()[:NAME_CHARS]
        await self.store.save_lorebook(interaction.guild_id, story_id, name, book.dump())
        where = "this story" if story_id else "every story in this server"
        problems = book_problems(book)
        warning = f"\n⚠️ {len(problems)} problem(s), those entries are skipped: see `/lore show`." if problems else ""
        await interaction.followup.send(f"📚 **{name}**: {len(book.entries)} entries, for {where}.{warning}",
                                        ephemeral=True)

    @lore.command(name="list")
    async def list_(self, interaction: discord.Interaction) -> None:
        """The lorebooks this channel's story reads (besides its persona's own)."""
        records = await self.store.lorebooks(interaction.guild_id, await self._story_id(interaction))
        if not records:
            await interaction.response.send_message("No lorebooks here. `/lore import file:` adds one.",
                                                    ephemeral=True)
            return
        lines = [f"**{r.name}** · {len(r.book.get('entries', []))} entries · "
                 f"{'this story' if r.story_id else 'server-wide'}" for r in records]
        await interaction.response.send_message("\n".join(lines)[:1900], ephemeral=True)

    @lore.command()
    @app_commands.describe(name="The book's name")
    @app_commands.autocomplete(name=book_autocomplete)
    async def show(self, interaction: discord.Interaction, name: str) -> None:
        """A lorebook's entries, and any it has to skip."""
        records = await self.store.lorebooks(interaction.guild_id, await self._story_id(interaction))
        record = next((r for r in records if r.name_key == name.casefold()), None)
        if record is None:
            raise app_commands.CheckFailure(f"There is no lorebook named {name!r} here. See /lore list.")
        book = Lorebook.model_validate(record.book)
        embed = discord.Embed(title=record.name, description=(book.description or "")[:300])
        for index, entry in enumerate(book.entries[:SHOW_ENTRIES]):
            keys = ", ".join(entry.keys)[:200] or ("(constant)" if entry.constant else "(no keys)")
            state = "" if entry.enabled else " (disabled)"
            embed.add_field(name=f"{entry.comment or entry.name or f'Entry {index}'}{state}"[:250],
                            value=f"keys: {keys}\n{entry.content[:150]}"[:1000], inline=False)
        if len(book.entries) > SHOW_ENTRIES:
            embed.set_footer(text=f"… and {len(book.entries) - SHOW_ENTRIES} more entries")
        problems = book_problems(book)
        if problems:
            embed.add_field(name="⚠️ Skipped", value="\n".join(problems[:SHOW_PROBLEMS])[:1000], inline=False)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @lore.command()
    @manage_server
    @app_commands.describe(name="The book's name")
    @app_commands.autocomplete(name=book_autocomplete)
    async def remove(self, interaction: discord.Interaction, name: str) -> None:
        """Remove a lorebook (this story's of that name, else the server's)."""
        record = await self.store.remove_lorebook(interaction.guild_id, await self._story_id(interaction), name)
        if record is None:
            raise app_commands.CheckFailure(f"There is no lorebook named {name!r} here. See /lore list.")
        await interaction.response.send_message(f"Removed lorebook **{record.name}**.", ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(LoreCog(bot))
