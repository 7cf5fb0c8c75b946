"""Server and channel settings: typed, with defaults for anything never set.

Stored as the guild's (and channel's) settings JSON through the store, so a new setting needs no
migration. Changed with /masque settings and /masque samplers (bot/cogs/admin.py); read by the cogs,
the voice session and the story pipeline.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from pydantic import BaseModel, Field

from bot.store import Store
from bot.story.cast import Strategy
from bot.story.generation import PRESETS, Samplers

MAX_COOLDOWN_S = 600
MAX_ART_EVERY = 100
MIN_SILENCE_MS, MAX_SILENCE_MS = 200, 5000
MAX_IDLE_MIN = 24 * 60
MIN_REPLY_TOKENS, MAX_REPLY_TOKENS = 16, 2048
MAX_PERSONA_CHAIN = 6
MAX_MERGE_WINDOW_S = 30.0


class ReplyMode(enum.StrEnum):
    EVERY = "every"  # every message in a story channel
    MENTIONS = "mentions"  # only messages that @mention the bot or name the persona
    REPLIES = "replies"  # only replies to the persona's messages


class VoiceReplies(enum.StrEnum):
    OFF = "off"  # text only
    SPOKEN = "spoken"  # a voice message answers a voice message
    ALWAYS = "always"  # every reply also comes as a voice message


class GuildPrefs(BaseModel):
    """A server's settings, with defaults for anything never set."""

    reply_mode: ReplyMode = ReplyMode.EVERY
    scene_art: bool = False
    scene_art_every: int = Field(default=5, ge=1, le=MAX_ART_EVERY)  # at most one image every N persona replies
    cooldown_s: float = Field(default=3.0, ge=0, le=MAX_COOLDOWN_S)  # per user, between messages answered
    # Voice channels (bot/voice/session.py).
    voice_silence_ms: int = Field(default=700, ge=MIN_SILENCE_MS, le=MAX_SILENCE_MS)  # silence that ends a turn
    voice_barge_in: bool = True  # talking over the persona stops it
    voice_alone_leave_s: float = Field(default=60.0, ge=5, le=3600)  # leave when no human is in the call
    voice_idle_leave_min: float = Field(default=15.0, ge=0, le=MAX_IDLE_MIN)  # leave when nobody spoke (0: never)
    # Replies (bot/story/generation.py): a sampler preset and values over it ("" and unset: the bot's),
    # and the longest reply in tokens (None: the bot's MASQUE_REPLY_MAX_TOKENS).
    sampler_preset: str = ""
    samplers: Samplers = Field(default_factory=Samplers)
    reply_tokens: int | None = Field(default=None, ge=MIN_REPLY_TOKENS, le=MAX_REPLY_TOKENS)

    def sampler_layers(self) -> dict:
        """This server's layer for bot.story.generation.resolve."""
        preset = self.sampler_preset if self.sampler_preset in PRESETS else None
        return {"preset": preset, "values": self.samplers.model_dump(exclude_none=True)}


class ChannelPrefs(BaseModel):
    """A story channel's own settings."""

    voice_replies: VoiceReplies = VoiceReplies.SPOKEN
    # Group scenes (bot/story/cast.py): who speaks when no persona is addressed; how many persona replies
    # may follow one another before the scene waits for a person; how long to wait for more people's
    # messages before answering them together.
    speaker_strategy: Strategy = Strategy.NATURAL
    persona_chain: int = Field(default=2, ge=1, le=MAX_PERSONA_CHAIN)
    merge_window_s: float = Field(default=2.0, ge=0, le=MAX_MERGE_WINDOW_S)


Prefs = TypeVar("Prefs", GuildPrefs, ChannelPrefs)


def _typed(model: type[Prefs], stored: dict) -> Prefs:
    """Stored settings with defaults filled in; unknown or broken keys fall back to defaults."""
    known = {k: v for k, v in stored.items() if k in model.model_fields}
    try:
        return model.model_validate(known)
    except ValueError:
        return model()


async def guild_prefs(store: Store, guild_id: int) -> GuildPrefs:
    """The guild's settings."""
    return _typed(GuildPrefs, await store.guild_settings(guild_id))


async def channel_prefs(store: Store, channel_id: int) -> ChannelPrefs:
    """The channel's own settings."""
    return _typed(ChannelPrefs, await store.channel_settings(channel_id))


