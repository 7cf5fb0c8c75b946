"""/story: start, end, reset, rewind, export, import, status, note, summary."""

from __future__ import annotations

import io
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_io.replies import ReplyService
from bot.discord_io.summary_view import SummaryView, summary_text
from bot.discord_io.uploads import refuse_if_too_big
from bot.pipeline import StoryPipeline
from bot.store import GLOBAL_GUILD, Store
from bot.story.chatfile import MAX_CHAT_FILE_BYTES, ChatFileError, from_sillytavern_jsonl
from bot.story.memory import DEFAULT_NOTE_DEPTH
from bot.story_files import export_story, import_story

MAX_REWIND = 50
MAX_NOTE_DEPTH = 100
EXPORT_SUFFIX = {"text": "txt", "sillytavern": "jsonl", "masque": "json"}


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
    @app_commands.describe(format="text (to read), sillytavern (a chat JSONL SillyTavern imports, swipes kept) "
                                  "or masque (everything, as JSON)")
    async def export(self, interaction: discord.Interaction,
                     format: Literal["text", "sillytavern", "masque"] = "text") -> None:  # noqa: A002
        """Download this channel's story as a file."""
        data = await export_story(self.pipeline, interaction.channel_id, format)
        name = f"story-{interaction.channel_id}.{EXPORT_SUFFIX[format]}"
        await interaction.response.send_message(file=discord.File(io.BytesIO(data), filename=name), ephemeral=True)

    @story.command(name="import")
    @app_commands.checks.has_permissions(manage_guild=True)
    @app_commands.describe(file="A SillyTavern chat file (.jsonl)",
                           persona="Who plays it (default: the persona named in the file, else this channel's)")
    @app_commands.autocomplete(persona=persona_autocomplete)
    async def import_(self, interaction: discord.Interaction, file: discord.Attachment,
                      persona: str | None = None) -> None:
        """Start a new story in this channel from a SillyTavern chat (the current one is archived)."""
        refuse_if_too_big(file, MAX_CHAT_FILE_BYTES, "Nothing was imported.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            chat = from_sillytavern_jsonl(await file.read(), file.filename)
        except ChatFileError as exc:
            await interaction.followup.send(f"{exc}. Nothing was imported.", ephemeral=True)
            return
        _, chosen = await import_story(self.pipeline, interaction.channel_id, interaction.guild_id, chat, persona)
        await interaction.followup.send(f"Imported {len(chat.turns)} messages as a new story with "
                                        f"**{chosen.name}**. Write in this channel to go on.", ephemeral=True)

    @story.command()
    @app_commands.describe(text="Guidance the persona reads near the end of every prompt (empty: remove it)",
                           depth="How many messages from the end it is inserted (SillyTavern's default: 4)")
    async def note(self, interaction: discord.Interaction, text: app_commands.Range[str, 0, 2000] = "",
                   depth: app_commands.Range[int, 0, MAX_NOTE_DEPTH] = DEFAULT_NOTE_DEPTH) -> None:
        """Set this story's author's note (as SillyTavern's), or clear it."""
        story = await self.pipeline.story_of(interaction.channel_id)
        await self.pipeline.memory.set_note(story, text, depth)
        said = f"Author's note set, {depth} messages from the end." if text.strip() else "Author's note cleared."
        await interaction.response.send_message(said, ephemeral=True)

    @story.command()
    async def summary(self, interaction: discord.Interaction) -> None:
        """The story so far, as the persona remembers it (admins can edit it or have it redone)."""
        story = await self.pipeline.story_of(interaction.channel_id)
        latest = await self.store.latest_summary(story.id)
        await interaction.response.send_message(summary_text(latest), view=SummaryView(self.pipeline, story.id),
                                                ephemeral=True)

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
