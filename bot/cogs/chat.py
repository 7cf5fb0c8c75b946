"""The story listener: people's messages in a story channel become turns the cast answers.

Every message is kept as a turn, answered or not (context for later prompts); the scene queue
(bot/discord_io/scene_queue.py) decides when the scene answers, the cast (bot/cast.py) who
speaks, and a persona named in another's reply may answer it, a few replies in a row at most.
Never answers the bot's own messages, other bots, or any webhook message (Discord echoes every
webhook post back through the gateway, so answering them would loop). Edits and deletions of a
user's message update or remove their turn.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import OrderedDict

import discord
from discord.ext import commands

from bot.discord_io.replies import ReplyService, is_nsfw_channel
from bot.discord_io.scene_queue import SceneQueue, Waiting
from bot.discord_io.webhooks import NO_MENTIONS
from bot.engine_client import EngineError
from bot.pipeline import InputAttachment, StoryError, StoryPipeline, UserInput
from bot.prefs import GuildPrefs, ReplyMode, channel_prefs, guild_prefs
from bot.store import AuthorKind, DuplicateMessage, Persona, Store, Story, Turn
from bot.story.cast import named_in

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_AUDIO_BYTES = 25 * 1024 * 1024
COOLDOWN_EMOJI = "⏳"
MISSING_PERMISSIONS = ("I cannot speak as the persona here: I need the Manage Webhooks permission in this "
                       "channel. Ask a server admin, then write your message again.")
OOC_PREFIXES = ("//", "((")  # out-of-character chatter the persona does not answer
SEEN_MESSAGES = 4096  # message ids remembered against gateway replays (a RESUME redelivers seconds' worth)
_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def attachment_kind(attachment: discord.Attachment) -> str:
    """image, audio (voice messages and audio files) or other."""
    content_type = (attachment.content_type or "").split(";")[0].strip()
    if attachment.is_voice_message() or content_type.startswith("audio/"):
        return "audio"
    if content_type.startswith("image/"):
        return "image"
    return "other"


class Chat(commands.Cog):
    """Turns story-channel messages into persona replies."""

    def __init__(self, bot: commands.Bot):
        self.bot = bot
        self.store: Store = bot.store  # type: ignore[attr-defined]
        self.pipeline: StoryPipeline = bot.pipeline  # type: ignore[attr-defined]
        self.replies: ReplyService = bot.replies  # type: ignore[attr-defined]
        self._cooldowns: dict[float, commands.CooldownMapping] = {}
        self._since_art: dict[int, int] = {}  # channel id -> replies since the last scene image
        self._queues: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        # Discord delivers gateway events at least once: a RESUME may replay a MESSAGE_CREATE already handled.
        # These ids catch a replay before any work; the turn store's unique message ids catch the rest
        # (a replay after this memory forgot, or after a restart) without a lookup on the hot path.
        self._seen: OrderedDict[int, None] = OrderedDict()
        self.scene = SceneQueue(self.answer, depth=self.pipeline.metrics.queue_depth)

    async def cog_unload(self) -> None:
        await self.scene.close()

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not self.is_story_candidate(message) or not self.first_sight(message.id):
            return
        # Taken before the first await: asyncio locks are fair, so a channel's
        # messages are handled (and answered) in the order they arrived.
        lock = self._queues.get(message.channel.id)
        if lock is None:
            lock = self._queues[message.channel.id] = asyncio.Lock()
        async with lock:
            await self.handle(message)

    async def handle(self, message: discord.Message) -> None:
        """Keep the message as a turn; queue it for an answer if the reply mode says it wants one."""
        story = await self.store.active_story(message.channel.id)
        if story is None:
            return
        prefs = await guild_prefs(self.store, message.guild.id)
        user = await self.user_input(message)
        try:
            turn = await self.pipeline.add_user_turn(story, user)
        except DuplicateMessage:
            log.info("message %s was delivered again; it already has its turn", message.id)
            return
        if not await self.addressed(message, prefs, story):
            return  # part of the story all the same: the cast reads it next time it speaks
        ready_at = 0.0
        if prefs.cooldown_s > 0 and (wait := self.cooldown(prefs).update_rate_limit(message)):
            await message.add_reaction(COOLDOWN_EMOJI)  # answered when the cooldown ends, or with the next answer
            ready_at = asyncio.get_running_loop().time() + wait
        here = await channel_prefs(self.store, message.channel.id)
        self.scene.add(Waiting(message, user, turn, ready_at), here.merge_window_s)

    async def answer(self, batch: list[Waiting]) -> None:
        """Answer waiting messages as one turn: the speaker the cast chooses, then any persona its reply
        addresses (within the story's limit), then scene art when it is due."""
        newest = batch[-1].message
        channel = newest.channel
        async with self.pipeline.channel_lock(channel.id):
            story = await self.store.active_story(channel.id)
            batch = [w for w in batch if story is not None and w.turn.story_id == story.id]
            if not batch:
                return  # the story ended or started over meanwhile
            try:
                persona = await self.speaker(story, batch)
                if persona is None:
                    return  # the manual strategy: /story next chooses
                turn = await self.replies.answer(newest, persona, [(w.turn, w.user) for w in batch])
                if turn is not None:
                    await self.follow_ups(channel, story, persona, turn)
                    await self.maybe_illustrate(channel, await guild_prefs(self.store, newest.guild.id), turn.id)
            except StoryError as exc:
                await newest.reply(str(exc), allowed_mentions=NO_MENTIONS, mention_author=False)
            except discord.Forbidden:
                # The turns are stored; an admin can fix the permission and press regenerate / write again.
                log.warning("missing permissions to answer in channel %s", channel.id)
                await newest.reply(MISSING_PERMISSIONS, allowed_mentions=NO_MENTIONS, mention_author=False)

    async def speaker(self, story: Story, batch: list[Waiting]) -> Persona | None:
        """Who answers: the persona a message replies to or names, else the story's strategy."""
        reply_to = None
        for waiting in reversed(batch):
            reference = waiting.message.reference.message_id if waiting.message.reference else None
            replied = await self.store.turn_by_message(reference) if reference else None
            if replied is not None and replied.persona_id is not None:
                reply_to = replied.persona_id
                break
        text = "\n".join(w.user.text for w in batch)
        return await self.pipeline.cast.speaker(story, text, reply_to)

    async def follow_ups(self, channel: discord.abc.Messageable, story: Story, persona: Persona, turn: Turn) -> None:
        """Personas answering each other: the one a reply names speaks next, a few in a row at most."""
        in_a_row = 1
        while (nxt := await self.pipeline.cast.answerer(story, turn.text, persona.id, in_a_row)) is not None:
            try:
                turn = await self.replies.speak(channel, nxt)
            except EngineError as exc:
                log.warning("%s could not answer %s in channel %s: %s", nxt.name, persona.name, channel.id, exc)
                return
            persona, in_a_row = nxt, in_a_row + 1

    def first_sight(self, message_id: int) -> bool:
        """False when this message id was handled already (a replayed gateway event)."""
        if message_id in self._seen:
            return False
        self._seen[message_id] = None
        if len(self._seen) > SEEN_MESSAGES:
            self._seen.popitem(last=False)
        return True

    def is_story_candidate(self, message: discord.Message) -> bool:
        """A human's ordinary message in a server channel (never a bot, a webhook or ourselves)."""
        if message.webhook_id is not None or message.author.bot or message.guild is None:
            return False
        if self.bot.user is not None and message.author.id == self.bot.user.id:
            return False
        return message.type in _ANSWERED_TYPES and not message.content.lstrip().startswith(OOC_PREFIXES)

    async def addressed(self, message: discord.Message, prefs: GuildPrefs, story: Story) -> bool:
        """Whether the channel's reply mode says this message wants an answer."""
        if prefs.reply_mode == ReplyMode.EVERY:
            return True
        if self.bot.user is not None and self.bot.user in message.mentions:
            return True
        if prefs.reply_mode == ReplyMode.MENTIONS:
            return bool(named_in(message.content, await self.pipeline.cast.members(story)))
        reference = message.reference.message_id if message.reference else None
        turn = await self.store.turn_by_message(reference) if reference else None
        return turn is not None and turn.author_kind == AuthorKind.PERSONA

    def cooldown(self, prefs: GuildPrefs) -> commands.CooldownMapping:
        """One message answered per user per `cooldown_s` seconds (in each channel)."""
        mapping = self._cooldowns.get(prefs.cooldown_s)
        if mapping is None:
            mapping = commands.CooldownMapping.from_cooldown(1, prefs.cooldown_s, commands.BucketType.member)
            self._cooldowns[prefs.cooldown_s] = mapping
        return mapping

    async def user_input(self, message: discord.Message) -> UserInput:
        """The message as pipeline input: text, author, and images/audio within the size limits."""
        parts, skipped = [], []
        for item in message.attachments:
            kind = attachment_kind(item)
            limit = MAX_AUDIO_BYTES if kind == "audio" else MAX_IMAGE_BYTES
            if kind == "other" or item.size > limit:
                skipped.append(item.filename)
                continue
            parts.append(InputAttachment(kind=kind, filename=item.filename, data=await item.read(),
                                         content_type=item.content_type or "", url=item.url))
        if skipped:
            await message.reply(f"-# Skipped {', '.join(skipped)}: only images (up to {MAX_IMAGE_BYTES >> 20} MiB) "
                                f"and audio (up to {MAX_AUDIO_BYTES >> 20} MiB) reach the story.",
                                allowed_mentions=NO_MENTIONS, mention_author=False)
        return UserInput(text=message.content, author_id=message.author.id,
                         author_name=message.author.display_name, message_id=message.id, attachments=parts)

    async def maybe_illustrate(self, channel: discord.abc.Messageable, prefs: GuildPrefs, turn_id: int) -> None:
        """Post scene art now and then, when the server turned it on and the scene changed."""
        if not prefs.scene_art:
            return
        count = self._since_art.get(channel.id, 0) + 1
        self._since_art[channel.id] = count
        if count < prefs.scene_art_every:
            return
        image = await self.pipeline.illustrate(channel.id, safe=not is_nsfw_channel(channel))
        if image is not None:
            await self.replies.post_image(channel, image, turn_id=turn_id)
            self._since_art[channel.id] = 0

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        data = payload.data
        if data.get("webhook_id") or data.get("author", {}).get("bot") or "content" not in data:
            return
        await self.pipeline.edit_user_turn(payload.message_id, data["content"])

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        # Only users' own messages: the bot deletes persona messages itself (rewinds,
        # shorter regenerations), and those deletions must not remove turns.
        turn = await self.store.turn_by_message(payload.message_id)
        if turn is not None and turn.author_kind == AuthorKind.USER:
            await self.pipeline.delete_by_message(payload.message_id)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Chat(bot))
