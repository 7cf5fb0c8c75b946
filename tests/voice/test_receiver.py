"""VoiceReceiver with real libopus (discord.opus), real PyNaCl and real davey sessions.

Packets are built here the way Discord's voice server relays them: Opus (DAVE-encrypted
when the call uses DAVE) inside rtpsize XChaCha20-Poly1305 RTP. They are fed from a worker
thread, as discord.py's socket reader does, and frames come back on the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import threading

import discord
import discord.opus
import numpy as np
import pytest
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

from bot.voice.client import ListeningVoiceClient
from bot.voice.receiver import OPUS_SILENCE, PCM_FRAME_BYTES, VoiceReceiver
from tests.fakes.dave_group import DAVE_CHANNEL_ID, DAVE_SPEAKER_ID, dave_pair

if not discord.opus.is_loaded() and not discord.opus._load_default():  # noqa: SLF001
    pytest.skip("libopus is not installed", allow_module_level=True)

MODE = "aead_xchacha20_poly1305_rtpsize"
KEY1 = list(range(32))
KEY2 = list(range(100, 132))
OWN_SSRC = 1
SSRC = 4242
USER = 158049329150427136


class FakeState:
    """The attributes of discord.py's VoiceConnectionState the receiver reads."""

    def __init__(self, key=KEY1):
        self.secret_key = key
        self.mode = MODE
        self.ssrc = OWN_SSRC
        self.dave_session = None
        self.dave_protocol_version = 0


def rtp_packet(opus: bytes, *, seq: int, ssrc: int = SSRC, key=KEY1, ext: bool = True, padding: int = 0) -> bytes:
    """Discord-style RTP: header (+ one-byte extension preamble) as AAD, 4-byte counter nonce appended."""
    b0 = 0x80 | (0x10 if ext else 0) | (0x20 if padding else 0)
    aad = struct.pack(">BBHII", b0, 0x78, seq & 0xFFFF, (seq * 960) & 0xFFFFFFFF, ssrc)
    plain = opus
    if ext:
        aad += struct.pack(">HH", 0xBEDE, 1)
        plain = b"\x10\x7f\x00\x00" + plain  # an audio-level extension element, as clients send
    if padding:
        plain += bytes(padding - 1) + bytes([padding])
    tail = struct.pack(">I", seq & 0xFFFFFFFF)
    return aad + crypto_aead_xchacha20poly1305_ietf_encrypt(plain, aad, tail + bytes(20), bytes(key)) + tail


def tone_frames(n: int, freq: float = 440.0, amplitude: float | list[float] = 8000.0) -> list[bytes]:
    """``n`` 20 ms Opus frames of a stereo sine (one amplitude per frame when a list)."""
    enc = discord.opus.Encoder()
    frames = []
    for i in range(n):
        t = (np.arange(960) + i * 960) / 48000.0
        amp = amplitude[i] if isinstance(amplitude, list) else amplitude
        mono = (amp * np.sin(2 * math.pi * freq * t)).astype("<i2")
        frames.append(enc.encode(np.repeat(mono, 2).tobytes(), 960))
    return frames


def dominant_frequency(pcms: list[bytes]) -> float:
    left = np.frombuffer(b"".join(pcms), dtype="<i2")[::2].astype(float)
    spectrum = np.abs(np.fft.rfft(left * np.hanning(len(left))))
    return float(np.argmax(spectrum) * 48000 / len(left))


def rms(pcm: bytes) -> float:
    return float(np.sqrt(np.mean(np.frombuffer(pcm, dtype="<i2").astype(float) ** 2)))


async def feed_from_thread(receiver: VoiceReceiver, packets: list[bytes]) -> None:
    def run():
        for p in packets:
            receiver.feed(p)

    worker = threading.Thread(target=run)
    worker.start()
    await asyncio.to_thread(worker.join)


class Collector(list):
    """The on_frame callback: collects ``(user_id, pcm)`` and wakes waiters."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(self, user_id: int, pcm: bytes) -> None:
        self.append((user_id, pcm))
        self.changed.set()


async def settle(received: Collector, n: int, wait_s: float = 5.0) -> None:
    """Wait for ``n`` frames, then a little more so extra frames would show up too."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            while len(received) < n:
                received.changed.clear()
                await received.changed.wait()
    await asyncio.sleep(0.02)


def make_receiver(state, **kwargs):
    received = Collector()
    receiver = VoiceReceiver(lambda: state, received, asyncio.get_running_loop(), **kwargs)
    return receiver, received


