"""The fake Discord's gateway websocket, sharded the way Discord shards it (mixed into FakeDiscord).

HELLO, then IDENTIFY -> READY + GUILD_CREATE, heartbeats (ACKed), RESUME, and `dispatch()` of events.

Shards: IDENTIFY's `shard: [shard_id, shard_count]` (absent: [0, 1]) picks the shard; each
(shard_id, shard_count) has its own `ShardSession` (session id, sequence numbers, the events it was
sent, kept for RESUME, and its sockets). A guild belongs to shard (guild_id >> 22) % shard_count
(`shard_of()`); READY lists only that shard's guilds and each guild's GUILD_CREATE goes only to its owner. An
event whose data has a `guild_id` goes only to the sessions whose shard owns that guild; an event
without one (a DM) goes to shard 0. An event for a session with no socket is kept for its RESUME.
A second IDENTIFY for the same shard replaces its session: the old session's sockets get no more
events and its session id no longer resumes. A shard id outside the count is closed with 4010.

What a test reads: `identifies` and `resumes` (payloads, every shard), `heartbeats`, `dispatched`
((event, data, perf_counter) of every dispatch), `seq` (shard 0's last sequence number),
`identified_shards` ([(shard_id, shard_count)] of the live sessions), `session(shard_id)`.
What it sets: `replay_from` (the next RESUME replays from there, as Discord's at-least-once delivery
may). What it does: `drop_gateway(code, shard=None)` (every shard's sockets, or one shard's).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from tests.fakes.discord_payloads import World

HEARTBEAT_MS = 41250
# Gateway opcodes.
DISPATCH, HEARTBEAT, IDENTIFY, VOICE_STATE_UPDATE, RESUME, INVALID_SESSION, HELLO, HEARTBEAT_ACK = (
    0, 1, 2, 4, 6, 9, 10, 11)
AUTH_FAILED_CLOSE = 4004
INVALID_SHARD_CLOSE = 4010


def shard_of(guild_id: int, shard_count: int) -> int:
    """Discord's rule: the shard that receives a guild's events."""
    return (guild_id >> 22) % shard_count


@dataclass(eq=False)
class ShardSession:
    """One shard's gateway session: what RESUME needs (its id, its events by sequence) and where it is read."""

    shard_id: int
    shard_count: int
    session_id: str = field(default_factory=lambda: secrets.token_hex(16))
    seq: int = 0  # the sequence number of the last event of this session
    sent: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # (seq, event, data), to replay
    sockets: list[web.WebSocketResponse] = field(default_factory=list)  # empty while the bot is away

    @property
    def key(self) -> tuple[int, int]:
        return self.shard_id, self.shard_count

    def owns(self, guild_id: int | None) -> bool:
        """Whether this shard gets the guild's events (no guild, e.g. a DM: shard 0)."""
        return self.shard_id == (0 if guild_id is None else shard_of(guild_id, self.shard_count))

    def record(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """The next event of this session, kept for RESUME; returns the frame to send."""
        self.seq += 1
        self.sent.append((self.seq, event, data))
        return {"op": DISPATCH, "t": event, "s": self.seq, "d": data}


class Gateway:
    """The gateway half of FakeDiscord: `_gateway` is the websocket handler at /gateway."""

    token: str
    world: World
    gateway_url: str
    heartbeat_ms: int
    shards: int  # what GET /gateway/bot recommends

    def __init__(self) -> None:
        self.identifies: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []  # the RESUME payloads the bot sent
        self.heartbeats = 0
        self.dispatched: list[tuple[str, dict[str, Any], float]] = []  # (event, data, perf_counter)
        # On RESUME, replay from this sequence number instead of the client's (None: the client's), the way
        # Discord sometimes redelivers events the client already had (at-least-once delivery).
        self.replay_from: int | None = None
        self._sessions: dict[tuple[int, int], ShardSession] = {}  # (shard_id, shard_count) -> live session
        self._connections: set[web.WebSocketResponse] = set()  # every open gateway socket

    async def _bot_voice_state(self, channel_id: int | None, session_id: str, *, self_mute: bool = False,
                               self_deaf: bool = False) -> None:  # implemented by FakeDiscord
        raise NotImplementedError

    # -- what a test reads -------------------------------------------------------------------------

    def shard_of(self, guild_id: int | None = None, shard_count: int | None = None) -> int:
        """The shard owning `guild_id` (default: the world's guild) among `shard_count` (default: `shards`)."""
        return shard_of(guild_id or self.world.guild_id, shard_count or self.shards)

    @property
    def identified_shards(self) -> list[tuple[int, int]]:
        """(shard_id, shard_count) of every live session, connected or waiting for its RESUME."""
        return sorted(self._sessions)

    def session(self, shard_id: int = 0, shard_count: int | None = None) -> ShardSession | None:
        """The live session of a shard (the latest identified when several counts run at once)."""
        found = [s for s in self._sessions.values()
                 if s.shard_id == shard_id and shard_count in (None, s.shard_count)]
        return found[-1] if found else None

    @property
    def seq(self) -> int:
        """The sequence number of the last event sent to shard 0 (`session(n).seq` for shard n)."""
        session = self.session(0)
        return session.seq if session is not None else 0

    def _guild_session_id(self, guild_id: int) -> str:
        """The session id of the (latest) session owning the guild: the bot's voice states carry it."""
        owners = [s for s in self._sessions.values() if s.owns(guild_id)]
        return owners[-1].session_id if owners else ""

    # -- the websocket -----------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._connections.add(ws)
        await ws.send_json({"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_ms}, "s": None, "t": None})
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                await self._on_gateway_message(ws, json.loads(frame.data))
        finally:
            self._connections.discard(ws)
            for session in self._sessions.values():
                with contextlib.suppress(ValueError):
                    session.sockets.remove(ws)
        return ws

    def _session_of(self, ws: web.WebSocketResponse) -> ShardSession | None:
        return next((s for s in self._sessions.values() if ws in s.sockets), None)

    async def _on_gateway_message(self, ws: web.WebSocketResponse, payload: dict[str, Any]) -> None:
        op = payload.get("op")
        if op == HEARTBEAT:
            self.heartbeats += 1
            await ws.send_json({"op": HEARTBEAT_ACK})
        elif op == IDENTIFY:
            await self._identify(ws, payload["d"])
        elif op == VOICE_STATE_UPDATE and (session := self._session_of(ws)) is not None:
            data = payload["d"]
            channel_id = int(data["channel_id"]) if data.get("channel_id") else None
            await self._bot_voice_state(channel_id, session.session_id, self_mute=bool(data.get("self_mute")),
                                        self_deaf=bool(data.get("self_deaf")))
        elif op == RESUME:
            await self._resume(ws, payload["d"])

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        """A new session for the shard (replacing its old one): READY with the shard's guilds, their GUILD_CREATE."""
        self.identifies.append(data)
        if data.get("token") != self.token:
            await ws.close(code=AUTH_FAILED_CLOSE, message=b"Authentication failed.")
            return
        shard_id, shard_count = data.get("shard") or (0, 1)
        if not 0 <= shard_id < shard_count:
            await ws.close(code=INVALID_SHARD_CLOSE, message=b"Invalid shard.")
            return
        session = ShardSession(shard_id, shard_count, sockets=[ws])
        self._sessions.pop(session.key, None)  # the old session is over: no more events, no RESUME
        self._sessions[session.key] = session
        ready = self.world.ready(session.session_id, self.gateway_url, shard=session.key)
        await ws.send_json(session.record("READY", ready))
        for guild_id in self.world.shard_guilds(shard_id, shard_count):
            await ws.send_json(session.record("GUILD_CREATE", self.world.guild(guild_id)))

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        """Discord's RESUME of the shard session with that id: the events it missed after the client's `seq`
        (or `replay_from`), in order with their own sequence numbers, then RESUMED; an unknown one is invalid."""
        self.resumes.append(data)
        session = next((s for s in self._sessions.values() if s.session_id == data.get("session_id")), None)
        if data.get("token") != self.token or session is None:
            await ws.send_json({"op": INVALID_SESSION, "d": False})
            return
        start = self.replay_from if self.replay_from is not None else int(data.get("seq") or 0)
        self.replay_from = None
        for seq, event, event_data in [e for e in session.sent if e[0] > start]:
            await ws.send_json({"op": DISPATCH, "t": event, "s": seq, "d": event_data})
        session.sockets.append(ws)
        await ws.send_json(session.record("RESUMED", {}))

    # -- events ------------------------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a gateway event to the shard(s) owning its guild, shard 0 without one (REST echoes use it too).
        While that shard's session is disconnected, the event is kept for its RESUME, as Discord does."""
        self.dispatched.append((event, data, time.perf_counter()))
        guild_id = int(data["guild_id"]) if data.get("guild_id") else None
        for session in [s for s in self._sessions.values() if s.owns(guild_id)]:
            frame = session.record(event, data)
            for ws in list(session.sockets):
                with contextlib.suppress(ConnectionResetError):  # closing: the event waits for the RESUME
                    await ws.send_json(frame)

    async def drop_gateway(self, code: int | None = 4000, shard: int | None = None) -> None:
        """Disconnect the bot's gateway, every shard or shard `shard`: close with `code` (4000, unknown error:
        the client may resume) or, with None, drop the connection without a close frame. The sessions stay
        resumable."""
        sockets = []
        for session in self._sessions.values():
            if shard is None or session.shard_id == shard:
                sockets += session.sockets
                session.sockets = []
        for ws in sockets:
            if code is None:
                transport = ws._req.transport if ws._req is not None else None  # noqa: SLF001
                if transport is not None:
                    transport.abort()
            else:
                await ws.close(code=code, message=b"Unknown error")

    async def _close_gateway(self) -> None:
        for ws in list(self._connections):
            await ws.close()
