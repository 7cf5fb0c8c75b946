"""A voice session: the story of one text channel, played aloud in a voice channel.

Flow: the receiver (bot/voice/receiver.py) hands each speaker's decoded frames to
`TurnTaker` (bot/voice/turns.py); every 20 ms the session polls it, and each
finished utterance goes, in the order it ended, to one worker that makes it a user
turn of the story (the same `StoryPipeline.reply` as text) and speaks the reply
sentence by sentence (bot/voice/playback.py) while its text streams into the story
channel through the persona's webhook. The story channel shows what each speaker
said (a quote with their name), so the story reads, stores, exports and rewinds
like any other.

A speaker who talks over the persona for `voice_barge_in` stops its playback. The
session leaves by itself when no human is in the call for `voice_alone_leave_s`, or
nobody spoke for `voice_idle_leave_min`, or the voice connection is gone for good,
and says why in the story channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import discord

from bot.discord_io.replies import ReplyService, identity_of
from bot.discord_io.streaming import WebhookReplySink
from bot.discord_io.views import retry_view
from bot.discord_io.webhooks import NO_MENTIONS
from bot.engine_client import EngineError
from bot.pipeline import InputAttachment, StoryError, UserInput
from bot.prefs import GuildPrefs
from bot.settings import BotSettings
from bot.store import Persona
from bot.story import estimate_tokens
from bot.voice.audio import AudioError, decode_to_pcm, pcm_to_wav, resample_pcm
from bot.voice.client import ListeningVoiceClient
from bot.voice.playback import ReplySpeaker, SentenceSplitter
from bot.voice.turns import TurnTaker, Utterance

log = logging.getLogger(__name__)

POLL_S = 0.02  # how often utterance ends and barge-in are checked
WATCH_S = 1.0  # how often the session checks whether it should leave
RECONNECT_GRACE_S = 20.0  # discord.py reconnects by itself; after this long without a connection, leave
TRANSCRIPT_RATE = 16000  # what speech-to-text models want: 16 kHz mono
VOICE_INSTRUCTION = ("This scene is spoken aloud in a voice call: answer in one to three short spoken sentences, "
                     "as the character would say them, without stage directions.")
QUOTE_CHARS = 1500
UTTERANCE_FILENAME = "utterance.wav"


def quote_line(name: str, text: str | None) -> str:
    """How a speaker's words show in the story channel (None: still being heard)."""
    said = "…" if text is None else (f"“{discord.utils.escape_markdown(text[:QUOTE_CHARS])}”" if text
                                      else "*(inaudible)*")
    return f"🎙️ **{discord.utils.escape_markdown(name)}**: {said}"


@dataclass
class SessionStats:
    utterances: int = 0
    answered: int = 0
    barge_ins: int = 0
    failures: int = 0
    first_audio_delays: list[float] = field(default_factory=list)  # end of the silence window -> first packet


class _SpokenSink:
    """A `ReplySink` that shows the reply in the story channel and speaks each sentence as it completes."""

    def __init__(self, text: WebhookReplySink, speaker: ReplySpeaker):
        self.text, self.speaker, self._splitter = text, speaker, SentenceSplitter()

    async def update(self, text_so_far: str) -> None:
        for sentence in self._splitter.feed(text_so_far):  # speech first: the webhook edit can wait
            self.speaker.say(sentence)
        await self.text.update(text_so_far)

    async def finish(self, text: str) -> list[int]:
        for sentence in self._splitter.finish(text):
            self.speaker.say(sentence)
        self.speaker.finish()
        return await self.text.finish(text)


