"""Show the story in Discord: persona replies, greetings, swipes, scene art, and what the buttons do.

The glue between `StoryPipeline` (what happens to the story) and Discord (how
it looks): every persona message goes through the channel webhook with the
persona's name and avatar, streamed by `WebhookReplySink`, with the reply
buttons under its last message.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Sequence

import discord

from bot.discord_io.streaming import WebhookReplySink
from bot.discord_io.views import Action, reply_view, retry_view
from bot.discord_io.webhooks import NO_MENTIONS, PersonaIdentity, WebhookChannel, WebhookPoster
from bot.engine_client import EngineError
from bot.pipeline import StoryError, StoryPipeline, UserInput, persona_card
from bot.prefs import VoiceReplies, channel_prefs
from bot.scene_art import SceneImage
from bot.store import AuthorKind, Persona, Story, Turn
from bot.voice.audio import AudioError
from bot.voice.notes import make_voice_note, post_voice_note
from bot.voice.playback import speakable

log = logging.getLogger(__name__)

HEARD_QUOTE_CHARS = 300  # the "what was heard" line is a short quote, not the whole transcript
ART_FILENAME = "scene.png"
TYPING_DELAY_S = 1.0  # "typing..." only for replies that show nothing this long (keep_typing)
SPOKEN_CHARS_PER_S = 14  # about how fast text-to-speech reads; caps the text before it is synthesised


def voice_note_text(text: str, max_s: float) -> str:
    """What a voice message says: the reply without stage directions, cut at a sentence within `max_s`."""
    spoken = speakable(text)
    limit = int(max_s * SPOKEN_CHARS_PER_S)
    if len(spoken) <= limit:
        return spoken
    head = spoken[:limit]
    cut = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    return head[: cut + 1] if cut > 0 else head.rsplit(" ", 1)[0] + "…"


def identity_of(persona: Persona) -> PersonaIdentity:
    """How a stored persona appears: its display name (nickname or name) and avatar."""
    return PersonaIdentity(name=persona_card(persona).display_name, avatar=persona.avatar)


def heard_line(heard: Sequence[str]) -> str:
    """A one-line quote of what the engine heard in the user's audio (empty when nothing)."""
    text = " ".join(" ".join(h.split()) for h in heard if h.strip())
    if not text:
        return ""
    if len(text) > HEARD_QUOTE_CHARS:
        text = text[: HEARD_QUOTE_CHARS - 1].rsplit(" ", 1)[0] + "…"
    return f"-# 🎙️ heard: “{discord.utils.escape_markdown(text)}”"


