"""Voice messages out, end to end: the real bot on the fake Discord answers with a real voice message.

The fake engine speaks with espeak-ng; the fake Discord checks the upload as Discord does (flag
IS_VOICE_MESSAGE, one OGG Opus file, duration and waveform, no content) and refuses anything else.
"""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import av
import pytest

from bot.app import MasqueBot
from bot.store import Store
from tests.bot.test_e2e_gateway import PERSONA, buttons, running_bot, start_story
from tests.fakes.fake_discord import Attachment, FakeDiscord, RestCall
from tests.fakes.fake_engine import FakeEngine

pytestmark = pytest.mark.timeout(90)

REPLY = "The tide is turning. Run to the lighthouse, and do not look back."
IS_VOICE_MESSAGE = 1 << 13


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def bot(discord_server: FakeDiscord, fake_engine: FakeEngine, store: Store, sqlite_url: str,
              endpoints_restored: None) -> AsyncIterator[MasqueBot]:  # noqa: F811
    fake_engine.reply = REPLY
    async with running_bot(discord_server, fake_engine.url, store, sqlite_url,
                           MASQUE_VOICE_MESSAGE_MAX_S="3") as client:
        await store.update_guild_settings(discord_server.world.guild_id, cooldown_s=0)  # messages in a row
        yield client


def voice_uploads(server: FakeDiscord, since: int = 0) -> list[RestCall]:
    return [c for c in server.calls[since:] if c.method == "POST" and c.multipart
            and (c.json or {}).get("flags", 0) & IS_VOICE_MESSAGE]


def seconds_of(ogg: bytes) -> tuple[str, int, float]:
    """Codec, rate and duration of an OGG file, decoded for real."""
    with av.open(io.BytesIO(ogg)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.name, stream.rate, samples / stream.rate


async def reply_sealed(server: FakeDiscord, since: int) -> RestCall:
    """The persona's reply got its buttons: the text reply is complete."""
    return await server.wait_for_call(lambda c: c.method == "PATCH" and c in server.webhook_calls()
                                      and buttons(c.json or {}) != [], since=since, wait_s=30)


async def say_by_voice(server: FakeDiscord) -> dict:
    return await server.user_says("", attachments=[Attachment("voice-message.ogg", "audio/ogg",
                                                              b"OggS fake opus", voice=True)])


async def test_a_voice_message_is_answered_with_a_voice_message(bot, discord_server, fake_engine):
    await start_story(discord_server)
    since = len(discord_server.calls)
    await say_by_voice(discord_server)
    upload = await discord_server.wait_for_call(lambda c: c in voice_uploads(discord_server, since), wait_s=30)

    # Through the persona's webhook, under its name, in the exact shape of a Discord voice message.
    assert upload in discord_server.webhook_calls()
    text_post = next(c for c in discord_server.webhook_calls()[:] if c.method == "POST" and c is not upload)
    assert upload.json["username"] == text_post.json["username"] and PERSONA.startswith(upload.json["username"])
    assert not upload.json.get("content")
    [meta] = upload.json["attachments"]
    [file] = upload.files
    assert file.part == "files[0]" and file.content_type == "audio/ogg" and file.filename == meta["filename"]
    codec, rate, duration = seconds_of(file.data)
    assert codec == "opus" and rate == 48000
    assert 0 < meta["duration_secs"] <= 3.0 + 0.05 and abs(meta["duration_secs"] - duration) < 0.1
    waveform = base64.b64decode(meta["waveform"])
    assert 0 < len(waveform) <= 256 and max(waveform) == 255

    # What was spoken is the reply without being cut mid-word past the cap; the text reply is complete.
    spoken = fake_engine.requests_to("/v1/audio/speech")[-1].json
    assert spoken["input"] == "The tide is turning." and spoken["model"] == "masque-tts"
    sealed = await reply_sealed(discord_server, since)
    assert sealed.json["content"] == REPLY


async def test_voice_replies_follow_the_channel_setting(bot, discord_server, fake_engine):
    await start_story(discord_server)
    channel = discord_server.world.story_channel_id
    # Default ("spoken"): a typed message gets no voice message.
    since = len(discord_server.calls)
    await discord_server.user_says("Where are we going?")
    await reply_sealed(discord_server, since)
    assert not voice_uploads(discord_server, since)

    await bot.store.update_channel_settings(channel, discord_server.world.guild_id, voice_replies="always")
    since = len(discord_server.calls)
    await discord_server.user_says("Tell me again.")
    await discord_server.wait_for_call(lambda c: c in voice_uploads(discord_server, since), wait_s=30)

    await bot.store.update_channel_settings(channel, discord_server.world.guild_id, voice_replies="off")
    since = len(discord_server.calls)
    await say_by_voice(discord_server)
    await reply_sealed(discord_server, since)
    assert not voice_uploads(discord_server, since)


async def test_refused_by_the_webhook_the_bot_sends_it_and_a_dead_speech_server_loses_no_text(
        bot, discord_server, fake_engine):
    await start_story(discord_server)
    discord_server.refuse_webhook_voice = True
    since = len(discord_server.calls)
    said = await say_by_voice(discord_server)
    upload = await discord_server.wait_for_call(
        lambda c: c in voice_uploads(discord_server, since) and c not in discord_server.webhook_calls(), wait_s=30)
    assert upload.path == f"/channels/{said['channel_id']}/messages"
    assert str(upload.json["message_reference"]["message_id"]) == said["id"]

    await fake_engine.set_mode("error", paths=("/v1/audio/speech",))
    since = len(discord_server.calls)
    said = await say_by_voice(discord_server)
    await reply_sealed(discord_server, since)
    turn = await bot.store.turn_by_message(int(said["id"]))
    turns = await bot.store.recent_turns(turn.story_id)
    assert turns[-1].text == REPLY  # the text reply is there; only the voice message is missing
    assert not voice_uploads(discord_server, since)
