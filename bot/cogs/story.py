"""/story: start, end, reset, rewind, export, import, status, note, summary; the cast: add, remove, next,
settings."""

from __future__ import annotations

import io
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_io.replies import ReplyService
from bot.discord_io.summary_view import SummaryView, summary_text
from bot.discord_io.uploads import refuse_if_too_big
from bot.discord_io.webhooks import NO_MENTIONS
from bot.pipeline import StoryPipeline
from bot.prefs import MAX_MERGE_WINDOW_S, MAX_PERSONA_CHAIN, channel_prefs
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

    async def cast_autocomplete(self, interaction: discord.Interaction,
                                current: str) -> list[app_commands.Choice[str]]:
        story = await self.store.active_story(interaction.channel_id)
        cast = await self.pipeline.cast.personas(story) if story else []
        return [app_commands.Choice(name=p.name, value=p.name) for p in cast
                if current.lower() in p.name.lower()][:25]

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
        story = await self.pipeline.story_of(interaction.channel_id)
        cast = [p.name for p in await self.pipeline.cast.personas(story)]
        here = await channel_prefs(self.store, interaction.channel_id)
        scene = (f"\nCast: {', '.join(f'**{n}**' for n in cast)} · who speaks when nobody is addressed: "
                 f"**{here.speaker_strategy.value}** · persona replies in a row: **{here.persona_chain}**"
                 if len(cast) > 1 else "")
        await interaction.response.send_message(
            f"**{info.persona_name}** · {info.turns} turns · {info.scene_images} scene images · "
            f"last activity {when}{scene}", ephemeral=True)

    @story.command()
    @app_commands.describe(persona="Who joins the scene (see /persona list)")
    @app_commands.autocomplete(persona=persona_autocomplete)
    async def add(self, interaction: discord.Interaction, persona: str) -> None:
        """Bring another persona into this channel's story (it knows what happens from now on)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        story = await self.pipeline.story_of(interaction.channel_id)
        chosen = await self.pipeline.cast.persona_named(interaction.guild_id, persona)
        await self.pipeline.cast.add(story, chosen)
        await interaction.channel.send(f"-# {chosen.name} joins the scene.", allowed_mentions=NO_MENTIONS)
        greeting = await self.pipeline.cast.greet(story, chosen, interaction.user.display_name)
        if greeting is not None:
            await self.replies.show_turn(interaction.channel, chosen, greeting)
        await interaction.followup.send(f"**{chosen.name}** is in the scene. Name a persona to speak to it.",
                                        ephemeral=True)

    @story.command()
    @app_commands.describe(persona="Who leaves the scene")
    @app_commands.autocomplete(persona=cast_autocomplete)
    async def remove(self, interaction: discord.Interaction, persona: str) -> None:
        """Take a persona out of this channel's story (it speaks no more)."""
        story = await self.pipeline.story_of(interaction.channel_id)
        chosen = await self.pipeline.cast.persona_named(interaction.guild_id, persona)
        await self.pipeline.cast.remove(story, chosen)
        await interaction.response.send_message(f"-# {chosen.name} leaves the scene.", allowed_mentions=NO_MENTIONS)

    @story.command(name="next")
    @app_commands.describe(persona="Who speaks (empty: the story's strategy chooses)")
    @app_commands.autocomplete(persona=cast_autocomplete)
    async def next_(self, interaction: discord.Interaction, persona: str | None = None) -> None:
        """Make a persona of the scene speak now."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with self.pipeline.channel_lock(interaction.channel_id):
            story = await self.pipeline.story_of(interaction.channel_id)
            chosen = await self.pipeline.cast.next_speaker(story, persona)
            await self.replies.speak(interaction.channel, chosen)
        await interaction.followup.send(f"**{chosen.name}** spoke.", ephemeral=True)

    @story.command()
    @app_commands.describe(
        strategy="Who speaks when a message addresses nobody: natural (mentions, then talkativeness), "
                 "round_robin, random, or manual (only /story next)",
        persona_replies="Persona replies in a row after a person's message before the scene waits for people",
        merge_window="Seconds to wait for more people's messages to answer them together (groups only)")
    async def settings(self, interaction: discord.Interaction,
                       strategy: Literal["natural", "round_robin", "random", "manual"] | None = None,
                       persona_replies: app_commands.Range[int, 1, MAX_PERSONA_CHAIN] | None = None,
                       merge_window: app_commands.Range[float, 0.0, MAX_MERGE_WINDOW_S] | None = None) -> None:
        """Show or change how this channel's scene takes turns."""
        changes = {k: v for k, v in {"speaker_strategy": strategy, "persona_chain": persona_replies,
                                     "merge_window_s": merge_window}.items() if v is not None}
        if changes:
            await self.store.update_channel_settings(interaction.channel_id, interaction.guild_id, **changes)
        here = await channel_prefs(self.store, interaction.channel_id)
        await interaction.response.send_message(
            f"{'Saved. ' if changes else ''}Who speaks when nobody is addressed: **{here.speaker_strategy.value}** · "
            f"persona replies in a row: **{here.persona_chain}** · several people's messages within "
            f"**{here.merge_window_s:g} s** are answered together", ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(StoryCog(bot))
