"""Voice messages: a voice note made from real speech, and its upload by the real discord.py client.

The uploads go to the fake Discord (tests/fakes/fake_discord.py) over loopback HTTP, through
discord.py's own request paths; the fake checks the voice-message rules Discord enforces.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import wave
from collections.abc import AsyncIterator

import av
import discord
import numpy as np
import pytest
from discord.http import Route

from bot.discord_io.webhooks import PersonaIdentity, WebhookPoster
from bot.voice.audio import AudioError, decode_to_pcm, encode_ogg_opus, pcm_to_wav
from bot.voice.notes import (
    IS_VOICE_MESSAGE,
    VoiceNote,
    make_voice_note,
    post_voice_note,
    send_voice_note_as_bot,
    waveform_of,
)
from tests.fakes.fake_discord import FakeDiscord, RestCall, plain_client

READY_S = 20.0
PERSONA = "Wren Halloway"
SPEECH = "Hello there, traveller. Welcome to the Gilded Lantern."
PAD_S = 0.6  # silence before and after the words


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, float]:
    """An espeak-ng WAV with PAD_S of silence on each side, and its duration in seconds."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng)")
    path = tmp_path_factory.mktemp("notes") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SPEECH], check=True, capture_output=True)
    with wave.open(str(path)) as source:
        rate, pcm = source.getframerate(), source.readframes(source.getnframes())
    silence = bytes(int(PAD_S * rate) * 2)
    padded = silence + pcm + silence
    return pcm_to_wav(padded, rate=rate, channels=1), len(padded) / 2 / rate


def opus_stream(ogg: bytes) -> tuple[str, int, int, float]:
    """(codec, rate, channels, decoded seconds) as PyAV reads the file."""
    with av.open(io.BytesIO(ogg)) as container:
        stream = container.streams.audio[0]
        info = stream.codec_context.name, stream.rate, stream.codec_context.channels
        decoded = sum(frame.samples for frame in container.decode(stream))
    return (*info, decoded / stream.rate)


# -- making the note --------------------------------------------------------------------------


def test_a_voice_note_from_espeak_is_48k_opus_with_its_duration_and_waveform(speech):
    wav, seconds = speech
    note = make_voice_note(wav)
    assert note.filename == "voice-message.ogg" and note.ogg[:4] == b"OggS"
    codec, rate, channels, decoded_s = opus_stream(note.ogg)
    assert (codec, rate, channels) == ("opus", 48000, 1)
    assert abs(decoded_s - seconds) < 0.05
    assert abs(note.duration_secs - seconds) < 0.05
    levels = np.frombuffer(base64.b64decode(note.waveform, validate=True), dtype=np.uint8)
    assert 0 < len(levels) <= 256
    quiet = int(len(levels) * PAD_S / seconds) - 2  # windows wholly inside the leading/trailing silence
    assert levels.max() == 255
    assert levels[:quiet].max() < 10 and levels[-quiet:].max() < 10
    assert np.median(levels[quiet + 2:-quiet - 2]) > 40  # the words stand well above the silence


def test_max_seconds_cuts_the_note(speech):
    wav, seconds = speech
    note = make_voice_note(wav, max_seconds=1.5)
    assert abs(note.duration_secs - 1.5) < 0.01
    assert abs(opus_stream(note.ogg)[3] - 1.5) < 0.05
    assert make_voice_note(wav, max_seconds=seconds + 5).duration_secs == pytest.approx(seconds, abs=0.05)
    with pytest.raises(ValueError):
        make_voice_note(wav, max_seconds=0)


def test_ogg_opus_that_needs_no_cut_is_kept_as_is(speech):
    wav, seconds = speech
    ogg = encode_ogg_opus(decode_to_pcm(wav, rate=48000, channels=1), rate=48000, channels=1)
    kept = make_voice_note(ogg)
    assert kept.ogg is ogg and abs(kept.duration_secs - seconds) < 0.05 and kept.waveform
    assert make_voice_note(ogg, max_seconds=1.0).ogg != ogg  # a cut re-encodes


def test_audio_that_will_not_decode_is_an_audio_error():
    with pytest.raises(AudioError):
        make_voice_note(b"")
    with pytest.raises(AudioError):
        make_voice_note(b"OggS" + bytes(range(256)) * 8)