# ------------------------------------------------------------------ plain audio


async def test_tone_round_trip():
    state = FakeState()
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    frames = tone_frames(30)
    await feed_from_thread(receiver, [rtp_packet(f, seq=1000 + i, padding=3 if i % 2 else 0)
                                      for i, f in enumerate(frames)])
    await settle(received, 30)
    assert len(received) == 30
    assert {uid for uid, _ in received} == {USER}
    assert all(len(pcm) == PCM_FRAME_BYTES for _, pcm in received)
    assert abs(dominant_frequency([pcm for _, pcm in received[5:]]) - 440) < 10
    s = receiver.stats
    assert (s.packets, s.audio_frames, s.transport_failures, s.decode_failures, s.concealed) == (30, 30, 0, 0, 0)


async def test_unmapped_ssrc_buffered_then_replayed_in_order():
    state = FakeState()
    receiver, received = make_receiver(state)
    amplitudes = [1000.0 * (i + 1) for i in range(12)]
    frames = tone_frames(12, amplitude=amplitudes)
    await feed_from_thread(receiver, [rtp_packet(f, seq=65530 + i) for i, f in enumerate(frames)])  # wraps
    await settle(received, 1, wait_s=0.1)
    assert received == []
    assert receiver.stats.buffered == 12
    receiver.map_ssrc(SSRC, USER)
    await settle(received, 12)
    assert len(received) == 12
    levels = [rms(pcm) for _, pcm in received]
    assert all(b > a for a, b in zip(levels[2:], levels[3:], strict=False)), levels
    assert receiver.stats.late == 0
    # and live packets after the replay follow on
    more = tone_frames(3)
    await feed_from_thread(receiver, [rtp_packet(f, seq=65530 + 12 + i) for i, f in enumerate(more)])
    await settle(received, 15)
    assert len(received) == 15


async def test_buffer_bounds():
    state = FakeState()
    receiver, received = make_receiver(state, buffer_packets=5, max_unmapped_ssrcs=2)
    frames = tone_frames(8)
    await feed_from_thread(receiver, [rtp_packet(f, seq=i) for i, f in enumerate(frames)])
    assert receiver.stats.dropped_buffer == 3
    await feed_from_thread(receiver, [rtp_packet(frames[0], seq=0, ssrc=s) for s in (7, 8)])  # evicts SSRC
    assert receiver.stats.dropped_buffer == 3 + 5
    receiver.map_ssrc(SSRC, USER)  # its buffer is gone
    receiver.map_ssrc(8, USER + 1)
    await settle(received, 1)
    assert [uid for uid, _ in received] == [USER + 1]


async def test_own_ssrc_ignored():
    state = FakeState()
    receiver, received = make_receiver(state)
    receiver.map_ssrc(OWN_SSRC, USER)  # never mapped: it is ours
    await feed_from_thread(receiver, [rtp_packet(f, seq=i, ssrc=OWN_SSRC) for i, f in enumerate(tone_frames(5))])
    await settle(received, 1, wait_s=0.1)
    assert received == []
    assert receiver.stats.ignored_own == 5
    assert receiver.stats.buffered == 0


async def test_gap_of_two_is_concealed():
    state = FakeState()
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    frames = tone_frames(8)
    packets = [rtp_packet(f, seq=i) for i, f in enumerate(frames) if i not in (3, 4)]
    await feed_from_thread(receiver, packets)
    await settle(received, 8)
    assert receiver.stats.concealed == 2
    assert len(received) == 8
    assert all(len(pcm) == PCM_FRAME_BYTES for _, pcm in received)


async def test_big_gap_not_concealed_and_late_dropped():
    state = FakeState()
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    f = tone_frames(4)
    await feed_from_thread(receiver, [rtp_packet(f[0], seq=10), rtp_packet(f[1], seq=30),
                                      rtp_packet(f[2], seq=30), rtp_packet(f[3], seq=29)])
    await settle(received, 2)
    assert len(received) == 2
    assert receiver.stats.concealed == 0
    assert receiver.stats.late == 2


