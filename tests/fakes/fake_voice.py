"""A local fake Discord voice server for the real discord.py `VoiceClient`, on loopback.

`FakeDiscord(voice=FakeVoiceServer())` sends VOICE_SERVER_UPDATE with `endpoint` = "127.0.0.1:PORT";
discord.py connects to ``wss://{endpoint}/?v=8``, so the websocket is served over TLS with a
self-signed certificate made at start. `trust_in_process()` makes this process trust it (a bot in a
child process gets only ``SSL_CERT_FILE``). There is no test-only path in the client.

What it speaks (voice gateway v8, JSON ``{"op", "d", "seq"}``; ``seq`` numbers the server's messages):

* on connect: op 8 HELLO ``{v, heartbeat_interval}``;
* op 0 IDENTIFY ``{server_id, user_id, session_id, token, max_dave_protocol_version}``, checked against
  what the main gateway granted (4004 on a wrong token, 4006 on an unknown session), answered by op 2
  READY ``{ssrc, ip, port, modes, heartbeat_interval}``;
* UDP IP discovery: the client's 74-byte request (type 1, length 70, its SSRC) is answered from the
  advertised port with type 2: the address it came from, NUL-terminated at offset 8, and the port
  (big-endian) at offset 72;
* op 1 SELECT_PROTOCOL ``{protocol: "udp", data: {address, port, mode}}``, answered by op 4
  SESSION_DESCRIPTION ``{mode, secret_key: [32 ints], dave_protocol_version: 0}`` (no DAVE: a test server
  may negotiate version 0) and op 11 CLIENTS_CONNECT with the users already in the channel;
* op 3 HEARTBEAT ``{t, seq_ack}`` -> op 6 HEARTBEAT_ACK ``{t}``; op 7 RESUME ``{token, server_id,
  session_id, seq_ack}`` -> op 9 RESUMED (the session keeps its SSRC and key); op 5 SPEAKING from the
  client is recorded; binary (DAVE) frames are ignored;
* users: op 5 SPEAKING ``{user_id, ssrc, speaking: 1}`` maps a speaker's SSRC, op 12 CLIENT_CONNECT
  ``{user_id, audio_ssrc}`` too, op 11 ``{user_ids}`` / op 13 ``{user_id}`` when someone joins / leaves.

Media is RTP (version 2, payload type 0x78, Opus 20 ms frames at 48 kHz stereo) with Discord's
``aead_xchacha20_poly1305_rtpsize`` transport encryption: the additional data is the 12-byte header, the
CSRCs and the 4-byte extension preamble (when X is set); the extension body, the Opus frame and the RTP
padding (P bit; last byte = its length) are encrypted; a 4-byte big-endian counter is appended and is
the nonce, zero-padded to 24 bytes. `speak()` sends a user's speech this way, paced in real time, from
the advertised port (the client's socket is connected to it); what the client sends is decrypted and
decoded with real libopus (`heard_pcm()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import io
import ipaddress
import itertools
import json
import os
import secrets
import shutil
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.connector
import av
import discord.opus
import numpy as np
from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nacl import bindings as sodium

HOST = "127.0.0.1"
XCHACHA = "aead_xchacha20_poly1305_rtpsize"
AES_GCM = "aead_aes256_gcm_rtpsize"
MODES = [AES_GCM, XCHACHA]  # what Discord offers; discord.py picks the first it supports (XChaCha20)
HEARTBEAT_MS = 41250  # discord.py beats every min(this, 5 s)
CLOSE_TIMEOUT_S = 1.0  # how long a close waits for the client's close frame (discord.py may never send one)
FRAME_S = 0.02
FRAME_SAMPLES = 960  # 20 ms at 48 kHz
FRAME_BYTES = FRAME_SAMPLES * 2 * 2  # stereo s16le
OPUS_PAYLOAD_TYPE = 0x78
LATE_PACKETS = 10  # announce="late": packets sent before the SSRC is announced
WAIT_S = 10.0
LOUD_RMS = 200.0  # a decoded frame louder than this (of 32768) is not silence
# Voice gateway opcodes.
(IDENTIFY, SELECT_PROTOCOL, READY, HEARTBEAT, SESSION_DESCRIPTION, SPEAKING, HEARTBEAT_ACK, RESUME, HELLO,
 RESUMED) = range(10)
CLIENTS_CONNECT, CLIENT_CONNECT, CLIENT_DISCONNECT = 11, 12, 13
# Close codes.
NOT_AUTHENTICATED, AUTHENTICATION_FAILED, SESSION_INVALID, UNKNOWN_MODE = 4003, 4004, 4006, 4016

_RTP = struct.Struct(">BBHII")
_NONCE_PAD = bytes(20)  # 4-byte counter + 20 zero bytes = XChaCha20's 24-byte nonce


# -- audio --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def espeak_pcm(text: str, *, voice: str = "en-us", words_per_minute: int = 160) -> bytes:
    """`text` spoken by espeak-ng as 48 kHz stereo s16le PCM (what a Discord client sends)."""
    wav = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-s", str(words_per_minute), text],
                         check=True, capture_output=True, timeout=30).stdout
    return resample_to_discord(wav)


def resample_to_discord(audio: bytes) -> bytes:
    """Any audio file PyAV can read, as 48 kHz stereo s16le PCM."""
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=48000)
    chunks = []
    with av.open(io.BytesIO(audio)) as container:
        for frame in container.decode(audio=0):
            chunks += [out.to_ndarray().tobytes() for out in resampler.resample(frame)]
    chunks += [out.to_ndarray().tobytes() for out in resampler.resample(None)]
    return b"".join(chunks)


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def opus_frames(pcm: bytes) -> list[bytes]:
    """`pcm` cut in 20 ms frames (the last one padded with silence), each encoded by libopus."""
    encoder = discord.opus.Encoder()
    pcm += bytes(-len(pcm) % FRAME_BYTES)
    return [encoder.encode(pcm[i:i + FRAME_BYTES], FRAME_SAMPLES) for i in range(0, len(pcm), FRAME_BYTES)]


# -- RTP transport encryption (aead_xchacha20_poly1305_rtpsize) -----------------------------------

@dataclass(frozen=True)
class RtpOptions:
    """What a sender puts around the Opus frame besides the fixed header."""

    padding: int = 0  # bytes of RTP padding (P bit), 0 for none
    extension: bool = False  # a one-word header extension (X bit), like Discord clients' audio level
    csrcs: tuple[int, ...] = ()


def seal_rtp(key: bytes, counter: int, ssrc: int, seq: int, timestamp: int, payload: bytes, *,
             marker: bool = False, options: RtpOptions = RtpOptions()) -> bytes:
    """An encrypted RTP packet exactly as Discord sends one."""
    first = 0x80 | (0x20 if options.padding else 0) | (0x10 if options.extension else 0) | len(options.csrcs)
    header = _RTP.pack(first, (0x80 if marker else 0) | OPUS_PAYLOAD_TYPE, seq & 0xFFFF, timestamp & 0xFFFFFFFF,
                       ssrc)
    header += b"".join(struct.pack(">I", csrc) for csrc in options.csrcs)
    plain = payload
    if options.extension:
        header += b"\xbe\xde\x00\x01"  # one-byte header extensions, one word: in the additional data
        plain = b"\x10\x7f\x00\x00" + plain  # id 1 (audio level), one byte, then padding: encrypted
    if options.padding:
        plain += bytes(options.padding - 1) + bytes([options.padding])
    tail = struct.pack(">I", counter & 0xFFFFFFFF)
    return header + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, header, tail + _NONCE_PAD, key) + tail


def open_rtp(key: bytes, packet: bytes) -> tuple[int, int, bytes]:
    """(ssrc, sequence, Opus frame) of an encrypted RTP packet; raises nacl's CryptoError when forged."""
    first, _, seq, _, ssrc = _RTP.unpack_from(packet)
    aad_end = 12 + 4 * (first & 0x0F)
    extension_words = 0
    if first & 0x10:
        extension_words = struct.unpack_from(">H", packet, aad_end + 2)[0]
        aad_end += 4
    tail = packet[-4:]
    plain = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(packet[aad_end:-4], packet[:aad_end],
                                                              tail + _NONCE_PAD, key)
    end = len(plain) - (plain[-1] if first & 0x20 else 0)
    return ssrc, seq, plain[4 * extension_words:end]


def is_opus_rtp(datagram: bytes) -> bool:
    return len(datagram) > 12 and datagram[0] >> 6 == 2 and datagram[1] & 0x7F == OPUS_PAYLOAD_TYPE


# -- TLS --------------------------------------------------------------------------------------

def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost; returns (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own: OpenSSL finds trusted certificates by name, and a process may trust several of these.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fake discord voice {secrets.token_hex(8)}")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "voice-cert.pem", folder / "voice-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


# -- state --------------------------------------------------------------------------------------

@dataclass
class Grant:
    """What the main gateway gave a user for a call (VOICE_STATE_UPDATE + VOICE_SERVER_UPDATE)."""

    server_id: int
    user_id: int
    session_id: str
    token: str
    channel_id: int
    others: list[int] = field(default_factory=list)  # users already in the channel


@dataclass
class VoiceSession:
    """One voice session of the client: from an IDENTIFY until the websocket is gone for good.

    A RESUME attaches a new websocket to it (`resumed`); a new IDENTIFY makes a new session.
    """

    grant: Grant
    ssrc: int
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    ws: web.WebSocketResponse | None = None
    mode: str | None = None
    client_addr: tuple[str, int] | None = None  # where its UDP socket is (from IP discovery)
    described: bool = False  # op 4 sent
    resumes: int = 0
    seq: int = 0  # of the server's messages
    seq_ack: int = -1  # the last the client acknowledged
    nonce: int = 0  # of the RTP packets sent to it
    heartbeats: int = 0
    speaking: list[dict[str, Any]] = field(default_factory=list)  # the client's op 5 payloads
    closed_with: int | None = None  # the close code of its websocket, whoever closed it

    @property
    def resumed(self) -> bool:
        return self.resumes > 0

    @property
    def connected(self) -> bool:
        return self.described and self.client_addr is not None and self.ws is not None and not self.ws.closed


@dataclass
class _Speaker:
    """A user's outgoing RTP stream: one SSRC whose sequence and timestamp carry on between talk spurts."""

    ssrc: int
    seq: int = field(default_factory=lambda: secrets.randbelow(1 << 16))
    timestamp: int = field(default_factory=lambda: secrets.randbelow(1 << 32))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: FakeVoiceServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._on_datagram(data, addr)  # noqa: SLF001


# -- the server ---------------------------------------------------------------------------------

class FakeVoiceServer:
    """The voice server: `async with FakeVoiceServer() as voice: voice.trust_in_process(); ...`."""

    def __init__(self, *, heartbeat_ms: int = HEARTBEAT_MS) -> None:
        self.heartbeat_ms = heartbeat_ms
        self.sessions: list[VoiceSession] = []
        self.grants: dict[int, Grant] = {}  # user id -> their current grant
        self.packets_received = 0  # audio packets from the client, decrypted
        self.bad_packets = 0  # audio packets that failed decryption or decoding
        self.packets_sent = 0
        self.binary_frames = 0  # DAVE frames from the client (ignored)
        self._heard: list[bytes] = []
        self._loud_frames = 0
        self.first_loud_at: float | None = None  # perf_counter() of the first sound since clear_received()
        self._decoders: dict[int, discord.opus.Decoder] = {}
        self._speakers: dict[int, _Speaker] = {}
        self._ssrcs = itertools.count(1000 + secrets.randbelow(1000))
        self._changed = asyncio.Event()
        self._folder: Path | None = None
        self._cert_file: Path | None = None
        self._saved_cert_env: str | None = None
        self._runner: web.AppRunner | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self.port = 0  # the websocket's
        self.udp_port = 0

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """VOICE_SERVER_UPDATE's `endpoint` (discord.py connects to wss://{endpoint}/?v=8)."""
        return f"{HOST}:{self.port}"

    @property
    def cert_file(self) -> Path:
        assert self._cert_file is not None, "start the server first"
        return self._cert_file

    async def start(self) -> FakeVoiceServer:
        self._folder = Path(tempfile.mkdtemp(prefix="fake-voice-"))
        self._cert_file, key_file = make_certificate(self._folder)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self._cert_file, key_file)
        app = web.Application()
        app.router.add_get("/", self._websocket)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0, ssl_context=tls).start()
        self.port = self._runner.addresses[0][1]
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(HOST, 0))
        self.udp_port = self._udp.get_extra_info("sockname")[1]
        return self

    async def stop(self) -> None:
        for session in self.sessions:
            if session.ws is not None and not session.ws.closed:
                await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._saved_cert_env is not None:
            _restore_env("SSL_CERT_FILE", self._saved_cert_env or None)
            self._saved_cert_env = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    async def __aenter__(self) -> FakeVoiceServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def trust_in_process(self) -> None:
        """Make this process's aiohttp (discord.py's HTTP client) trust the certificate.

        aiohttp verifies TLS with one SSL context made at import time; the certificate is added to it
        (and stays there, harmlessly, after the server stops). ``SSL_CERT_FILE`` is set too, until
        `stop()`, for child processes: a bot run as a child trusts the server through it alone (and then
        trusts nothing else).
        """
        aiohttp.connector._SSL_CONTEXT_VERIFIED.load_verify_locations(cafile=str(self.cert_file))  # noqa: SLF001
        if self._saved_cert_env is None:
            self._saved_cert_env = os.environ.get("SSL_CERT_FILE", "")
        os.environ["SSL_CERT_FILE"] = str(self.cert_file)

    # -- what the main gateway tells it ---------------------------------------------------------

    def grant(self, *, server_id: int, user_id: int, session_id: str, channel_id: int,
              others: Iterable[int] = ()) -> Grant:
        """The user may join `channel_id`'s call: the token for VOICE_SERVER_UPDATE (kept while in that channel)."""
        current = self.grants.get(user_id)
        if current is not None and current.channel_id == channel_id and current.session_id == session_id:
            return current
        self.grants[user_id] = Grant(server_id, user_id, session_id, secrets.token_hex(8), channel_id, list(others))
        return self.grants[user_id]

    async def revoke(self, user_id: int, *, close_code: int | None = None) -> None:
        """The user left the call (or was moved out): no resume or identify with their token; `close_code`
        also closes their websocket (Discord closes with 4014 when a moderator disconnects someone)."""
        self.grants.pop(user_id, None)
        for session in self._live_sessions(user_id):
            if close_code is not None:
                await self._close(session, close_code)

    async def user_joined(self, channel_id: int, user_id: int) -> None:
        """Someone else joined the channel: op 11 to the clients in that call."""
        for session in self._sessions_in(channel_id):
            await self._send(session, CLIENTS_CONNECT, {"user_ids": [str(user_id)]})

    async def user_left(self, channel_id: int, user_id: int) -> None:
        """Someone else left the channel: op 13 to the clients in that call."""
        self._speakers.pop(user_id, None)  # back in a call, they send with a new SSRC
        for session in self._sessions_in(channel_id):
            await self._send(session, CLIENT_DISCONNECT, {"user_id": str(user_id)})

    # -- the websocket --------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=CLOSE_TIMEOUT_S)
        await ws.prepare(request)
        await ws.send_json({"op": HELLO, "d": {"v": 8, "heartbeat_interval": self.heartbeat_ms}})
        session: VoiceSession | None = None
        async for frame in ws:
            if frame.type == WSMsgType.BINARY:
                self.binary_frames += 1  # DAVE (MLS) messages: this server does not do DAVE
            elif frame.type == WSMsgType.TEXT:
                session = await self._on_message(ws, session, json.loads(frame.data))
        if session is not None and session.ws is ws and session.closed_with is None:
            session.closed_with = ws.close_code  # the client closed it
        self._notify()
        return ws

    async def _on_message(self, ws: web.WebSocketResponse, session: VoiceSession | None,
                          message: dict[str, Any]) -> VoiceSession | None:
        op, data = message.get("op"), message.get("d") or {}
        if op == IDENTIFY:
            return await self._identify(ws, data)
        if op == RESUME:
            return await self._resume(ws, data)
        if op == HEARTBEAT:
            await ws.send_json({"op": HEARTBEAT_ACK, "d": {"t": data.get("t")}})
            if session is not None:
                session.heartbeats += 1
                session.seq_ack = data.get("seq_ack", session.seq_ack)
        elif session is None:
            await ws.close(code=NOT_AUTHENTICATED, message=b"Not authenticated.")
        elif op == SELECT_PROTOCOL:
            await self._select_protocol(session, data)
        elif op == SPEAKING:
            session.speaking.append(data)
        return session

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> VoiceSession | None:
        grant = self.grants.get(int(data.get("user_id") or 0))
        if grant is None or grant.session_id != data.get("session_id") or str(grant.server_id) != data.get(
                "server_id"):
            await ws.close(code=SESSION_INVALID, message=b"Session is no longer valid.")
            return None
        if data.get("token") != grant.token:
            await ws.close(code=AUTHENTICATION_FAILED, message=b"Authentication failed.")
            return None
        session = VoiceSession(grant, next(self._ssrcs), ws=ws)
        self.sessions.append(session)
        await self._send(session, READY, {"ssrc": session.ssrc, "ip": HOST, "port": self.udp_port, "modes": MODES,
                                          "heartbeat_interval": self.heartbeat_ms, "experiments": []})
        return session

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> VoiceSession | None:
        session = next((s for s in reversed(self.sessions) if s.grant.session_id == data.get("session_id")
                        and str(s.grant.server_id) == data.get("server_id") and s.described), None)
        grant = self.grants.get(session.grant.user_id) if session is not None else None
        if session is None or grant is None or grant.token != data.get("token"):
            await ws.close(code=SESSION_INVALID, message=b"Session is no longer valid.")
            return None
        if session.ws is not None and session.ws is not ws:
            await self._close(session, 1000)
        session.ws, session.closed_with = ws, None
        session.resumes += 1
        session.seq_ack = data.get("seq_ack", session.seq_ack)
        await self._send(session, RESUMED, None)
        self._notify()
        return session

    async def _select_protocol(self, session: VoiceSession, data: dict[str, Any]) -> None:
        mode = (data.get("data") or {}).get("mode")
        if mode != XCHACHA:
            await self._close(session, UNKNOWN_MODE)
            return
        session.mode = mode
        await self._send(session, SESSION_DESCRIPTION, {
            "mode": mode, "secret_key": list(session.secret_key), "dave_protocol_version": 0,
            "audio_codec": "opus", "video_codec": None, "media_session_id": secrets.token_hex(16)})
        session.described = True
        others = [str(user_id) for user_id in session.grant.others]
        if others:
            await self._send(session, CLIENTS_CONNECT, {"user_ids": others})
        self._notify()

    async def _send(self, session: VoiceSession, op: int, data: Any) -> None:
        if session.ws is None or session.ws.closed:
            return
        session.seq += 1
        await session.ws.send_json({"op": op, "d": data, "seq": session.seq})

    async def _close(self, session: VoiceSession, code: int) -> None:
        ws = session.ws
        if ws is not None and not ws.closed:
            session.closed_with = code
            await ws.close(code=code)

    def _live_sessions(self, user_id: int | None = None) -> list[VoiceSession]:
        return [s for s in self.sessions if s.ws is not None and not s.ws.closed
                and (user_id is None or s.grant.user_id == user_id)]

    def _sessions_in(self, channel_id: int) -> list[VoiceSession]:
        return [s for s in self._live_sessions() if s.grant.channel_id == channel_id and s.described]

    # -- what a test does -----------------------------------------------------------------------

    @property
    def current(self) -> VoiceSession | None:
        """The newest session whose handshake is done and whose websocket is open."""
        return next((s for s in reversed(self.sessions) if s.connected), None)

    async def wait_connected(self, wait_s: float = WAIT_S, *, handshakes: int = 1) -> VoiceSession:
        """Wait until a client is connected (op 4 sent, IP discovered, websocket open) and return its session.

        `handshakes`: how many completed handshakes (identified sessions plus resumes) to wait for in all.
        """
        def done() -> bool:
            count = sum(1 + s.resumes for s in self.sessions if s.described)
            return self.current is not None and count >= handshakes

        await self._wait(done, wait_s, "a connected voice client")
        assert self.current is not None
        return self.current

    async def close_ws(self, code: int = 4015) -> None:
        """Close the current session's websocket with `code` (4015: the server crashed, 4006: session gone ...)."""
        session = self.current
        assert session is not None, "no connected voice client"
        await self._close(session, code)

    async def speak(self, user_id: int, pcm: bytes, *, announce: str = "first", padding: int = 0,
                    extension: bool = True, csrcs: tuple[int, ...] = ()) -> None:
        """Send `user_id`'s speech (48 kHz stereo s16le) to the client as RTP, in real time; return when sent.

        announce: "first" sends op 5 SPEAKING before the audio, "late" after the first packets (the client
        must buffer an unknown SSRC), "connect" sends op 12 {user_id, audio_ssrc} first, "none" nothing.
        Then nothing is sent: Discord clients are quiet in silence.
        """
        if announce not in ("first", "late", "connect", "none"):
            raise ValueError(f"unknown announce mode {announce!r}")
        await self.wait_connected()
        frames = await asyncio.to_thread(opus_frames, pcm)
        speaker = self._speakers.setdefault(user_id, _Speaker(next(self._ssrcs)))
        options = RtpOptions(padding=padding, extension=extension, csrcs=tuple(csrcs))
        if announce in ("first", "connect"):
            await self._announce(user_id, speaker.ssrc, announce)
            await asyncio.sleep(FRAME_S)  # the websocket message is not overtaken by the first packet
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, frame in enumerate(frames):
            if announce == "late" and index == LATE_PACKETS:
                await self._announce(user_id, speaker.ssrc, announce)
            await asyncio.sleep(max(0.0, start + index * FRAME_S - loop.time()))
            self._send_rtp(speaker, frame, marker=index == 0, options=options)
        if announce == "late" and len(frames) <= LATE_PACKETS:
            await self._announce(user_id, speaker.ssrc, announce)

    def ssrc_of(self, user_id: int) -> int | None:
        """The SSRC `user_id`'s audio has been sent with (None before they spoke)."""
        speaker = self._speakers.get(user_id)
        return speaker.ssrc if speaker is not None else None

    async def _announce(self, user_id: int, ssrc: int, how: str) -> None:
        session = self.current
        if session is None:
            return
        if how == "connect":
            await self._send(session, CLIENT_CONNECT, {"user_id": str(user_id), "audio_ssrc": ssrc, "video_ssrc": 0})
        else:
            await self._send(session, SPEAKING, {"user_id": str(user_id), "ssrc": ssrc, "speaking": 1})

    def _send_rtp(self, speaker: _Speaker, frame: bytes, *, marker: bool, options: RtpOptions) -> None:
        session = self.current
        if session is not None and self._udp is not None:  # no call right now: Discord drops the packet
            session.nonce += 1
            packet = seal_rtp(session.secret_key, session.nonce, speaker.ssrc, speaker.seq, speaker.timestamp,
                              frame, marker=marker, options=options)
            self._udp.sendto(packet, session.client_addr)
            self.packets_sent += 1
        speaker.seq = (speaker.seq + 1) & 0xFFFF
        speaker.timestamp = (speaker.timestamp + FRAME_SAMPLES) & 0xFFFFFFFF

    # -- what the client sends ----------------------------------------------------------------------

    def heard_pcm(self) -> bytes:
        """Everything the client played since the last `clear_received()`: 48 kHz stereo s16le."""
        return b"".join(self._heard)

    def heard_seconds(self, *, loud_only: bool = True) -> float:
        return (self._loud_frames if loud_only else len(self._heard)) * FRAME_S

    def clear_received(self) -> None:
        self._heard.clear()
        self._loud_frames = 0
        self.first_loud_at = None

    async def wait_for_audio(self, seconds: float, wait_s: float = WAIT_S) -> None:
        """Wait until the client played at least `seconds` of sound (not silence) since `clear_received()`."""
        await self._wait(lambda: self.heard_seconds() >= seconds, wait_s, f"{seconds} s of audio")

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) == 74 and data[:4] == b"\x00\x01\x00\x46":
            self._discover(data, addr)
        elif is_opus_rtp(data):
            self._receive_audio(data)

    def _discover(self, request: bytes, addr: tuple[str, int]) -> None:
        ssrc = struct.unpack_from(">I", request, 4)[0]
        session = next((s for s in self.sessions if s.ssrc == ssrc), None)
        if session is None or self._udp is None:
            return
        session.client_addr = addr
        reply = bytearray(74)
        struct.pack_into(">HHI", reply, 0, 2, 70, ssrc)
        reply[8:8 + len(addr[0])] = addr[0].encode("ascii")
        struct.pack_into(">H", reply, 72, addr[1])
        self._udp.sendto(bytes(reply), addr)
        self._notify()

    def _receive_audio(self, packet: bytes) -> None:
        ssrc = struct.unpack_from(">I", packet, 8)[0]
        session = next((s for s in reversed(self.sessions) if s.ssrc == ssrc and s.described), None)
        if session is None:
            self.bad_packets += 1
            return
        try:
            _, _, frame = open_rtp(session.secret_key, packet)
            pcm = self._decoders.setdefault(ssrc, discord.opus.Decoder()).decode(frame)
        except Exception:  # noqa: BLE001 - a forged or broken packet is counted, never fatal
            self.bad_packets += 1
            return
        self.packets_received += 1
        self._heard.append(pcm)
        if rms(pcm) > LOUD_RMS:
            self._loud_frames += 1
            if self.first_loud_at is None:
                self.first_loud_at = time.perf_counter()
        self._notify()

    # -- waiting ------------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()

    async def _wait(self, done: Callable[[], bool], wait_s: float, what: str) -> None:
        deadline = time.monotonic() + wait_s
        while not done():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {wait_s} s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
