"""Receive voice: raw UDP datagrams in, each speaker's decoded 20 ms PCM frames out.

`VoiceReceiver.feed` is registered as a discord.py socket listener and runs on its
socket reader thread. Per datagram: drop anything that is not Opus RTP (RTCP,
video, the IP discovery reply, junk) and the bot's own SSRC; transport-decrypt
(bot/voice/rtp.py); if the SSRC is not yet mapped to a user (the first words of
a speaker arrive before op 5), buffer the frame and replay it on `map_ssrc`;
otherwise DAVE-decrypt when the call uses DAVE, conceal up to 5 lost packets,
Opus-decode with one decoder per SSRC and hand ``(user_id, pcm)`` to the event
loop with ``call_soon_threadsafe``, in sequence order per SSRC.

The connection state is re-read for every packet: the key, mode and DAVE session
change on reconnects and transitions. Nothing raises out of `feed`; failures are
counted in `stats`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import discord.opus

from bot.voice.rtp import RtpError, classify, decrypt

try:  # davey comes with discord.py[voice]; without it DAVE frames cannot be read
    import davey as _davey

    _AUDIO = _davey.MediaType.audio
except ImportError:  # pragma: no cover - discord.py refuses voice without davey anyway
    _davey = None
    _AUDIO = None

__all__ = ["OPUS_SILENCE", "PCM_FRAME_BYTES", "ReceiverStats", "VoiceReceiver"]

_log = logging.getLogger(__name__)

OPUS_SILENCE = b"\xf8\xff\xfe"
PCM_FRAME_BYTES = 3840  # 20 ms, 48 kHz, stereo, s16le
MAX_CONCEALED_GAP = 5  # lost packets concealed with decode(None); bigger gaps are just skipped
RESTART_DISTANCE = 1000  # a packet this far "behind" means the sender restarted its sequence

_SSRC = struct.Struct(">I")
_MAX_SAMPLES = 5760  # 120 ms at 48 kHz, the longest Opus packet


@dataclass(slots=True)
class ReceiverStats:
    packets: int = 0  # datagrams fed
    audio_frames: int = 0  # PCM frames delivered (concealed ones included)
    concealed: int = 0  # frames made up for lost packets
    rtcp: int = 0
    ignored_own: int = 0  # the bot's own SSRC
    ignored_other: int = 0  # video, IP discovery, junk
    no_key: int = 0  # audio before the session key arrived
    buffered: int = 0  # frames held for an SSRC not yet mapped to a user
    dropped_buffer: int = 0  # buffered frames dropped (buffer full, too many unknown SSRCs, forgotten)
    late: int = 0  # late or duplicate packets dropped
    transport_failures: int = 0
    dave_failures: int = 0
    decode_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Stream:
    """Decoding state of one SSRC: its `discord.opus.Decoder` and last sequence number.

    `decode` calls libopus through discord.opus's own binding into a buffer kept per
    stream: ``Decoder.decode`` copies each frame through a Python list of samples,
    which costs ~90 us a packet, more than libopus itself. Falls back to it when
    discord.opus's internals are not there.
    """

    __slots__ = ("_buf", "_fast", "_ptr", "decoder", "last_seq")

    def __init__(self) -> None:
        self.decoder = discord.opus.Decoder()
        self.last_seq: int | None = None
        lib = getattr(discord.opus, "_lib", None)
        int16_ptr = getattr(discord.opus, "c_int16_ptr", None)
        self._fast = lib is not None and int16_ptr is not None and hasattr(lib, "opus_decode")
        if self._fast:
            self._buf = (ctypes.c_int16 * (_MAX_SAMPLES * 2))()
            self._ptr = ctypes.cast(self._buf, int16_ptr)

    def decode(self, data: bytes | None) -> bytes:
        """PCM (s16le stereo) of an Opus packet; ``None`` conceals one lost 20 ms packet."""
        if not self._fast:
            return self.decoder.decode(data)
        lib = discord.opus._lib  # noqa: SLF001
        if data is None:
            n = lib.opus_decode(self.decoder._state, None, 0, self._ptr, 960, 0)  # noqa: SLF001
        else:
            n = lib.opus_decode(self.decoder._state, data, len(data), self._ptr, _MAX_SAMPLES, 0)  # noqa: SLF001
        return ctypes.string_at(self._buf, n * 4)  # errcheck raised OpusError when n < 0


class VoiceReceiver:
    def __init__(self, state_getter: Callable[[], Any], on_frame: Callable[[int, bytes], None],
                 loop: asyncio.AbstractEventLoop, *, buffer_packets: int = 100,
                 max_unmapped_ssrcs: int = 32) -> None:
        self._state_getter = state_getter
        self._on_frame = on_frame
        self._loop = loop
        self._buffer_packets = max(1, buffer_packets)
        self._max_unmapped = max(1, max_unmapped_ssrcs)
        self.stats = ReceiverStats()
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}  # ssrc -> user id
        self._streams: dict[int, _Stream] = {}  # ssrc -> decoder and sequence state
        self._pending: OrderedDict[int, deque[tuple[int, bytes]]] = OrderedDict()  # unmapped ssrc -> frames
        self._key_src: Any = None  # the list object the cached key came from (kept alive for `is`)
        self._key: bytes | None = None

    # ------------------------------------------------------------ socket thread

    def feed(self, datagram: bytes) -> None:
        """Handle one UDP datagram. Runs on discord.py's socket reader thread; never raises."""
        stats = self.stats
        stats.packets += 1
        try:
            kind = classify(datagram)
            if kind != "audio":
                if kind == "rtcp":
                    stats.rtcp += 1
                else:
                    stats.ignored_other += 1
                return
            state = self._state_getter()
            if state is None:
                stats.no_key += 1
                return
            ssrc = _SSRC.unpack_from(datagram, 8)[0]
            if ssrc == getattr(state, "ssrc", None):
                stats.ignored_own += 1
                return
            key = self._key_for(getattr(state, "secret_key", None))
            if key is None:
                stats.no_key += 1
                return
            try:
                header, frame = decrypt(datagram, state.mode, key)
            except RtpError:
                stats.transport_failures += 1
                return
            with self._lock:
                user_id = self._users.get(ssrc)
                if user_id is None:
                    self._buffer(ssrc, header.sequence, frame)
                    return
                self._process(state, ssrc, user_id, header.sequence, frame)
        except Exception:  # never let a packet kill the socket reader
            _log.exception("voice receiver: unexpected error on a packet")

    def _key_for(self, key_list: Any) -> bytes | None:
        if not key_list:  # None, discord.utils.MISSING (falsy) or empty
            return None
        if key_list is self._key_src:
            return self._key
        key = bytes(key_list)
        with self._lock:
            if self._key_src is not None:
                # A new session key: its packets start a new stream for every SSRC.
                self._streams.clear()
            self._key_src = key_list
            self._key = key
        return key

    # ------------------------------------------------------------ under the lock

    def _buffer(self, ssrc: int, seq: int, frame: bytes) -> None:
        queue = self._pending.get(ssrc)
        if queue is None:
            while len(self._pending) >= self._max_unmapped:
                _, dropped = self._pending.popitem(last=False)
                self.stats.dropped_buffer += len(dropped)
            queue = self._pending[ssrc] = deque(maxlen=self._buffer_packets)
        elif len(queue) == self._buffer_packets:
            self.stats.dropped_buffer += 1
        queue.append((seq, frame))
        self.stats.buffered += 1

    def _process(self, state: Any, ssrc: int, user_id: int, seq: int, frame: bytes) -> None:
        stats = self.stats
        stream = self._streams.get(ssrc)
        if stream is None:
            try:
                stream = self._streams[ssrc] = _Stream()
            except Exception:
                stats.decode_failures += 1
                _log.exception("voice receiver: cannot create an Opus decoder")
                return
        last = stream.last_seq
        gap = 0
        if last is not None:
            delta = (seq - last) & 0xFFFF
            if delta == 0 or delta >= 0x8000:
                if delta == 0 or 0x10000 - delta < RESTART_DISTANCE:
                    stats.late += 1
                    return
                # far behind: the sender restarted its sequence numbers; start over
            else:
                gap = delta - 1
        stream.last_seq = seq

        if frame != OPUS_SILENCE and getattr(state, "dave_protocol_version", 0) > 0:
            session = getattr(state, "dave_session", None)
            if session is not None:
                try:
                    frame = session.decrypt(user_id, _AUDIO, frame)
                except Exception:  # ValueError from davey; anything else is counted the same
                    stats.dave_failures += 1
                    return

        decode = stream.decode
        call = self._loop.call_soon_threadsafe
        on_frame = self._on_frame
        if 0 < gap <= MAX_CONCEALED_GAP:
            for _ in range(gap):
                try:
                    pcm = decode(None)
                except Exception:
                    stats.decode_failures += 1
                    break
                stats.concealed += 1
                stats.audio_frames += 1
                call(on_frame, user_id, pcm)
        try:
            pcm = decode(frame)
        except Exception:
            stats.decode_failures += 1
            return
        stats.audio_frames += 1
        call(on_frame, user_id, pcm)

    # ------------------------------------------------------------ event loop side

    def map_ssrc(self, ssrc: int, user_id: int) -> None:
        """Tie an SSRC to a user (op 5 / op 12) and replay what arrived before, in order."""
        if not ssrc:
            return
        state = None
        try:
            state = self._state_getter()
        except Exception:
            _log.exception("voice receiver: state getter failed")
        if state is not None and ssrc == getattr(state, "ssrc", None):
            return
        with self._lock:
            previous = self._users.get(ssrc)
            if previous == user_id and ssrc not in self._pending:
                return
            if previous is not None and previous != user_id:
                self._streams.pop(ssrc, None)  # another user now: a fresh decoder
            self._users[ssrc] = user_id
            queue = self._pending.pop(ssrc, None)
            if not queue:
                return
            for seq, frame in queue:
                try:
                    self._process(state, ssrc, user_id, seq, frame)
                except Exception:
                    _log.exception("voice receiver: error replaying a buffered packet")

    def forget_user(self, user_id: int) -> None:
        """The user left (op 13): drop their SSRCs, decoders and buffered frames."""
        with self._lock:
            for ssrc in [s for s, u in self._users.items() if u == user_id]:
                del self._users[ssrc]
                self._streams.pop(ssrc, None)
                dropped = self._pending.pop(ssrc, None)
                if dropped:
                    self.stats.dropped_buffer += len(dropped)

    def reset(self) -> None:
        """A new session (op 4): drop decoders and sequence state; keep who is who."""
        with self._lock:
            self._streams.clear()

    def user_for(self, ssrc: int) -> int | None:
        with self._lock:
            return self._users.get(ssrc)

    @property
    def ssrcs(self) -> dict[int, int]:
        """A copy of the SSRC to user map."""
        with self._lock:
            return dict(self._users)
