"""The story pipeline: one turn from user input to a stored, shown persona reply.

Used by both the Discord cogs and the console, with the same store and engine
client. Numbered steps in `reply`: 1 store the user turn (never lost),
2 turn media into content parts, 3 build the prompt, 4 stream the reply into
the sink, 5 store the persona turn, 6 record the transcripts and captions the
engine returned. A per-story lock answers two messages at once in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from bot.cards import Card, expand
from bot.cast import Cast, persona_card
from bot.engine_client import (
    EngineBadResponse,
    EngineClient,
    EngineContextLength,
    EngineError,
    EngineFeatureOff,
    StreamEvent,
)
from bot.errors import NoStory, StoryError, UnknownPersona, UnknownTurn
from bot.media import annotate, attachment_meta, media_parts, transcribe_audio
from bot.memory import StoryMemory
from bot.metrics import BotMetrics, TurnRecord
from bot.prefs import GuildPrefs, guild_prefs
from bot.prompt_fit import Fitted, PromptFitter
from bot.scene_art import SceneArtService, SceneImage
from bot.settings import BotSettings
from bot.store import AuthorKind, NewTurn, Persona, Store, Story, Turn
from bot.story import PromptParts, continue_instruction, estimate_tokens, format_transcript
from bot.story.cast import group_nudge, present_from, scene_members
from bot.story.generation import Samplers, card_samplers, reply_tokens, resolve
from bot.story.prompt import stop_sequences
from bot.story.shaping import PartialShaper, may_become_name_prefix, shape_reply

log = logging.getLogger(__name__)
__all__ = ["NoStory", "StoryError", "StoryPipeline", "UnknownPersona", "UnknownTurn", "UserInput"]

DEFAULT_USER_NAME = "User"
HISTORY_TURNS = 200  # most turns read from SQL per prompt; the token budget then trims them
FIRST_PAGE_TURNS = 32  # read first: usually enough to fill the budget, and far cheaper than 200
NO_REPLY_TRIES = 3  # samples asked for before an empty or out-of-character reply is an error
HISTORY_SLACK = 1.3  # turns vary in length: read this many more than the first page's average says fit


class NoReplyInCharacter(EngineBadResponse):
    """The model's reply shaped to nothing: only a name, or straight into another speaker's lines."""

    kind = "no_reply"


@dataclass
class InputAttachment:
    """What a user sent with a turn."""

    kind: Literal["image", "audio", "other"]
    filename: str
    content_type: str
    data: bytes
    url: str = ""


@dataclass
class UserInput:
    text: str
    author_id: int
    author_name: str  # display name, used for {{user}}
    message_id: int | None = None
    attachments: list[InputAttachment] = field(default_factory=list)
    received_at: float = field(default_factory=time.perf_counter)  # when it came: the reply latency's start


class ReplySink(Protocol):
    """How a reply is shown: Discord webhook streamer, console printer, test collector."""

    async def update(self, text_so_far: str) -> None: ...  # called as tokens arrive (the sink rate-limits)

    async def finish(self, text: str) -> list[int]: ...  # the final text; returns the message ids showing it


@dataclass
class ReplyResult:
    user_turn: Turn | None
    persona_turn: Turn
    heard: list[str]  # transcripts of the user's audio (shown as a quote line)
    seen: list[str]  # captions of the user's images


@dataclass
class PreparedPrompt:
    """A fitted prompt and what it was built from."""

    story: Story
    turns: list[Turn]
    fitted: Fitted
    query: asyncio.Task | None  # the recall query, still running or done
    cast: list[str] = field(default_factory=list)  # the other personas in the scene, by name


@dataclass
class StoryStatusInfo:
    story: Story
    persona_name: str
    turns: int
    last_activity: datetime | None
    scene_images: int


class StoryPipeline:
    """Story operations shared by every front end."""

    def __init__(self, store: Store, engine: EngineClient, settings: BotSettings, metrics: BotMetrics | None = None):
        self.store, self.engine, self.settings = store, engine, settings
        self.metrics = metrics or BotMetrics()  # one per bot (bot/metrics.py): turns, latency, engine calls
        engine.observer = self.metrics
        self.art = SceneArtService(store, engine, settings)
        self.cast = Cast(store)
        self.fitter = PromptFitter(engine, settings)
        self._replying = 0  # replies being made now: background memory work waits for none
        self.memory = StoryMemory(store, engine, settings, self.fitter, busy=lambda: self._replying > 0)
        # Replies take their channel's lock before any await, so they run in arrival order (asyncio
        # locks are FIFO); every story change then takes the story's lock (buttons know only the turn).
        self._channel_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._story_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    def channel_lock(self, channel_id: int) -> asyncio.Lock:
        """The lock replies in a channel take (anything that replaces the channel's story takes it too)."""
        return self._lock(self._channel_locks, channel_id)

    @contextlib.asynccontextmanager
    async def _making_reply(self, story_id: int) -> AsyncIterator[None]:
        """The story's lock, held while a reply is made and stored; background memory work waits for
        no reply in the making (so it also sees the reply once stored)."""
        async with self._lock(self._story_locks, story_id):
            self._replying += 1
            self.memory.worker.interrupt()
            try:
                yield
            finally:
                self._replying -= 1

    @staticmethod
    def _lock(table: weakref.WeakValueDictionary[int, asyncio.Lock], key: int) -> asyncio.Lock:
        lock = table.get(key)
        if lock is None:
            lock = asyncio.Lock()
            table[key] = lock
        return lock

    async def close(self) -> None:
        """Stop the background memory work (what it had not done yet is done after the next start)."""
        await self.memory.close()

    # ------------------------------------------------------------ starting and ending

    async def start_story(self, channel_id: int, guild_id: int, persona_name: str,
                          user_name: str = "") -> tuple[Story, Persona, list[str]]:
        """Bind the persona to the channel and start a story; returns its greetings (macros expanded).

        The first greeting is stored as the first persona turn, the alternates as its swipes.
        """
        persona = await self.store.get_persona(guild_id, persona_name)
        if persona is None:
            raise UnknownPersona(persona_name)
        await self.store.bind_personas(channel_id, guild_id, [persona.id])
        story = await self.store.start_story(channel_id, guild_id, persona.id, title=persona.name)
        greetings = await self._store_greetings(story, persona, user_name)
        return story, persona, greetings

    async def _store_greetings(self, story: Story, persona: Persona, user_name: str) -> list[str]:
        card = persona_card(persona)
        user = user_name or DEFAULT_USER_NAME
        greetings = [expand(g, char=card.display_name, user=user, seed=story.id) for g in card.greetings()]
        if greetings:
            await self.store.add_turn(story.id, NewTurn(
                AuthorKind.PERSONA, greetings[0], author_name=card.display_name, persona_id=persona.id,
                swipes=greetings, token_count=estimate_tokens(greetings[0])))
        return greetings

    async def show_greeting(self, story: Story, sink: ReplySink) -> Turn | None:
        """Show the story's greeting turn through `sink` and record the messages that show it."""
        turns = await self.store.recent_turns(story.id, 1)
        if not turns or turns[0].author_kind != AuthorKind.PERSONA:
            return None
        return await self.show_turn(turns[0], sink, story)

    async def show_turn(self, turn: Turn, sink: ReplySink, story: Story | None = None) -> Turn:
        """Show a stored persona turn (a greeting) through `sink` and record the messages that show it."""
        with self.metrics.turn("greeting") as record:
            record.about(story=turn.story_id, turn=turn.id, persona=turn.persona_id,
                         guild=story.guild_id if story else None, channel=story.channel_id if story else None)
            ids = await sink.finish(turn.text)
            if ids:
                await self.store.set_turn_messages(turn.id, ids)
        return turn

    async def end(self, channel_id: int) -> Story | None:
        """Archive the channel's story (it stays in the database for export)."""
        return await self.store.end_story(channel_id)

    async def reset(self, channel_id: int) -> tuple[Story, list[str]]:
        """Start the channel's story over with the same persona; returns the new story and greetings."""
        story = await self.story_of(channel_id)
        persona = await self.persona_of_story(story)
        new = await self.store.start_story(channel_id, story.guild_id, persona.id, title=persona.name)
        user_name = await self._last_user_name(story.id)
        return new, await self._store_greetings(new, persona, user_name)

    # ------------------------------------------------------------ replying

    async def reply(self, channel_id: int, guild_id: int, user: UserInput, sink: ReplySink, *,
                    max_tokens: int | None = None, instruction: str = "", kind: str = "reply") -> ReplyResult:
        """Answer a user's turn as the story's lead persona (the console, a voice call): store the turn,
        then `respond`. Discord text goes through its scene queue instead (bot/discord_io/scene_queue.py),
        which chooses the speaker of a cast and answers several people's messages together.

        `max_tokens` caps the reply below the usual setting and `instruction` adds a line to the
        prompt (a voice channel asks for short spoken replies); `kind` is how the turn is counted (voice).
        """
        async with self._lock(self._channel_locks, channel_id):
            story = await self.story_of(channel_id)
            persona = await self.persona_of_story(story)
            turn = await self.add_user_turn(story, user)
            return await self.respond(story, persona, [(turn, user)], sink, max_tokens=max_tokens,
                                      instruction=instruction, kind=kind)

    async def add_user_turn(self, story: Story, user: UserInput) -> Turn:
        """Keep a person's message as a story turn (whether or not it is answered)."""
        return await self.store.add_turn(story.id, NewTurn(
            AuthorKind.USER, user.text, author_id=user.author_id, author_name=user.author_name,
            attachments=attachment_meta(user.attachments), token_count=estimate_tokens(user.text),
            message_ids=[user.message_id] if user.message_id else []))

    async def respond(self, story: Story, persona: Persona, inputs: Sequence[tuple[Turn, UserInput]],
                      sink: ReplySink, *, max_tokens: int | None = None, instruction: str = "",
                      kind: str | None = None) -> ReplyResult:
        """`persona`'s next turn, answering `inputs` (the people's stored turns since the last answer, with
        their media; none when a persona answers another). The caller holds the channel's lock.

        Timed from the newest message's arrival and counted as `kind` (default: reply, or next without inputs).
        """
        last = inputs[-1] if inputs else None
        with self.metrics.turn(kind or ("reply" if inputs else "next"), last[1].received_at if last else None) as rec:
            rec.about(guild=story.guild_id, channel=story.channel_id, story=story.id, persona=persona.id,
                      user=last[1].author_id if last else None)
            result = await self._respond(story, persona, inputs, rec.watch(sink), max_tokens, instruction, rec)
            rec.about(turn=result.persona_turn.id)
            return result

    async def _respond(self, story: Story, persona: Persona, inputs: Sequence[tuple[Turn, UserInput]],
                       sink: ReplySink, max_tokens: int | None, instruction: str, record: TurnRecord) -> ReplyResult:
        last = inputs[-1] if inputs else None
        async with self._making_reply(story.id):
            # What came while an earlier reply was written is answered after it, and people's messages that
            # came after these wait for the next answer: the prompt ends with what this reply answers.
            await self.store.answer_after(story.id, [turn for turn, _ in inputs])
            before = max(turn.position for turn, _ in inputs) + 1 if inputs else None
            try:
                parts, heard = await self._media_for(inputs)
                user_name = last[1].author_name if last else await self._last_user_name(story.id)
                text, extras = await self._generate(story.id, persona, user_name, parts, sink, before=before,
                                                    instruction=instruction, query_turn=last[0] if last else None,
                                                    max_tokens=max_tokens, record=record)
            except EngineError as exc:
                exc.turn_id = last[0].id if last else None  # the turn is kept; a retry regenerates from it
                raise
            persona_turn = await self._store_reply(story.id, persona, text, sink)
            heard, seen = await self._record_media(last[0], extras, heard) if last else ([], [])
        return ReplyResult(last[0] if last else None, persona_turn, heard, seen)

    async def _media_for(self, inputs: Sequence[tuple[Turn, UserInput]]) -> tuple[list[dict], list[str]]:
        """Content parts of the newest message; earlier ones (answered together with it) have their audio
        transcribed into their turns, since only the newest turn carries parts."""
        for turn, user in inputs[:-1]:
            heard = await transcribe_audio(self.engine, user.attachments)
            if any(heard):
                turn.attachments = annotate(turn.attachments, heard, [])
                await self.store.edit_turn(turn.id, turn.text, attachments=turn.attachments)
        if not inputs:
            return [], []
        turn, user = inputs[-1]
        return await self._media_in(turn, user.attachments)

    async def _media_in(self, turn: Turn, attachments: Sequence[InputAttachment]) -> tuple[list[dict], list[str]]:
        """Content parts for the engine; audio is transcribed first when the engine cannot hear (vLLM, OpenAI)."""
        native_audio = self.engine.speaks_masque()
        heard = [] if native_audio else await transcribe_audio(self.engine, attachments)
        if any(heard):
            turn.attachments = annotate(turn.attachments, heard, [])
            await self.store.edit_turn(turn.id, turn.text, attachments=turn.attachments)
        return media_parts(attachments, with_audio=native_audio), heard

    async def _generate(self, story_id: int, persona: Persona, user_name: str, media: list[dict],
                        sink: ReplySink, before: int | None = None, instruction: str = "",
                        prefix: str = "", query_turn: Turn | None = None,
                        max_tokens: int | None = None, record: TurnRecord | None = None) -> tuple[str, dict]:
        """Build the prompt from the stored turns (those before position `before`) and memory, and stream a reply.

        A length refusal shrinks the prompt and retries once; then memory work goes to the worker. `record`
        (the turn's log line) learns the story and the token counts.
        """
        ready = await self.prepare_prompt(story_id, persona, user_name, media, before, instruction, query_turn)
        fitted, card = ready.fitted, persona_card(persona)
        if record is not None:
            record.about(guild=ready.story.guild_id, channel=ready.story.channel_id, story=ready.story.id,
                         persona=persona.id)
        prefs = await guild_prefs(self.store, ready.story.guild_id)
        samplers = self.samplers(prefs, card)
        cap = min(fitted.max_tokens, max_tokens or fitted.max_tokens, self.reply_tokens(prefs, card))
        try:
            result = await self._stream_in_character(fitted.prompt.messages, card, ready.turns, user_name, sink,
                                                     prefix, cap, samplers, ready.cast)
        except EngineContextLength as exc:
            # The server counts differently from what it told us (or not at all): shrink and retry once.
            log.warning("the engine refused a prompt as too long (it counted %s tokens); retrying shorter",
                        exc.prompt_tokens or "?")
            fitted = await self.fitter.refit(fitted, exc.prompt_tokens)
            result = await self._stream_in_character(fitted.prompt.messages, card, ready.turns, user_name, sink,
                                                     prefix, min(fitted.max_tokens, cap), samplers, ready.cast)
        if record is not None:
            record.generated(tokens_in=fitted.exact or fitted.prompt.tokens, engine=self.engine.models.chat,
                             tokens_out=estimate_tokens(result[0]) - estimate_tokens(prefix), extras=result[1])
        await self.memory.after_prompt(ready.story, fitted.prompt, ready.turns, ready.query, query_turn)
        return result

    async def prepare_prompt(self, story_id: int, persona: Persona, user_name: str, media: list[dict] = (),
                             before: int | None = None, instruction: str = "",
                             query_turn: Turn | None = None) -> PreparedPrompt:
        """The prompt of the story's next reply. Steps: 1 read the story, its recent turns and memory
        (the recall query runs beside); 2 fit the prompt to the server's window; 3 recall older turns
        from before that window and fit again."""
        reads = await self.store.prompt_reads(story_id, FIRST_PAGE_TURNS, before)
        if reads is None:
            raise NoStory()
        story = reads.story
        query = self.memory.start_query(story, query_turn)
        turns = await self._older_turns(story_id, reads.turns)
        memory, books = self.memory.layers(story, reads.facts, reads.books, reads.summary)
        card, members = persona_card(persona), await self.cast.members(story)
        scene = ""
        if len(members) > 1:  # a group scene: the speaker's view of it (bot/story/cast.py)
            turns = turns[present_from(turns, persona.id, card.display_name):]
            scene = scene_members(members, persona.id)
            others = [m.name for m in members if m.persona_id != persona.id]
            instruction = "\n\n".join(p for p in [instruction, group_nudge(card.display_name, [
                *_people(turns, user_name), *others])] if p)
        parts = PromptParts(card=card, user_name=user_name or DEFAULT_USER_NAME, turns=turns,
                            media=list(media), seed=story_id, instruction=instruction, memory=memory, books=books,
                            turn_number=story.turn_seq, scene=scene)
        fitted = await self.fitter.fit(parts)
        if query is not None and fitted.prompt.window_start < len(turns):
            recalled = await self.memory.recalled(story_id, query, turns[fitted.prompt.window_start].position)
            if recalled:
                fitted = await self.fitter.fit(replace(parts, memory=replace(memory, recalled=recalled)), base=fitted)
        return PreparedPrompt(story, turns, fitted, query, [m.name for m in members if m.persona_id != persona.id])

    async def _older_turns(self, story_id: int, turns: list[Turn]) -> list[Turn]:
        """`turns` (the first page of the prompt's history) and the older turns the window may still hold,
        sized by the first page: most prompts read only the first page."""
        if len(turns) < FIRST_PAGE_TURNS:
            return turns
        window = await self.fitter.window()
        per_turn = max(sum(self.fitter.counter.message(t.text) for t in turns) / len(turns), 1.0)
        wanted = min(HISTORY_TURNS, math.ceil(window / per_turn * HISTORY_SLACK))
        if wanted > len(turns):
            older, _ = await self.store.prompt_history(story_id, wanted - len(turns), turns[0].position)
            turns = older + turns
        return turns

    def samplers(self, prefs: GuildPrefs, card: Card) -> Samplers:
        """The samplers of a reply: the preset, the server's values, the card's (bot/story/generation.py);
        MASQUE_TEMPERATURE, when set, over the presets' temperature."""
        base = resolve(self.settings.sampler_preset, prefs.sampler_layers())
        if self.settings.temperature is not None and prefs.samplers.temperature is None:
            base = Samplers(temperature=self.settings.temperature).over(base)
        return card_samplers(card.data.masque).over(base)

    def reply_tokens(self, prefs: GuildPrefs, card: Card) -> int:
        """The reply's token limit: the server's setting (else the bot's), lowered to the length the card
        itself asks for in its instructions."""
        setting = prefs.reply_tokens or self.settings.reply_max_tokens
        return reply_tokens(setting, card.data.post_history_instructions, card.data.system_prompt)

    async def _stream_in_character(self, *args: Any) -> tuple[str, dict]:
        """`_stream`, asked again when the model wrote nothing in character (only a name, or straight
        into someone else's lines): a new sample usually does better, and the user never sees the miss."""
        for attempt in range(1, NO_REPLY_TRIES + 1):
            try:
                return await self._stream(*args)
            except NoReplyInCharacter:
                if attempt == NO_REPLY_TRIES:
                    raise
                log.info("the model wrote nothing in character; asking again (%d/%d)", attempt + 1, NO_REPLY_TRIES)
        raise AssertionError("unreachable")

    async def _stream(self, messages: list[dict], card: Card, turns: Sequence[Turn], user_name: str,
                      sink: ReplySink, prefix: str, max_tokens: int, samplers: Samplers,
                      cast: Sequence[str] = ()) -> tuple[str, dict]:
        """Stream a reply into `sink`, shaped as it goes (bot/story/shaping.py): the stream stops where the
        model starts writing for someone else, and the end is trimmed to a whole sentence."""
        text, extras = "", {}
        char = card.display_name
        others = list(dict.fromkeys([*_other_names(turns, user_name, char), *cast]))
        stream = self.engine.chat_stream(messages, max_tokens=max_tokens, stop=stop_sequences(turns, user_name, cast),
                                         **samplers.request_params())
        shape_partial = PartialShaper(char, others)
        async with contextlib.aclosing(stream):
            async for event in stream:
                extras = _merge_extras(extras, event)
                if not event.text:
                    continue
                text += event.text
                if may_become_name_prefix(text, char):
                    continue  # do not flash "Wren" before the header is dropped
                shown, ran_over = shape_partial(text)
                if ran_over:  # the model is writing someone else's turn: stop it there
                    break
                await sink.update(_joined(prefix, shown))
        reply = shape_reply(text, char, others, trim=self.settings.trim_incomplete)
        if not reply:
            raise NoReplyInCharacter("the engine returned no reply in character")
        return _joined(prefix, reply), extras

    async def _store_reply(self, story_id: int, persona: Persona, text: str, sink: ReplySink) -> Turn:
        # Shown first, then stored with the ids of the messages that show it (one write): the
        # story keeps what people saw, and no database write delays the reply. If showing fails,
        # the user turn is still there and a retry answers it.
        ids = await sink.finish(text)
        return await self.store.add_turn(story_id, NewTurn(
            AuthorKind.PERSONA, text, author_name=persona_card(persona).display_name,
            persona_id=persona.id, token_count=estimate_tokens(text), message_ids=ids))

    async def _record_media(self, turn: Turn, extras: dict, heard: list[str]) -> tuple[list[str], list[str]]:
        """Keep what the engine heard and saw on the user turn (shown to users, used in later prompts)."""
        heard = heard or [str(t.get("text", "")) for t in extras.get("transcripts", []) if isinstance(t, dict)]
        seen = [str(c.get("text", c) if isinstance(c, dict) else c) for c in extras.get("captions", [])]
        if any(heard + seen) and turn.attachments:
            meta = annotate(turn.attachments, heard, seen)  # by position: one per audio/image item
            await self.store.edit_turn(turn.id, turn.text, attachments=meta)
        return [h.strip() for h in heard if h.strip()], [c.strip() for c in seen if c.strip()]

    # ------------------------------------------------------------ swipes and continue

    async def regenerate(self, turn_id: int, sink: ReplySink) -> Turn:
        """A new swipe for a persona turn, selected. On a user turn whose reply failed, answer it anew."""
        with self.metrics.turn("regenerate") as record:
            turn = await self._turn(turn_id)
            persona = await self.persona_of_turn(turn)
            record.about(story=turn.story_id, turn=turn.id, persona=persona.id)
            sink = record.watch(sink)
            async with self._making_reply(turn.story_id):
                user_name = await self._last_user_name(turn.story_id)
                if turn.author_kind == AuthorKind.USER:
                    text, _ = await self._generate(turn.story_id, persona, user_name, [], sink,
                                                   before=turn.position + 1, record=record)
                    made = await self._store_reply(turn.story_id, persona, text, sink)
                    record.about(user=turn.author_id, turn=made.id)
                    return made
                text, _ = await self._generate(turn.story_id, persona, user_name, [], sink, before=turn.position,
                                               record=record)
                await self.store.add_swipe(turn.id, text, estimate_tokens(text))
                return await self._show(turn.id, text, sink)

    async def continue_turn(self, turn_id: int, sink: ReplySink) -> Turn:
        """Extend a persona turn where it stopped (the continuation is appended to the selected swipe)."""
        with self.metrics.turn("continue") as record:
            turn = await self._turn(turn_id)
            persona = await self.persona_of_turn(turn)
            record.about(story=turn.story_id, turn=turn.id, persona=persona.id)
            sink = record.watch(sink)
            async with self._making_reply(turn.story_id):
                user_name = await self._last_user_name(turn.story_id)
                text, _ = await self._generate(turn.story_id, persona, user_name, [], sink,
                                               before=turn.position + 1, instruction=continue_instruction(),
                                               prefix=turn.text, record=record)
                await self.store.edit_turn(turn.id, text, token_count=estimate_tokens(text))
                return await self._show(turn.id, text, sink)

    async def swipe(self, turn_id: int, delta: int) -> Turn:
        """Show the previous (-1) or next (+1) swipe; the one shown is the one the story keeps."""
        turn = await self._turn(turn_id)
        return await self.store.select_swipe(turn.id, turn.selected_swipe + delta)

    async def _show(self, turn_id: int, text: str, sink: ReplySink) -> Turn:
        ids = await sink.finish(text)
        if ids:
            await self.store.set_turn_messages(turn_id, ids)
        turn = await self.store.get_turn(turn_id)
        assert turn is not None
        return turn

    # ------------------------------------------------------------ art

    async def illustrate(self, channel_id: int, force: bool = False, safe: bool = True,
                         fresh: bool = False) -> SceneImage | None:
        """Scene art for the current scene: None when nothing changed since the last image (unless `force`).

        `fresh` skips reusing an earlier image (regenerate redoes text and image together).
        """
        story = await self.story_of(channel_id)
        persona = await self.persona_of_story(story)
        await self._check_images()
        turns = await self.store.recent_turns(story.id, HISTORY_TURNS)
        cast = [persona_card(p) for p in await self.cast.personas(story) if p.id != persona.id]
        return await self.art.illustrate(story, persona_card(persona), turns, force=force, safe=safe, fresh=fresh,
                                         cast=cast)

    async def imagine(self, channel_id: int, guild_id: int, prompt: str, safe: bool = True) -> SceneImage:
        """One-off art from `prompt`, in the style of the channel's persona when there is one."""
        if not prompt.strip():
            raise StoryError("Describe what to draw, for example: /imagine prompt: a lighthouse in a storm.")
        await self._check_images()
        ids = await self.store.channel_persona_ids(channel_id)
        persona = await self.store.get_persona_by_id(ids[0]) if ids else None
        return await self.art.imagine(prompt, persona_card(persona) if persona else None, safe=safe)

    async def _check_images(self) -> None:
        """EngineFeatureOff, saying which setting turns art on, when the engine has no image model (before
        a scene prompt is written for nothing)."""
        if await self.engine.makes_images() is False:
            raise EngineFeatureOff("images: the engine serves no image model", "images")

    # ------------------------------------------------------------ history

    async def rewind(self, channel_id: int, turns: int) -> list[Turn]:
        """Remove the story's last `turns` turns; returns them (so their messages can be deleted)."""
        async with self._lock(self._channel_locks, channel_id):
            story = await self.story_of(channel_id)
            async with self._lock(self._story_locks, story.id):
                return await self.store.rewind(story.id, turns)

    async def transcript(self, channel_id: int) -> str:
        """The whole story as plain text, for /story export."""
        story = await self.story_of(channel_id)
        turns = await self.store.recent_turns(story.id)
        return format_transcript(story, turns)

    async def status(self, channel_id: int) -> StoryStatusInfo:
        story = await self.story_of(channel_id)
        persona = await self.persona_of_story(story)
        recent = await self.store.recent_turns(story.id, 1)
        return StoryStatusInfo(
            story=story, persona_name=persona.name, turns=await self.store.count_turns(story.id),
            last_activity=_aware(recent[0].updated_at if recent else story.created_at),
            scene_images=await self.store.count_scene_art(story.id))

    async def edit_user_turn(self, message_id: int, text: str) -> Turn | None:
        """A user edited their message: the turn follows. None when the message is not a user turn."""
        turn = await self.store.turn_by_message(message_id)
        if turn is None or turn.author_kind != AuthorKind.USER:
            return None
        return await self.store.edit_turn(turn.id, text, token_count=estimate_tokens(text))

    async def delete_by_message(self, message_id: int) -> bool:
        """A message was deleted: remove the turn it showed. True when one was removed."""
        turn = await self.store.turn_by_message(message_id)
        return bool(turn) and await self.store.delete_turn(turn.id)

    # ------------------------------------------------------------ lookups

    async def story_of(self, channel_id: int) -> Story:
        """The channel's active story, or NoStory."""
        story = await self.store.active_story(channel_id)
        if story is None:
            raise NoStory()
        return story

    async def persona_of_story(self, story: Story) -> Persona:
        """The persona that plays `story`, or a StoryError when it was deleted."""
        persona = await self.store.get_persona_by_id(story.persona_id) if story.persona_id else None
        if persona is None:
            raise StoryError("This story's persona was deleted. Start a new story with /story start.")
        return persona

    async def _turn(self, turn_id: int) -> Turn:
        turn = await self.store.get_turn(turn_id)
        if turn is None:
            raise UnknownTurn()
        return turn

    async def persona_of_turn(self, turn: Turn) -> Persona:
        """The persona that speaks in `turn`'s story (the turn's own, else the story's latest persona turn)."""
        persona_id = turn.persona_id
        if persona_id is None:
            turns = await self.store.recent_turns(turn.story_id, HISTORY_TURNS)
            persona_id = next((t.persona_id for t in reversed(turns) if t.persona_id is not None), None)
        persona = await self.store.get_persona_by_id(persona_id) if persona_id is not None else None
        if persona is None:
            raise StoryError("This story's persona was deleted. Start a new story with /story start.")
        return persona

    async def _last_user_name(self, story_id: int) -> str:
        for turn in reversed(await self.store.recent_turns(story_id, HISTORY_TURNS)):
            if turn.author_kind == AuthorKind.USER and turn.author_name:
                return turn.author_name
        return DEFAULT_USER_NAME


def _people(turns: Sequence[Turn], user_name: str) -> list[str]:
    """The people in the story's recent turns, the one speaking now first."""
    names = [user_name, *(t.author_name for t in reversed(turns) if t.author_kind == AuthorKind.USER)]
    return [n for n in dict.fromkeys(names) if n]


def _other_names(turns: Sequence[Turn], user_name: str, char: str) -> list[str]:
    """Everyone in the story but `char`: the persona must not write their lines."""
    names = [user_name, *(t.author_name for t in turns if t.author_name)]
    return [n for n in dict.fromkeys(names) if n and n != char]


def _merge_extras(extras: dict, event: StreamEvent) -> dict:
    return {**extras, **event.extras} if event.extras else extras


def _joined(prefix: str, text: str) -> str:
    if not prefix:
        return text
    separator = "" if prefix.endswith((" ", "\n")) or text.startswith((" ", "\n", ",", ".")) else " "
    return f"{prefix}{separator}{text}"


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they are UTC (the store writes UTC).
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment
