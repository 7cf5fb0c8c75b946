"""/voice join and /voice leave: the channel's story, played aloud in the caller's voice channel.

The cog is thin: it checks who may do what, connects with our listening voice
client and hands the call to a `VoiceSession` (bot/voice/session.py), one per guild.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_io.replies import ReplyService, identity_of
from bot.prefs import guild_prefs
from bot.store import Store
from bot.voice.client import ListeningVoiceClient
from bot.voice.session import VoiceSession

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 20.0


class VoiceCog(commands.Cog, name="Voice"):
    """Voice-channel role-play."""

    voice = app_commands.Group(name="voice", description="Play this channel's story aloud in a voice channel",
                               guild_only=True)

    def __init__(self, bot: commands.Bot):
        self.bot = bot
        self.store: Store = bot.store  # type: ignore[attr-defined]
        self.replies: ReplyService = bot.replies  # type: ignore[attr-defined]
        self.sessions: dict[int, VoiceSession] = {}  # guild id -> its one session
        self._joining: set[int] = set()

    async def cog_unload(self) -> None:
        for session in list(self.sessions.values()):
            await session.stop("Masque is restarting; left the voice channel.")

    @voice.command()
    async def join(self, interaction: discord.Interaction) -> None:
        """Join your voice channel and play this channel's story aloud."""
        guild, member = interaction.guild, interaction.user
        channel = member.voice.channel if isinstance(member, discord.Member) and member.voice else None
        if channel is None:
            await _tell(interaction, "Join a voice channel first, then use /voice join here.")
            return
        story = await self.store.active_story(interaction.channel_id)
        if story is None:
            await _tell(interaction, "There is no story in this channel. Start one with /story start, "
                                     "then use /voice join.")
            return
        current = self.sessions.get(guild.id)
        if current is not None or guild.id in self._joining or guild.voice_client is not None:
            where = f" in {current.voice_channel.mention}" if current is not None else ""
            await _tell(interaction, f"I am already in a voice call{where} in this server. "
                                     "Use /voice leave first.")
            return
        allowed = channel.permissions_for(guild.me)
        if not (allowed.connect and allowed.speak):
            await _tell(interaction, f"I need the Connect and Speak permissions in {channel.mention}.")
            return
        self._joining.add(guild.id)
        await interaction.response.defer(thinking=True)
        try:
            persona = await self.replies.channel_persona(interaction.channel_id)
            vc = await channel.connect(cls=ListeningVoiceClient, timeout=CONNECT_TIMEOUT_S, self_deaf=False)
        except (TimeoutError, discord.ClientException, discord.HTTPException, OSError) as exc:
            log.warning("could not join voice channel %s: %s", channel.id, exc)
            await interaction.followup.send(f"I could not join {channel.mention}: {exc or 'timed out'}. "
                                            "Try again in a moment.")
            return
        finally:
            self._joining.discard(guild.id)
        session = VoiceSession(vc, interaction.channel, self.replies, self.bot.settings,  # type: ignore[attr-defined]
                               await guild_prefs(self.store, guild.id), on_end=self._ended)
        self.sessions[guild.id] = session
        session.start()
        await interaction.followup.send(
            f"🔊 Joined {channel.mention}: **{identity_of(persona).name}** plays this channel's story aloud. "
            "Speak and they answer; the conversation shows here. /voice leave to stop.")

    @voice.command()
    async def leave(self, interaction: discord.Interaction) -> None:
        """Leave the voice channel."""
        session = self.sessions.get(interaction.guild_id)
        if session is None:
            vc = interaction.guild.voice_client
            if vc is not None:  # a call without a session (left over): just hang up
                await vc.disconnect(force=True)
            await _tell(interaction, "I am not in a voice call in this server.")
            return
        await interaction.response.send_message(f"🔇 Leaving {session.voice_channel.mention}.")
        await session.stop(say=False)

    @commands.Cog.listener()
    async def on_voice_state_update(self, member: discord.Member, before: discord.VoiceState,
                                    after: discord.VoiceState) -> None:
        session = self.sessions.get(member.guild.id)
        if session is None or self.bot.user is None or member.id != self.bot.user.id:
            return
        # No channel (a moderator, a deleted channel, or discord.py reconnecting) is the session's own watch to
        # judge: it ends once discord.py has given the connection up.
        if after.channel is not None and before.channel is not None and after.channel != before.channel:
            await session.story_channel.send(f"-# 🔊 Moved to {after.channel.mention}; still playing the story.",
                                             allowed_mentions=discord.AllowedMentions.none())

    def _ended(self, session: VoiceSession) -> None:
        if self.sessions.get(session.guild.id) is session:
            del self.sessions[session.guild.id]


async def _tell(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.send_message(text, ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(VoiceCog(bot))
