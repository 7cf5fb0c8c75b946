"""/story: start, end, reset, rewind, export, status."""

from __future__ import annotations

import io

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_io.replies import ReplyService
from bot.pipeline import StoryPipeline
from bot.store import GLOBAL_GUILD, Store

MAX_REWIND = 50


class StoryCog(commands.Cog, name="Story"):
    """Start and steer the channel's story."""

    story = app_commands.Group(name="story", description="Start and steer this channel's story", guild_only=True)

    def __init__(self, bot: commands.Bot):
        self.pipeline: StoryPipeline = bot.pipeline  # type: ignore[attr-defined]
        self.replies: ReplyService = bot.replies  # type: ignore[attr-defined]
        self.store: Store = bot.store  # type: ignore[attr-defined]

    async def persona_autocomplete(self, interaction: discord.Interaction,
                                   current: str) -> list[app_commands.Choice[str]]:
        names = await self.store.persona_names(interaction.guild_id or GLOBAL_GUILD, current)
        return [app_commands.Choice(name=n, value=n) for n in names]

    @story.command()
    @app_commands.describe(persona="Who plays the story (see /persona list)")
    @app_commands.autocomplete(persona=persona_autocomplete)
    async def start(self, interaction: discord.Interaction, persona: str) -> None:
        """Start a new story in this channel with a persona (the old one is archived)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        story, chosen, greetings = await self.pipeline.start_story(
            interaction.channel_id, interaction.guild_id, persona, interaction.user.display_name)
        await self.replies.show_greeting(interaction.channel, story, chosen)
        extra = f" It has {len(greetings) - 1} alternate greetings: use ◀️ ▶️." if len(greetings) > 1 else ""
        await interaction.followup.send(f"**{chosen.name}** is here. Write in this channel to play.{extra}",
                                        ephemeral=True)

    @story.command()
    async def end(self, interaction: discord.Interaction) -> None:
        """End this channel's story (it is kept for /story export until a new one starts)."""
        story = await self.pipeline.end(interaction.channel_id)
        text = "The story has ended." if story else "There is no story here. Start one with /story start."
        await interaction.response.send_message(text, ephemeral=story is None)

    @story.command()
    async def reset(self, interaction: discord.Interaction) -> None:
        """Start this channel's story over with the same persona."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        story, _ = await self.pipeline.reset(interaction.channel_id)
        persona = await self.replies.channel_persona(interaction.channel_id)
        await self.replies.show_greeting(interaction.channel, story, persona)
        await interaction.followup.send("The story starts over.", ephemeral=True)

    @story.command()
    @app_commands.describe(turns="How many of the last turns to take back")
    async def rewind(self, interaction: discord.Interaction, turns: app_commands.Range[int, 1, MAX_REWIND] = 1) -> None:
        """Take back the story's last turns (their persona messages are deleted)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        removed = await self.pipeline.rewind(interaction.channel_id, turns)
        await self.replies.delete_messages(interaction.channel, removed)
        await interaction.followup.send(f"Took back {len(removed)} turn{'s' * (len(removed) != 1)}.", ephemeral=True)

    @story.command()
    async def export(self, interaction: discord.Interaction) -> None:
        """Download this channel's story as a text file."""
        text = await self.pipeline.transcript(interaction.channel_id)
        file = discord.File(io.BytesIO(text.encode("utf-8")), filename=f"story-{interaction.channel_id}.txt")
        await interaction.response.send_message(file=file, ephemeral=True)

    @story.command()
    async def status(self, interaction: discord.Interaction) -> None:
        """Who plays this channel's story and how long it is."""
        info = await self.pipeline.status(interaction.channel_id)
        when = discord.utils.format_dt(info.last_activity, "R") if info.last_activity else "never"
        await interaction.response.send_message(
            f"**{info.persona_name}** · {info.turns} turns · {info.scene_images} scene images · "
            f"last activity {when}", ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(StoryCog(bot))