class VoiceSession:
    """One guild's voice session (see the module docstring)."""

    def __init__(self, voice_client: ListeningVoiceClient, story_channel: discord.abc.Messageable,
                 replies: ReplyService, settings: BotSettings, prefs: GuildPrefs, *,
                 on_end: Callable[[VoiceSession], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.vc, self.story_channel, self.replies = voice_client, story_channel, replies
        self.pipeline, self.engine = replies.pipeline, replies.pipeline.engine
        self.settings, self.prefs, self._on_end, self._clock = settings, prefs, on_end, clock
        self.turns = TurnTaker(silence_s=prefs.voice_silence_ms / 1000,
                               min_voiced_s=settings.voice_min_utterance_ms / 1000,
                               threshold_dbfs=settings.voice_vad_threshold_dbfs)
        self.stats = SessionStats()
        self._utterances: asyncio.Queue[Utterance] = asyncio.Queue()
        self._speaker: ReplySpeaker | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_activity = clock()
        self._alone_since: float | None = None
        self._disconnected_since: float | None = None
        self._names: dict[int, str] = {}
        self.ended = asyncio.Event()  # set once the call is wholly over (see stop)
        self._stopping = False
        self.end_reason = ""

    @property
    def guild(self) -> discord.Guild:
        return self.vc.guild

    @property
    def voice_channel(self) -> discord.abc.Connectable:
        return self.vc.channel

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.vc.on_user_disconnect = self.turns.forget
        self.vc.listen(self._on_frame)
        self._tasks = [asyncio.create_task(self._poll(), name="voice-poll"),
                       asyncio.create_task(self._work(), name="voice-turns"),
                       asyncio.create_task(self._watch(), name="voice-watch")]
        self.pipeline.metrics.voice_session(self.guild.id, True)

    async def stop(self, reason: str = "", *, say: bool = True) -> None:
        """Leave the call; `reason` is said in the story channel (once).

        In order: unregistered, tasks cancelled, the call hung up, `ended` set, then the notice; so
        whoever sees the notice or `ended` sees a session that is wholly over.
        """
        if self._stopping:
            return
        self._stopping = True
        self.end_reason = reason
        if self._on_end is not None:
            self._on_end(self)
        self.pipeline.metrics.voice_session(self.guild.id, False)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._speaker is not None:
            self._speaker.stop()
        with contextlib.suppress(Exception):
            self.vc.stop_listening()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.vc.disconnect(force=True), 10)
        self.ended.set()
        if say and reason:
            with contextlib.suppress(discord.HTTPException):
                await self.story_channel.send(f"-# 🔇 {reason}", allowed_mentions=NO_MENTIONS)

    def note_activity(self) -> None:
        self._last_activity = self._clock()

    # ------------------------------------------------------------ listening

    def _on_frame(self, user_id: int, pcm: bytes) -> None:
        """A decoded 20 ms frame of a speaker (on the event loop, from the receiver thread)."""
        if self._stopping:
            return
        member = self.guild.get_member(user_id)
        if member is not None and member.bot:
            return  # other bots (music bots) are not part of the story
        self.turns.push(user_id, pcm, self._clock())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            now = self._clock()
            for utterance in self.turns.poll(now):
                self.stats.utterances += 1
                self.note_activity()
                self._utterances.put_nowait(utterance)
            speaker = self._speaker
            if (self.prefs.voice_barge_in and speaker is not None and speaker.speaking
                    and self.turns.anyone_speaking_s() >= self.settings.voice_barge_in_ms / 1000):
                log.info("barge-in: a speaker talked over the persona in guild %s", self.guild.id)
                self.stats.barge_ins += 1
                speaker.stop()

    async def _work(self) -> None:
        """Answer utterances one by one, in the order they ended."""
        while True:
            utterance = await self._utterances.get()
            try:
                await self._answer(utterance)
            except Exception:  # noqa: BLE001 - one turn failing must not end the session
                self.stats.failures += 1
                log.exception("a voice turn failed in guild %s", self.guild.id)

    # ------------------------------------------------------------ one turn

    async def _answer(self, utterance: Utterance) -> None:
        started = time.perf_counter()  # the reply latency runs from here (transcription included)
        poll_end = utterance.ended_at + self.turns.silence_s  # when the silence window closed
        name = await self.display_name(utterance.user_id)
        try:
            wav = pcm_to_wav(resample_pcm(utterance.pcm, from_rate=48000, from_channels=2,
                                          to_rate=TRANSCRIPT_RATE, to_channels=1),
                             rate=TRANSCRIPT_RATE, channels=1)
        except AudioError as exc:
            log.warning("could not prepare an utterance of %s for transcription: %s", utterance.user_id, exc)
            return
        # The quote is posted while the words are transcribed; it shows them as soon as they are known.
        posting = asyncio.create_task(self.story_channel.send(quote_line(name, None), allowed_mentions=NO_MENTIONS))
        native, heard, showing = self.engine.speaks_masque(), "", None
        try:
            if not native:  # else the engine hears the audio itself and tells us what it heard
                heard = await self.engine.transcribe(wav, UTTERANCE_FILENAME, "audio/wav")
            quote = await posting
            user = UserInput(text=heard, author_id=utterance.user_id, author_name=name, message_id=quote.id,
                             received_at=started)
            if native:
                user.attachments = [InputAttachment("audio", UTTERANCE_FILENAME, "audio/wav", wav)]
            elif not heard:
                await quote.edit(content=quote_line(name, ""))
                return
            else:
                showing = asyncio.create_task(quote.edit(content=quote_line(name, heard)))
            persona = await self.replies.channel_persona(self.story_channel.id)
            result = await self._reply(user, persona, poll_end)
        except EngineError as exc:
            self.stats.failures += 1
            quote = await posting
            await quote.edit(content=quote_line(name, heard))
            view = retry_view(exc.turn_id) if exc.turn_id else discord.utils.MISSING
            await self.story_channel.send(f"-# {exc.user_message}", view=view, allowed_mentions=NO_MENTIONS)
            return
        except StoryError as exc:
            await (await posting).edit(content=quote_line(name, heard))
            await self.stop(str(exc))
            return
        if showing is not None:
            await showing
        if native:
            heard = " ".join(result.heard)
            await quote.edit(content=quote_line(name, heard))
            if heard and result.user_turn is not None:  # the words are the turn, as if typed or transcribed first
                await self.pipeline.store.edit_turn(result.user_turn.id, heard, estimate_tokens(heard), attachments=[])
        self.stats.answered += 1
        self.note_activity()

    async def _reply(self, user: UserInput, persona: Persona, poll_end: float):
        who = identity_of(persona)
        previous = self._speaker

        def first_audio() -> None:
            self.stats.first_audio_delays.append(self._clock() - poll_end)

        speaker = ReplySpeaker(self.vc, lambda text: self._synthesise(text, persona.voice), previous=previous,
                               on_first_audio=first_audio)
        self._speaker = speaker
        text_sink = WebhookReplySink(self.replies.poster, self.story_channel, who)
        sink = _SpokenSink(text_sink, speaker)
        try:
            result = await self.pipeline.reply(self.story_channel.id, self.guild.id, user, sink,
                                               max_tokens=self.settings.voice_reply_max_tokens,
                                               instruction=VOICE_INSTRUCTION, kind="voice")
        except BaseException:
            speaker.stop()
            await text_sink.discard()
            raise
        await self.replies.seal(text_sink, result.persona_turn)
        return result

    async def _synthesise(self, text: str, voice: str) -> bytes:
        audio = await self.engine.speech(text, voice=voice, response_format="wav")
        return await asyncio.to_thread(decode_to_pcm, audio, rate=48000, channels=2)

    async def display_name(self, user_id: int) -> str:
        if user_id not in self._names:
            member = self.guild.get_member(user_id)
            if member is None:
                with contextlib.suppress(discord.HTTPException):
                    member = await self.guild.fetch_member(user_id)
            self._names[user_id] = member.display_name if member is not None else f"user {user_id}"
        return self._names[user_id]

    # ------------------------------------------------------------ leaving by itself

    def humans_in_call(self) -> int:
        channel = self.vc.channel
        if channel is None:
            return 0
        me = self.guild.me.id if self.guild.me else None
        count = 0
        for user_id in channel.voice_states:
            member = self.guild.get_member(user_id)
            if user_id != me and not (member is not None and member.bot):
                count += 1
        return count

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            now = self._clock()
            if not self.vc.is_connected():
                self._disconnected_since = self._disconnected_since or now
                # discord.py dropped the client (4014/4021/4022, failed reconnects): it will not come back.
                if self.guild.voice_client is not self.vc:
                    await self.stop("I was disconnected from the voice channel. Use /voice join to start again.")
                    return
                if now - self._disconnected_since >= RECONNECT_GRACE_S:
                    await self.stop("Lost the voice connection and could not get it back; left the call. "
                                    "Use /voice join to start again.")
                    return
                continue
            self._disconnected_since = None
            if self.humans_in_call() == 0:
                self._alone_since = self._alone_since or now
                if now - self._alone_since >= self.prefs.voice_alone_leave_s:
                    await self.stop("Everyone left the voice channel, so I left too.")
                    return
            else:
                self._alone_since = None
            idle_s = self.prefs.voice_idle_leave_min * 60
            busy = (self._speaker is not None and self._speaker.speaking) or not self._utterances.empty()
            if idle_s and not busy and now - self._last_activity >= idle_s:
                await self.stop(f"Nobody spoke for {self.prefs.voice_idle_leave_min} minutes; left the call.")
                return