async def test_garbage_is_counted_not_raised():
    state = FakeState()
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    good = tone_frames(1)[0]
    packets = [
        b"",
        b"\x00",
        bytes(range(256)),
        bytes([0x81, 0xC9]) + bytes(30),  # RTCP receiver report
        rtp_packet(good, seq=1, key=KEY2),  # wrong key
        rtp_packet(good, seq=2)[:20],  # truncated
        rtp_packet(b"\xff\xff\xff\xff", seq=3),  # authentic but not Opus
    ]
    video = bytearray(rtp_packet(good, seq=4))
    video[1] = 0x65
    packets.append(bytes(video))
    await feed_from_thread(receiver, packets)
    await settle(received, 1, wait_s=0.2)
    s = receiver.stats
    assert s.packets == len(packets)
    assert s.rtcp == 1
    assert s.transport_failures == 2
    assert s.decode_failures == 1
    assert s.ignored_other >= 3


async def test_no_key_yet_drops_quietly():
    state = FakeState(key=discord.utils.MISSING)
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    await feed_from_thread(receiver, [rtp_packet(tone_frames(1)[0], seq=1)])
    state.secret_key = None
    await feed_from_thread(receiver, [rtp_packet(tone_frames(1)[0], seq=2)])
    assert receiver.stats.no_key == 2
    assert received == []


async def test_key_change_mid_stream():
    state = FakeState()
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    frames = tone_frames(10)
    await feed_from_thread(receiver, [rtp_packet(f, seq=500 + i) for i, f in enumerate(frames[:5])])
    state.secret_key = list(KEY2)  # a reconnect: new key, and the sequence starts over
    await feed_from_thread(receiver, [rtp_packet(frames[0], seq=504, key=KEY1)]  # straggler, old key
                           + [rtp_packet(f, seq=i, key=KEY2) for i, f in enumerate(frames[5:])])
    await settle(received, 10)
    assert len(received) == 10
    assert receiver.stats.transport_failures == 1
    assert receiver.stats.late == 0


async def test_reset_drops_sequence_state():
    state = FakeState()
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    f = tone_frames(2)
    await feed_from_thread(receiver, [rtp_packet(f[0], seq=100)])
    receiver.reset()
    await feed_from_thread(receiver, [rtp_packet(f[1], seq=3)])
    await settle(received, 2)
    assert len(received) == 2
    assert receiver.ssrcs == {SSRC: USER}


async def test_forget_user_stops_delivery():
    state = FakeState()
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    frames = tone_frames(6)
    await feed_from_thread(receiver, [rtp_packet(f, seq=i) for i, f in enumerate(frames[:3])])
    await settle(received, 3)
    receiver.forget_user(USER)
    await feed_from_thread(receiver, [rtp_packet(f, seq=3 + i) for i, f in enumerate(frames[3:])])
    await settle(received, 4, wait_s=0.2)
    assert len(received) == 3
    assert receiver.ssrcs == {}


# ------------------------------------------------------------------ DAVE

SPEAKER_ID, CHANNEL_ID = DAVE_SPEAKER_ID, DAVE_CHANNEL_ID


async def test_dave_version_zero_passes_through():
    bot, _ = dave_pair()
    state = FakeState()
    state.dave_session = bot  # a session object left over, but the call runs without DAVE
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, USER)
    await feed_from_thread(receiver, [rtp_packet(f, seq=i) for i, f in enumerate(tone_frames(20))])
    await settle(received, 20)
    assert len(received) == 20 and receiver.stats.dave_failures == 0


async def test_dave_decrypts_a_group_members_frames():
    bot, speaker = dave_pair()
    state = FakeState()
    state.dave_session, state.dave_protocol_version = bot, 1
    receiver, received = make_receiver(state)
    frames = tone_frames(30)
    encrypted = [speaker.encrypt_opus(f) for f in frames]
    assert encrypted[0] != frames[0]
    # the first few arrive before op 5: buffered transport-decrypted, DAVE-decrypted on replay
    await feed_from_thread(receiver, [rtp_packet(e, seq=i, padding=5 if i % 3 == 0 else 0)
                                      for i, e in enumerate(encrypted[:4])])
    receiver.map_ssrc(SSRC, SPEAKER_ID)
    await feed_from_thread(receiver, [rtp_packet(e, seq=4 + i) for i, e in enumerate(encrypted[4:])])
    await settle(received, 30)
    assert receiver.stats.dave_failures == 0
    assert len(received) == 30
    assert {uid for uid, _ in received} == {SPEAKER_ID}
    assert abs(dominant_frequency([pcm for _, pcm in received[5:]]) - 440) < 10