def test_the_waveform_has_at_most_256_samples_and_follows_loudness():
    assert waveform_of(b"") == b""
    assert waveform_of(bytes(200)) == bytes(100)  # 100 silent samples: 100 zero windows
    ramp = (np.linspace(0, 1, 48000) * 20000).astype("<i2").tobytes()
    levels = np.frombuffer(waveform_of(ramp), dtype=np.uint8)
    assert len(levels) == 256 and levels[-1] == 255 and np.all(np.diff(levels.astype(int)) >= 0)


# -- uploading it -----------------------------------------------------------------------------


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def client(discord_server: FakeDiscord) -> AsyncIterator[discord.Client]:
    """A plain discord.py client logged in to the fake Discord over REST and the gateway."""
    async with plain_client(discord_server, READY_S) as bot:
        assert bot.get_channel(discord_server.world.story_channel_id) is not None
        yield bot


@pytest.fixture(scope="module")
def note(speech) -> VoiceNote:
    return make_voice_note(speech[0])


def voice_posts(server: FakeDiscord) -> list[RestCall]:
    return [c for c in server.calls if c.method == "POST" and c.multipart
            and int((c.json or {}).get("flags") or 0) & IS_VOICE_MESSAGE]


def assert_voice_message_shape(call: RestCall, note: VoiceNote) -> None:
    body = call.json
    assert body["flags"] == 8192
    assert not body.get("content")
    assert body["attachments"] == [{"id": 0, "filename": "voice-message.ogg", "duration_secs": note.duration_secs,
                                    "waveform": note.waveform}]
    assert body["allowed_mentions"]["parse"] == []
    assert [(f.part, f.filename, f.content_type) for f in call.files] == [("files[0]", "voice-message.ogg",
                                                                             "audio/ogg")]
    assert call.files[0].data == note.ogg


async def assert_echoed_as_voice_message(channel: discord.abc.Messageable, message_id: int,
                                         note: VoiceNote) -> discord.Message:
    message = await channel.fetch_message(message_id)
    assert message.flags.voice and message.content == ""
    [attachment] = message.attachments
    assert attachment.is_voice_message()
    assert attachment.duration == note.duration_secs and attachment.waveform == base64.b64decode(note.waveform)
    assert await attachment.read() == note.ogg
    return message


async def test_a_voice_note_goes_out_through_the_personas_webhook(client, discord_server, note):
    channel = client.get_channel(discord_server.world.story_channel_id)
    poster = WebhookPoster(client)
    message_id = await post_voice_note(poster, channel, PersonaIdentity(PERSONA), note)

    [call] = voice_posts(discord_server)
    assert call.path.startswith("/webhooks/") and call.status == 200
    assert call.query.get("wait") in ("1", "true") and "thread_id" not in call.query
    assert_voice_message_shape(call, note)
    assert call.json["username"] == PERSONA and "avatar_url" not in call.json
    message = await assert_echoed_as_voice_message(channel, message_id, note)
    assert message.webhook_id is not None and message.author.name == PERSONA


async def test_in_a_thread_the_parent_webhook_posts_into_the_thread(client, discord_server, note):
    thread = client.get_channel(discord_server.world.thread_id)
    assert isinstance(thread, discord.Thread)
    who = PersonaIdentity("Clyde the Bard", avatar_url="https://example.com/bard.png")
    message_id = await post_voice_note(WebhookPoster(client), thread, who, note)

    [call] = voice_posts(discord_server)
    assert call.query["thread_id"] == str(thread.id)
    assert call.json["username"] == who.webhook_name and call.json["avatar_url"] == who.avatar_url
    assert discord_server.messages[message_id]["channel_id"] == str(thread.id)
    [created] = discord_server.calls_to("POST", f"/channels/{thread.parent_id}/webhooks")
    assert created.status == 200


async def test_a_deleted_webhook_is_recreated_once(client, discord_server, note):
    channel = client.get_channel(discord_server.world.story_channel_id)
    poster = WebhookPoster(client)
    await post_voice_note(poster, channel, PersonaIdentity(PERSONA), note)
    discord_server.delete_webhook(channel.id)
    message_id = await post_voice_note(poster, channel, PersonaIdentity(PERSONA), note)
    assert [c.status for c in voice_posts(discord_server)] == [200, 404, 200]
    assert discord_server.messages[message_id]["flags"] == IS_VOICE_MESSAGE


