"""/scene and /imagine: art in the channel, in the style of its persona."""

from __future__ import annotations

import io

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_io.replies import ART_FILENAME, ReplyService, is_nsfw_channel
from bot.pipeline import StoryPipeline

MAX_PROMPT_CHARS = 1000


class Art(commands.Cog):
    """Pictures of the story."""

    def __init__(self, bot: commands.Bot):
        self.pipeline: StoryPipeline = bot.pipeline  # type: ignore[attr-defined]
        self.replies: ReplyService = bot.replies  # type: ignore[attr-defined]

    @app_commands.command()
    @app_commands.guild_only()
    @app_commands.checks.cooldown(1, 20.0, key=lambda i: i.channel_id)
    async def scene(self, interaction: discord.Interaction) -> None:
        """Illustrate the current scene of this channel's story."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        image = await self.pipeline.illustrate(interaction.channel_id, force=True,
                                               safe=not is_nsfw_channel(interaction.channel))
        if image is None:
            await interaction.followup.send("There is no scene to draw yet: write something first.", ephemeral=True)
            return
        await self.replies.post_image(interaction.channel, image)
        note = "Reused an earlier picture of this scene." if image.reused else "Here is the scene."
        await interaction.followup.send(note, ephemeral=True)

    @app_commands.command()
    @app_commands.guild_only()
    @app_commands.describe(prompt="What to draw")
    @app_commands.checks.cooldown(1, 20.0, key=lambda i: i.user.id)
    async def imagine(self, interaction: discord.Interaction,
                      prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS]) -> None:
        """Draw anything, in the art style of this channel's persona."""
        await interaction.response.defer(thinking=True)
        image = await self.pipeline.imagine(interaction.channel_id, interaction.guild_id, prompt,
                                            safe=not is_nsfw_channel(interaction.channel))
        file = discord.File(io.BytesIO(image.png), filename=ART_FILENAME, description=prompt[:1000])
        await interaction.followup.send(f"> {discord.utils.escape_markdown(prompt)}"[:2000], file=file)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Art(bot))
