"""The /story summary message: the summary, and for admins an Edit (modal) and a Redo button."""

from __future__ import annotations

import discord

from bot.engine_client import EngineError
from bot.errors import StoryError
from bot.pipeline import StoryPipeline
from bot.store import Summary

SUMMARY_SHOW_CHARS = 1800
MODAL_CHARS = 4000  # Discord's limit for one text input
VIEW_TIMEOUT_S = 15 * 60


def summary_text(summary: Summary | None) -> str:
    if summary is None:
        return ("No summary yet. Masque writes one in the background once turns leave the prompt, "
                "and updates it as the story goes on.")
    text = summary.text if len(summary.text) <= SUMMARY_SHOW_CHARS else summary.text[:SUMMARY_SHOW_CHARS] + "…"
    return f"**The story so far** (through turn {summary.through_position}):\n{discord.utils.escape_markdown(text)}"


def _is_admin(interaction: discord.Interaction) -> bool:
    user = interaction.user
    return isinstance(user, discord.Member) and user.guild_permissions.manage_guild


class SummaryModal(discord.ui.Modal, title="Edit the story so far"):
    def __init__(self, pipeline: StoryPipeline, story_id: int, text: str):
        super().__init__(timeout=VIEW_TIMEOUT_S)
        self.pipeline, self.story_id = pipeline, story_id
        self.text = discord.ui.TextInput(label="Summary", style=discord.TextStyle.paragraph, default=text[:MODAL_CHARS],
                                         max_length=MODAL_CHARS, required=True)
        self.add_item(self.text)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        story = await self.pipeline.store.get_story(self.story_id)
        if story is None:
            await interaction.response.send_message("That story is gone.", ephemeral=True)
            return
        await self.pipeline.memory.edit_summary(story, self.text.value)
        await interaction.response.send_message("Saved: the persona remembers the story this way now.",
                                                ephemeral=True)


class SummaryView(discord.ui.View):
    """Edit and Redo, for members with Manage Server."""

    def __init__(self, pipeline: StoryPipeline, story_id: int):
        super().__init__(timeout=VIEW_TIMEOUT_S)
        self.pipeline, self.story_id = pipeline, story_id

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if _is_admin(interaction):
            return True
        await interaction.response.send_message("Only members with Manage Server can change the summary.",
                                                ephemeral=True)
        return False

    @discord.ui.button(label="Edit", emoji="✏️", style=discord.ButtonStyle.secondary)
    async def edit(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
        latest = await self.pipeline.store.latest_summary(self.story_id)
        if latest is None:
            await interaction.response.send_message("There is no summary to edit yet.", ephemeral=True)
            return
        await interaction.response.send_modal(SummaryModal(self.pipeline, self.story_id, latest.text))

    @discord.ui.button(label="Redo", emoji="🔁", style=discord.ButtonStyle.secondary)
    async def redo(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        story = await self.pipeline.store.get_story(self.story_id)
        if story is None:
            await interaction.followup.send("That story is gone.", ephemeral=True)
            return
        try:
            summary = await self.pipeline.memory.redo_summary(story)
        except EngineError as exc:
            await interaction.followup.send(f"{exc.user_message} The summary will be written again later.",
                                            ephemeral=True)
            return
        except StoryError as exc:
            await interaction.followup.send(str(exc), ephemeral=True)
            return
        await interaction.followup.send(summary_text(summary), ephemeral=True)
