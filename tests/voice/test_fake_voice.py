"""The fake voice server (tests/fakes/fake_voice.py) against the real discord.py voice client.

A plain `discord.Client` logs in to the fake Discord and joins its voice channel with our
`ListeningVoiceClient`: TLS websocket, IP discovery, XChaCha20 RTP with real libopus both ways.
Nothing is mocked; these tests show the fake speaks the protocol the way discord.py 2.7.1 expects,
so the bot's end-to-end voice tests can trust it.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import discord
import discord.opus
import numpy as np
import pytest
from discord.voice_state import VoiceConnectionState

from bot.voice.client import ListeningVoiceClient
from tests.fakes.fake_discord import FakeDiscord, plain_client
from tests.fakes.fake_voice import FRAME_BYTES, XCHACHA, FakeVoiceServer, espeak_pcm, rms

if not discord.opus.is_loaded() and not discord.opus._load_default():  # noqa: SLF001
    pytest.skip("libopus is not installed", allow_module_level=True)

pytestmark = pytest.mark.timeout(30)

WAIT_S = 8.0
CONNECT_TIMEOUT_S = 5.0  # discord.py's own limit for a (re)connection, resumes included
RECONNECT_S = 5.0  # a reconnect on loopback takes discord.py's backoff (up to 2 s) and a few milliseconds
RATE = 48000


@pytest.fixture
async def voice() -> AsyncIterator[FakeVoiceServer]:
    async with FakeVoiceServer(heartbeat_ms=300) as server:  # discord.py beats every 0.3 s
        server.trust_in_process()
        yield server


@pytest.fixture
async def server(voice: FakeVoiceServer) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(voice=voice) as fake:
        yield fake


@pytest.fixture
async def client(server: FakeDiscord) -> AsyncIterator[discord.Client]:
    async with plain_client(server) as ready:
        yield ready


async def until(predicate: Callable[[], Any], what: str, wait_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def join(client: discord.Client, server: FakeDiscord, *,
               cls: type[ListeningVoiceClient] = ListeningVoiceClient) -> ListeningVoiceClient:
    """The user is in the voice channel; the client joins it, as /voice join does."""
    await server.user_joins_voice(server.world.user_id)
    guild = client.get_guild(server.world.guild_id)
    channel = guild.get_channel(server.world.voice_channel_id)
    await until(lambda: server.world.user_id in channel.voice_states, "the user's voice state")
    return await channel.connect(cls=cls, self_deaf=False, timeout=CONNECT_TIMEOUT_S)


class Frames:
    """What a listening voice client delivered: PCM frames per user id."""

    def __init__(self, vc: ListeningVoiceClient) -> None:
        self.by_user: dict[int, list[bytes]] = defaultdict(list)
        vc.listen(lambda user_id, pcm: self.by_user[user_id].append(pcm))

    def count(self, user_id: int) -> int:
        return len(self.by_user[user_id])


def frames_in(pcm: bytes) -> int:
    return math.ceil(len(pcm) / FRAME_BYTES)


def sine(hz: float, seconds: float, amplitude: int = 12000) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    mono = (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16)
    return np.repeat(mono, 2).tobytes()  # stereo, interleaved


def dominant_hz(pcm: bytes) -> float:
    mono = np.frombuffer(pcm, dtype=np.int16).reshape(-1, 2).mean(axis=1)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.fft.rfftfreq(len(mono), 1 / RATE)[np.argmax(spectrum)])


# -- connecting ---------------------------------------------------------------------------------------

async def test_the_real_voice_client_connects_over_tls(client: discord.Client, server: FakeDiscord,
                                                       voice: FakeVoiceServer) -> None:
    vc = await join(client, server)
    assert vc.is_connected()
    session = await voice.wait_connected(WAIT_S)
    assert session.grant.user_id == server.world.bot_id and session.grant.channel_id == server.world.voice_channel_id
    assert session.mode == XCHACHA and vc.mode == XCHACHA  # chosen from the offered modes
    assert vc.ssrc == session.ssrc and bytes(vc.secret_key) == session.secret_key
    assert session.speaking and session.speaking[0]["ssrc"] == session.ssrc  # discord.py's op 5 after op 4
    await until(lambda: session.heartbeats >= 2, "voice heartbeats")
    assert vc.latency < 1.0  # the heartbeats were acknowledged
    guild = client.get_guild(server.world.guild_id)
    assert guild.me.voice is not None and guild.me.voice.channel.id == server.world.voice_channel_id
    assert set(guild.get_channel(server.world.voice_channel_id).voice_states) == {
        server.world.bot_id, server.world.user_id}

    await vc.disconnect()
    await until(lambda: server.world.bot_id not in server.world.voice_states, "the bot leaving")
    await until(lambda: not voice.grants and session.ws.closed, "the voice session ending")


async def test_users_already_in_a_call_come_in_guild_create(server: FakeDiscord, voice: FakeVoiceServer) -> None:
    await server.user_joins_voice(server.world.admin_id)  # before the client connects
    async with plain_client(server) as client:
        guild = client.get_guild(server.world.guild_id)
        assert guild.get_member(server.world.admin_id).voice.channel.id == server.world.voice_channel_id


# -- the fake's users speak -----------------------------------------------------------------------

@pytest.mark.parametrize(("announce", "padding", "extension", "csrcs"), [
    ("first", 0, False, ()),
    ("late", 7, True, (1234,)),
    ("connect", 1, True, (1, 2)),
])
async def test_a_user_s_speech_arrives_as_decoded_frames(client: discord.Client, server: FakeDiscord,
                                                         voice: FakeVoiceServer, announce: str, padding: int,
                                                         extension: bool, csrcs: tuple[int, ...]) -> None:
    vc = await join(client, server)
    frames = Frames(vc)
    speech = espeak_pcm("hello there")
    started = time.monotonic()
    await voice.speak(server.world.user_id, speech, announce=announce, padding=padding, extension=extension,
                      csrcs=csrcs)
    assert time.monotonic() - started >= 0.9 * frames_in(speech) * 0.02  # paced in real time

    user = server.world.user_id
    await until(lambda: frames.count(user) >= frames_in(speech), "every frame")
    heard = b"".join(frames.by_user[user])
    assert frames.count(user) == frames_in(speech) and len(heard) == frames_in(speech) * FRAME_BYTES
    assert 0.5 < rms(heard) / rms(speech) < 2.0  # as loud as what was said
    stats = vc.receiver.stats
    assert stats.transport_failures == stats.decode_failures == stats.late == 0
    assert (stats.buffered > 0) == (announce == "late")  # the first words came before op 5


async def test_two_users_speak_at_once(client: discord.Client, server: FakeDiscord, voice: FakeVoiceServer) -> None:
    vc = await join(client, server)
    await server.user_joins_voice(server.world.admin_id)
    frames = Frames(vc)
    first, second = espeak_pcm("Where is the lighthouse?"), espeak_pcm("Good evening.")
    await asyncio.gather(voice.speak(server.world.user_id, first), voice.speak(server.world.admin_id, second))
    await until(lambda: frames.count(server.world.user_id) == frames_in(first)
                and frames.count(server.world.admin_id) == frames_in(second), "both speakers' frames")
    assert vc.receiver.ssrcs == {voice.ssrc_of(server.world.user_id): server.world.user_id,
                                 voice.ssrc_of(server.world.admin_id): server.world.admin_id}


# -- the client speaks ---------------------------------------------------------------------------

async def test_what_the_client_plays_is_heard(client: discord.Client, server: FakeDiscord,
                                              voice: FakeVoiceServer) -> None:
    vc = await join(client, server)
    session = await voice.wait_connected(WAIT_S)
    tone = sine(440, 1.0)
    played_at = time.perf_counter()
    vc.play(discord.PCMAudio(io.BytesIO(tone)))
    await voice.wait_for_audio(0.9, WAIT_S)
    await until(lambda: not vc.is_playing(), "the end of playback")
    await asyncio.sleep(0.2)  # the last packets and discord.py's trailing silence

    heard = voice.heard_pcm()
    assert voice.packets_received >= frames_in(tone) and voice.bad_packets == 0
    assert 0.95 <= voice.heard_seconds() <= 1.05
    assert abs(dominant_hz(heard) - 440) < 5
    assert 0.7 < rms(heard) / rms(tone) < 1.3
    assert any(s.get("speaking") for s in session.speaking)  # it said it was speaking
    assert 0 < voice.first_loud_at - played_at < 0.5

    voice.clear_received()
    assert voice.heard_pcm() == b"" and voice.heard_seconds() == 0 and voice.first_loud_at is None


# -- reconnecting ----------------------------------------------------------------------------------

class UnpatchedVoiceClient(ListeningVoiceClient):
    """Our client without its workarounds of discord.py 2.7.1's reconnect bugs (see bot/voice/client.py).

    Expected to fail the reconnect tests; when a discord.py release fixes them, these xfails turn into
    failures (strict) and the workarounds can go.
    """

    def create_connection_state(self) -> VoiceConnectionState:
        return VoiceConnectionState(self, hook=self._plain_hook)

    async def _plain_hook(self, ws: Any, msg: dict[str, Any]) -> None:
        self._handle_ws(msg)


UNPATCHED = pytest.param(UnpatchedVoiceClient, marks=pytest.mark.xfail(
    strict=True, reason="discord.py 2.7.1 voice reconnect bugs (worked around in bot/voice/client.py)"))


async def _still_hears(vc: ListeningVoiceClient, server: FakeDiscord, voice: FakeVoiceServer) -> None:
    frames = Frames(vc)
    speech = espeak_pcm("still here")
    await voice.speak(server.world.user_id, speech)
    await until(lambda: frames.count(server.world.user_id) == frames_in(speech), "speech after the reconnect")


@pytest.mark.parametrize("state_update_first", [True, False])
@pytest.mark.parametrize("cls", [UNPATCHED, ListeningVoiceClient])
async def test_a_crashed_voice_server_4015_is_resumed(client: discord.Client, server: FakeDiscord,
                                                      voice: FakeVoiceServer, cls: type[ListeningVoiceClient],
                                                      state_update_first: bool) -> None:
    server.voice_server_update_first = not state_update_first
    vc = await join(client, server, cls=cls)
    session = await voice.wait_connected(WAIT_S)
    await voice.close_ws(4015)
    await voice.wait_connected(RECONNECT_S, handshakes=2)
    assert session.resumed and len(voice.sessions) == 1 and voice.current is session
    await until(vc.is_connected, "connected again")
    await _still_hears(vc, server, voice)


@pytest.mark.parametrize("cls", [UNPATCHED, ListeningVoiceClient])
async def test_a_lost_session_4006_is_a_new_session(client: discord.Client, server: FakeDiscord,
                                                    voice: FakeVoiceServer, cls: type[ListeningVoiceClient]) -> None:
    vc = await join(client, server, cls=cls)
    first = await voice.wait_connected(WAIT_S)
    await voice.close_ws(4006)
    second = await voice.wait_connected(RECONNECT_S, handshakes=2)
    assert second is not first and not second.resumed and second.ssrc != first.ssrc
    await until(vc.is_connected, "connected again")
    assert vc.ssrc == second.ssrc and bytes(vc.secret_key) == second.secret_key
    await _still_hears(vc, server, voice)


# -- moderators -----------------------------------------------------------------------------------

@pytest.mark.parametrize("state_update_first", [True, False])
@pytest.mark.parametrize("cls", [ListeningVoiceClient])
async def test_a_moderator_moving_the_bot_reconnects_it_there(client: discord.Client, server: FakeDiscord,
                                                              voice: FakeVoiceServer, cls: type[ListeningVoiceClient],
                                                              state_update_first: bool) -> None:
    server.voice_server_update_first = not state_update_first
    vc = await join(client, server, cls=cls)
    first = await voice.wait_connected(WAIT_S)
    await server.move_bot(server.world.other_voice_channel_id)
    second = await voice.wait_connected(WAIT_S, handshakes=2)
    assert second is not first and second.grant.channel_id == server.world.other_voice_channel_id
    await until(lambda: vc.is_connected() and vc.channel.id == server.world.other_voice_channel_id,
                "connected in the other channel")
    await _still_hears(vc, server, voice)


async def test_a_moderator_disconnecting_the_bot_ends_its_voice_client(client: discord.Client, server: FakeDiscord,
                                                                       voice: FakeVoiceServer) -> None:
    vc = await join(client, server)
    session = await voice.wait_connected(WAIT_S)
    guild = client.get_guild(server.world.guild_id)
    await server.move_bot(None)
    await until(lambda: guild.voice_client is None, "the voice client torn down")
    assert not vc.is_connected() and session.closed_with == 4014 and guild.me.voice is None