async def test_dave_failures_counted_and_silence_passes():
    bot, speaker = dave_pair()
    state = FakeState()
    state.dave_session, state.dave_protocol_version = bot, 1
    receiver, received = make_receiver(state)
    receiver.map_ssrc(SSRC, 999)  # a user with no decryptor in the group
    receiver.map_ssrc(SSRC + 1, SPEAKER_ID)
    enc = speaker.encrypt_opus(tone_frames(1)[0])
    await feed_from_thread(receiver, [
        rtp_packet(enc, seq=1),  # NoDecryptorForUser
        rtp_packet(tone_frames(1)[0], seq=1, ssrc=SSRC + 1),  # unencrypted, passthrough off
        rtp_packet(OPUS_SILENCE, seq=2, ssrc=SSRC + 1),  # silence is never encrypted
    ])
    await settle(received, 1)
    assert receiver.stats.dave_failures == 2
    assert len(received) == 1 and received[0][0] == SPEAKER_ID
    assert rms(received[0][1]) == 0


# ------------------------------------------------------------------ the client's hook


async def test_listening_client_hook_and_listener():
    client = discord.Client(intents=discord.Intents.none())

    class Channel:
        id = CHANNEL_ID
        guild = None

    vc = ListeningVoiceClient(client, Channel())
    vc.loop = asyncio.get_running_loop()
    try:
        conn = vc._connection  # noqa: SLF001
        assert conn.hook == vc._hook  # noqa: SLF001
        assert vc.receiver is None
        vc.stop_listening()  # before listen: fine
        left, speaking = [], []
        vc.on_user_disconnect = left.append
        vc.on_speaking = lambda uid, on: speaking.append((uid, on))
        received = Collector()
        receiver = vc.listen(received)
        assert vc.receiver is receiver
        assert receiver.feed in conn._socket_reader._callbacks  # noqa: SLF001

        await vc._hook(None, {"op": 5, "d": {"user_id": str(USER), "ssrc": SSRC, "speaking": 1}})  # noqa: SLF001
        await vc._hook(None, {"op": 12, "d": {"user_id": "7", "audio_ssrc": 77, "video_ssrc": 0}})  # noqa: SLF001
        await vc._hook(None, {"op": 12, "d": {"user_id": "8", "audio_ssrc": 0}})  # noqa: SLF001
        await vc._hook(None, {"op": 11, "d": {"user_ids": ["7"]}})  # noqa: SLF001
        assert receiver.ssrcs == {SSRC: USER, 77: 7}
        assert speaking == [(USER, True)]

        conn.secret_key, conn.mode = KEY1, MODE
        conn._socket_reader.unregister(receiver.feed)  # noqa: SLF001  (as if the reader had dropped it)
        await vc._hook(None, {"op": 4, "d": {"mode": MODE, "secret_key": KEY1}})  # noqa: SLF001
        assert receiver.feed in conn._socket_reader._callbacks  # noqa: SLF001

        await feed_from_thread(receiver, [rtp_packet(tone_frames(1)[0], seq=1)])
        await settle(received, 1)
        assert [uid for uid, _ in received] == [USER]

        await vc._hook(None, {"op": 13, "d": {"user_id": str(USER)}})  # noqa: SLF001
        assert left == [USER] and receiver.ssrcs == {77: 7}

        vc.on_speaking = lambda uid, on: 1 / 0  # a failing callback never escapes the hook
        await vc._hook(None, {"op": 5, "d": {"user_id": "7", "ssrc": 77, "speaking": 0}})  # noqa: SLF001
        await vc._hook(None, {"op": 5, "d": None})  # noqa: SLF001
        await vc._hook(None, {"op": 13, "d": {}})  # noqa: SLF001

        vc.stop_listening()
        vc.stop_listening()
        assert receiver.feed not in conn._socket_reader._callbacks  # noqa: SLF001
    finally:
        vc._connection._socket_reader.stop()  # noqa: SLF001
        await client.close()


async def test_decoder_fallback_matches_fast_path():
    from bot.voice import receiver as receiver_module

    frames = tone_frames(5)
    fast = receiver_module._Stream()  # noqa: SLF001
    slow = receiver_module._Stream()  # noqa: SLF001
    slow._fast = False  # noqa: SLF001  (as when discord.opus's internals are not there)
    assert fast._fast and not slow._fast  # noqa: SLF001
    for f in frames:
        assert fast.decode(f) == slow.decode(f)
    assert len(fast.decode(None)) == len(slow.decode(None)) == PCM_FRAME_BYTES