async def test_a_refused_webhook_voice_message_falls_back_to_the_bot_replying(client, discord_server, note, caplog):
    discord_server.refuse_webhook_voice = True
    channel = client.get_channel(discord_server.world.story_channel_id)
    said = await discord_server.user_says("Sing me something, Wren.")
    heard = channel.get_partial_message(int(said["id"]))
    with caplog.at_level("WARNING", logger="bot.voice.notes"):
        message_id = await post_voice_note(WebhookPoster(client), channel, PersonaIdentity(PERSONA), note,
                                           reply_to=heard)

    refused, sent = voice_posts(discord_server)
    assert refused.path.startswith("/webhooks/") and refused.status == 400
    assert sent.path == f"/channels/{channel.id}/messages" and sent.status == 200
    assert_voice_message_shape(sent, note)
    assert "username" not in sent.json
    assert sent.json["message_reference"]["message_id"] == heard.id
    assert sent.json["allowed_mentions"] == {"parse": [], "replied_user": False}
    assert "refused the voice message" in caplog.text and "50035" in caplog.text
    message = await assert_echoed_as_voice_message(channel, message_id, note)
    assert message.author.id == client.user.id and message.webhook_id is None
    assert message.reference is not None and message.reference.message_id == heard.id


async def test_a_note_discord_refuses_on_both_paths_raises_discords_error(client, discord_server):
    channel = client.get_channel(discord_server.world.story_channel_id)
    broken = VoiceNote(ogg=b"not ogg", duration_secs=1.0, waveform="AAAA")
    with pytest.raises(discord.HTTPException) as refused:  # 400 from the webhook, then 400 from the bot's path
        await post_voice_note(WebhookPoster(client), channel, PersonaIdentity(PERSONA), broken)
    assert (refused.value.status, refused.value.code) == (400, 50160)
    assert [c.status for c in voice_posts(discord_server)] == [400, 400]


# -- the fake holds uploads to Discord's voice-message rules ----------------------------------


async def raw_voice_post(client: discord.Client, channel_id: int, payload: dict, files: list[tuple[str, bytes]]):
    route = Route("POST", "/channels/{channel_id}/messages", channel_id=channel_id)
    if not files:
        return await client.http.request(route, json=payload)
    form = [{"name": "payload_json", "value": discord.utils._to_json(payload)}]
    uploads = [discord.File(io.BytesIO(data), filename=name) for name, data in files]
    form += [{"name": f"files[{i}]", "value": f.fp, "filename": f.filename, "content_type": "audio/ogg"}
             for i, f in enumerate(uploads)]
    return await client.http.request(route, form=form, files=uploads)


@pytest.mark.parametrize(("change", "code"), [
    ({"content": "hello"}, 50159),
    ({"files": 2}, 50160),
    ({"files": 0}, 50160),
    ({"ogg": b"ID3 an mp3 pretending"}, 50160),
    ({"meta": {"duration_secs": 1.0}}, 50161),
    ({"meta": {"duration_secs": 1.0, "waveform": base64.b64encode(bytes(300)).decode()}}, 50035),
])
async def test_the_fake_refuses_malformed_voice_messages_like_discord(client, discord_server, note, change, code):
    meta = change.get("meta", {"duration_secs": note.duration_secs, "waveform": note.waveform})
    payload = {"flags": IS_VOICE_MESSAGE, "attachments": [{"id": 0, "filename": note.filename, **meta}]}
    if "content" in change:
        payload["content"] = change["content"]
    files = [(note.filename, change.get("ogg", note.ogg))] * change.get("files", 1)
    with pytest.raises(discord.HTTPException) as refused:
        await raw_voice_post(client, discord_server.world.story_channel_id, payload, files)
    assert (refused.value.status, refused.value.code) == (400, code)


async def test_the_fake_refuses_to_edit_a_voice_message(client, discord_server, note):
    channel = client.get_channel(discord_server.world.story_channel_id)
    message_id = await send_voice_note_as_bot(channel, note)
    with pytest.raises(discord.HTTPException) as refused:
        await channel.get_partial_message(message_id).edit(content="words now")
    assert refused.value.code == 50162