class ReplyService:
    """Everything that posts persona messages, used by the chat listener, the story cog and the buttons."""

    def __init__(self, pipeline: StoryPipeline, poster: WebhookPoster):
        self.pipeline, self.poster, self.store = pipeline, poster, pipeline.store
        # persona turn id -> the scene-art message posted for it, so regenerate can redo both.
        # Kept in memory: after a restart, regenerate redoes the text only.
        self._art_messages: dict[int, int] = {}

    # ------------------------------------------------------------ replies

    async def answer(self, message: discord.Message, persona: Persona,
                     inputs: Sequence[tuple[Turn, UserInput]]) -> Turn | None:
        """Answer people's stored messages (`message`: the newest) as `persona`; on engine failure say so,
        keep the turns, offer retry. The caller holds the channel's lock."""
        channel = message.channel
        story = await self.pipeline.story_of(channel.id)
        sink = WebhookReplySink(self.poster, channel, identity_of(persona))
        typing = asyncio.create_task(keep_typing(channel, sink))  # not awaited: the engine starts at once
        try:
            result = await self.pipeline.respond(story, persona, inputs, sink)
        except EngineError as exc:
            await sink.discard()
            view = retry_view(exc.turn_id) if exc.turn_id else discord.utils.MISSING
            await message.reply(exc.user_message, view=view, allowed_mentions=NO_MENTIONS, mention_author=False)
            return None
        finally:
            typing.cancel()
        await self.seal(sink, result.persona_turn)
        if line := heard_line(result.heard):
            await message.reply(line, allowed_mentions=NO_MENTIONS, mention_author=False)
        if await self.wants_voice_note(channel.id, [user for _, user in inputs]):
            await self.send_voice_note(channel, persona, result.persona_turn.text, reply_to=message)
        return result.persona_turn

    async def speak(self, channel: WebhookChannel, persona: Persona) -> Turn:
        """A persona's turn with no new message from people (it answers another persona, or /story next).
        Engine failures are raised (the caller says so where it can)."""
        story = await self.pipeline.story_of(channel.id)
        sink = WebhookReplySink(self.poster, channel, identity_of(persona))
        typing = asyncio.create_task(keep_typing(channel, sink))
        try:
            result = await self.pipeline.respond(story, persona, [], sink)
        except EngineError:
            await sink.discard()
            raise
        finally:
            typing.cancel()
        await self.seal(sink, result.persona_turn)
        return result.persona_turn

    async def wants_voice_note(self, channel_id: int, users: Sequence[UserInput]) -> bool:
        """Whether this reply also comes as a voice message (the channel's `voice_replies` setting)."""
        mode = (await channel_prefs(self.store, channel_id)).voice_replies
        spoke = any(a.kind == "audio" for user in users for a in user.attachments)
        return mode == VoiceReplies.ALWAYS or (mode == VoiceReplies.SPOKEN and spoke)

    async def send_voice_note(self, channel: WebhookChannel, persona: Persona, text: str, *,
                              reply_to: discord.Message | None = None) -> None:
        """Speak `text` as the persona and post it as a Discord voice message; a failure is logged, not shown.

        `reply_to`: the message answered, when the bot has to post it itself (Discord refused the webhook).
        """
        max_s = self.pipeline.settings.voice_message_max_s
        spoken = voice_note_text(text, max_s)
        if not spoken:
            return
        try:
            audio = await self.pipeline.engine.speech(spoken, voice=persona.voice, response_format="wav")
            note = await asyncio.to_thread(make_voice_note, audio, max_seconds=max_s)
            await post_voice_note(self.poster, channel, identity_of(persona), note, reply_to=reply_to)
        except (EngineError, AudioError, discord.HTTPException) as exc:
            log.warning("no voice message for this reply in channel %s: %s", channel.id, exc)

    async def show_greeting(self, channel: WebhookChannel, story: Story, persona: Persona) -> Turn | None:
        """Post the story's greeting as the persona (alternate greetings are its swipes)."""
        sink = WebhookReplySink(self.poster, channel, identity_of(persona))
        turn = await self.pipeline.show_greeting(story, sink)
        if turn is not None:
            await self.seal(sink, turn)
        return turn

    async def show_turn(self, channel: WebhookChannel, persona: Persona, turn: Turn) -> Turn:
        """Post a stored persona turn (a joining persona's greeting) with its buttons."""
        sink = WebhookReplySink(self.poster, channel, identity_of(persona))
        shown = await self.pipeline.show_turn(turn, sink)
        await self.seal(sink, shown)
        return shown

    async def post_image(self, channel: WebhookChannel, image: SceneImage, caption: str = "",
                         turn_id: int | None = None) -> discord.Message:
        """Post scene art as the channel's persona (`turn_id`: the reply it illustrates)."""
        persona = await self.channel_persona(channel.id)
        file = discord.File(io.BytesIO(image.png), filename=ART_FILENAME, description=image.prompt[:1000])
        posted = await self.poster.send(channel, identity_of(persona), caption, files=[file])
        if turn_id is not None:
            self._art_messages[turn_id] = posted.id
        return posted

    async def delete_messages(self, channel: WebhookChannel, turns: Sequence[Turn]) -> None:
        """Remove the persona messages of turns taken out of the story (users' own messages stay)."""
        persona = await self.channel_persona(channel.id)
        for turn in turns:
            if turn.author_kind == AuthorKind.PERSONA:
                for shown in turn.messages:
                    await self.poster.delete(channel, identity_of(persona), shown.message_id)

    async def seal(self, sink: WebhookReplySink, turn: Turn) -> None:
        """Finish the reply's last message with its buttons, and record where the turn now shows."""
        await sink.seal(self.view_for(turn))
        if sink.message_ids != [m.message_id for m in turn.messages]:
            await self.store.set_turn_messages(turn.id, sink.message_ids)

    def view_for(self, turn: Turn) -> discord.ui.View:
        return reply_view(turn.id, swipe=turn.selected_swipe, swipes=max(len(turn.swipes), 1))

    async def channel_persona(self, channel_id: int) -> Persona:
        story = await self.store.active_story(channel_id)
        persona = await self.store.get_persona_by_id(story.persona_id) if story and story.persona_id else None
        if persona is None:
            raise StoryError("There is no story in this channel. Start one with /story start.")
        return persona

    # ------------------------------------------------------------ buttons

    async def may_press(self, interaction: discord.Interaction, turn_id: int) -> bool:
        """Participants of the turn's story (or moderators) may press; in a story nobody joined yet, anyone."""
        perms = interaction.permissions
        if perms.manage_messages or perms.manage_guild:
            return True
        turn = await self.store.get_turn(turn_id)
        if turn is None:
            return True  # the callback explains that the turn is gone
        turns = await self.store.recent_turns(turn.story_id, 200)
        people = {t.author_id for t in turns if t.author_kind == AuthorKind.USER and t.author_id}
        return not people or interaction.user.id in people

    async def on_button(self, interaction: discord.Interaction, action: Action, turn_id: int) -> None:
        """Regenerate, swipe, continue, illustrate or retry; failures become a short ephemeral note."""
        await interaction.response.defer()
        channel = interaction.channel
        try:
            if action == Action.ILLUSTRATE:
                await self._illustrate(channel, interaction, turn_id)
            else:
                await self._rewrite(channel, action, turn_id, interaction)
        except EngineError as exc:
            view = retry_view(exc.turn_id) if action == Action.RETRY and exc.turn_id else discord.utils.MISSING
            await interaction.followup.send(exc.user_message, ephemeral=True, view=view)
        except StoryError as exc:
            await interaction.followup.send(str(exc), ephemeral=True)

    async def _rewrite(self, channel: WebhookChannel, action: Action, turn_id: int,
                       interaction: discord.Interaction) -> None:
        turn = await self.store.get_turn(turn_id)
        story = await self.store.active_story(channel.id)
        if turn is None or story is None or turn.story_id != story.id:
            raise StoryError("That message is no longer part of the story.")
        persona = await self.pipeline.persona_of_turn(turn)
        existing = [] if action == Action.RETRY else [m.message_id for m in turn.messages]
        sink = WebhookReplySink(self.poster, channel, identity_of(persona), existing_ids=existing)
        if action == Action.RETRY:
            new = await self.pipeline.regenerate(turn_id, sink)
            if interaction.message is not None:
                await interaction.message.delete()  # the error note with the retry button
        elif action == Action.REGENERATE:
            new = await self.pipeline.regenerate(turn_id, sink)
        elif action == Action.CONTINUE:
            new = await self.pipeline.continue_turn(turn_id, sink)
        else:
            new = await self.pipeline.swipe(turn_id, -1 if action == Action.PREVIOUS else 1)
            await sink.finish(new.text)
        await self.seal(sink, new)
        if action == Action.REGENERATE:
            await self._repaint(channel, persona, new)

    async def _repaint(self, channel: WebhookChannel, persona: Persona, turn: Turn) -> None:
        """Regenerate redoes text and image together: a reply that had scene art gets a fresh picture."""
        old_art = self._art_messages.pop(turn.id, None)
        if old_art is None:
            return
        image = await self.pipeline.illustrate(channel.id, force=True, fresh=True, safe=not is_nsfw_channel(channel))
        if image is not None:
            await self.poster.delete(channel, identity_of(persona), old_art)
            await self.post_image(channel, image, turn_id=turn.id)

    async def _illustrate(self, channel: WebhookChannel, interaction: discord.Interaction, turn_id: int) -> None:
        image = await self.pipeline.illustrate(channel.id, force=True, safe=not is_nsfw_channel(channel))
        if image is not None:
            await self.post_image(channel, image, turn_id=turn_id)
        else:
            await interaction.followup.send("Nothing new to illustrate yet.", ephemeral=True)


async def keep_typing(channel: discord.abc.Messageable, sink: WebhookReplySink,
                      delay_s: float = TYPING_DELAY_S) -> None:
    """Show "typing..." until cancelled, from `delay_s` on if nothing of the reply shows by then. A reply
    that starts sooner needs no indicator, and would be outlasted by it: the persona's message comes
    from a webhook, not from the bot, so Discord keeps showing the bot typing for up to 10 s after it.
    A failed typing call only costs the indicator."""
    await asyncio.sleep(delay_s)
    if sink.message_ids:
        return
    with contextlib.suppress(discord.HTTPException):
        async with channel.typing():
            await asyncio.Event().wait()


def is_nsfw_channel(channel: discord.abc.Messageable | None) -> bool:
    """Age-restricted channels only may turn the image safety switch off."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False
