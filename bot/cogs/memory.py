"""/memory: facts pinned to this channel's story, in every prompt (add, list, remove).

Anyone playing may pin a fact; a fact is removed by whoever pinned it or by a
member with Manage Server.
"""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import StoryError
from bot.pipeline import StoryPipeline
from bot.store import MAX_FACT_CHARS, Store

LIST_CHARS = 1900  # a message holds 2000


class MemoryCog(commands.Cog, name="Memory"):
    """Pinned facts."""

    memory = app_commands.Group(name="memory", description="Facts the story always remembers", guild_only=True)

    def __init__(self, bot: commands.Bot):
        self.pipeline: StoryPipeline = bot.pipeline  # type: ignore[attr-defined]
        self.store: Store = bot.store  # type: ignore[attr-defined]

    @memory.command()
    @app_commands.describe(text="A fact the persona must never forget, e.g. 'Ann's sister is called Mira'")
    async def add(self, interaction: discord.Interaction,
                  text: app_commands.Range[str, 1, MAX_FACT_CHARS]) -> None:
        """Pin a fact to this story: it is in every prompt from now on."""
        story = await self.pipeline.story_of(interaction.channel_id)
        fact = await self.pipeline.memory.pin(story, text, interaction.user.id)
        text = discord.utils.escape_markdown(fact.text)
        await interaction.response.send_message(f"📌 Pinned fact **#{fact.id}**: {text}", ephemeral=True)

    @memory.command(name="list")
    async def list_(self, interaction: discord.Interaction) -> None:
        """The facts pinned to this story."""
        story = await self.pipeline.story_of(interaction.channel_id)
        facts = await self.store.facts(story.id)
        if not facts:
            await interaction.response.send_message("No pinned facts yet. `/memory add text:` pins one.",
                                                    ephemeral=True)
            return
        lines, used = [], 0
        for fact in facts:
            line = f"**#{fact.id}** {discord.utils.escape_markdown(fact.text)}"
            if used + len(line) > LIST_CHARS:
                lines.append(f"… and {len(facts) - len(lines)} more")
                break
            lines.append(line)
            used += len(line) + 1
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @memory.command()
    @app_commands.describe(id="The fact's number, from /memory list")
    async def remove(self, interaction: discord.Interaction, id: int) -> None:  # noqa: A002 - the option's name
        """Unpin a fact (yours, or any with Manage Server)."""
        story = await self.pipeline.story_of(interaction.channel_id)
        fact = next((f for f in await self.store.facts(story.id) if f.id == id), None)
        if fact is None:
            raise StoryError(f"This story has no pinned fact #{id}. See /memory list.")
        admin = isinstance(interaction.user, discord.Member) and interaction.user.guild_permissions.manage_guild
        if fact.author_id != interaction.user.id and not admin:
            raise app_commands.CheckFailure("Only whoever pinned a fact, or a member with Manage Server, "
                                            "may remove it.")
        await self.pipeline.memory.unpin(story, id)
        await interaction.response.send_message(f"Unpinned fact #{id}.", ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(MemoryCog(bot))
