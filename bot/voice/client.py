"""A discord.py `VoiceClient` that also listens.

discord.py 2.7.1 sends voice but has no receive path. Two of its own hooks are
enough to add one, with no private patching:

* ``VoiceConnectionState(voice_client, hook=...)``: the hook is an ``async``
  callable ``hook(ws, msg)`` awaited by ``DiscordVoiceWebSocket.received_message``
  after discord.py's own handling of every JSON message (``msg`` is the whole
  frame ``{"op", "d", "seq"}``; binary DAVE ops 25-31 never reach it). An
  exception raised there would propagate into the websocket poll loop (and break
  the handshake or trigger a reconnect), so this hook never raises.
* ``VoiceConnectionState.add_socket_listener(cb)``: ``cb(datagram)`` on the socket
  reader thread. The reader thread is created once per connection state and kept
  across reconnects (they only pause and resume it), so a registered listener
  survives them; only a full disconnect stops the thread and clears its
  listeners. As a guard, op 4 (every new session) re-registers the listener if it
  is somehow gone.

SSRC to user: op 5 SPEAKING ``{user_id, ssrc, speaking}`` and op 12
``{user_id, audio_ssrc}``; op 13 ``{user_id}`` means the user left.

Three reconnect bugs of discord.py 2.7.1 are worked around here (each found with the fake voice
server in tests/fakes/fake_voice.py; tests/voice/test_fake_voice.py shows each one):

1. After close code 4015 it resumes by sending gateway op 4 again and waits for VOICE_SERVER_UPDATE
   to come before VOICE_STATE_UPDATE; Discord promises no order, so it may wait out its timeout and
   leave. A resume needs no new voice state: the call is still ours, so `_ConnectionState` skips it.
2. After op 9 RESUMED it waits for a secret key on the new websocket, which only op 4 brings and a
   resume does not send: the hook hands the session's key to the new websocket.
3. After a full reconnect (4006 ...) its socket reader thread sleeps up to 30 s in select() on the
   closed socket (closing a socket does not wake a select() on Linux), so IP discovery on the new
   socket times out: `_WakingSocket.close` shuts the socket down first, which wakes it.
4. Its state changes set and at once clear an event; a waiter whose task has not started yet misses
   the change and waits out its timeout (seen when the bot is moved to another channel while a
   message is in flight: it leaves instead of following). `_wait_for_state` checks the state itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import discord
from discord.voice_state import ConnectionFlowState, VoiceConnectionState

from bot.voice.receiver import VoiceReceiver

__all__ = ["ListeningVoiceClient"]

_log = logging.getLogger(__name__)

OP_SESSION_DESCRIPTION = 4
OP_SPEAKING = 5
OP_CLIENTS_CONNECT = 11
OP_CLIENT_CONNECT = 12
OP_CLIENT_DISCONNECT = 13
OP_RESUMED = 9
CLOSE_AFTER_SHUTDOWN_S = 0.5  # time for the socket reader to leave select() before the fd goes away
STATE_POLL_S = 0.05  # how often a connection state wait looks again (bug 4)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class _WakingSocket(socket.socket):
    """A UDP socket whose close wakes discord.py's socket reader, blocked in select() on it (bug 3)."""

    __slots__ = ()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)
        closer = threading.Timer(CLOSE_AFTER_SHUTDOWN_S, super().close)  # the reader's fd stays valid till then
        closer.daemon = True
        closer.start()


class _ConnectionState(VoiceConnectionState):
    """discord.py's connection state with bugs 1, 3 and 4 worked around (see the module docstring)."""

    async def _wait_for_state(self, state: ConnectionFlowState, *other_states: ConnectionFlowState,
                              timeout: float | None = None) -> None:  # noqa: ASYNC109 - discord.py's signature
        states = (state, *other_states)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.state not in states:
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"voice connection state still {self.state.name}")
            await asyncio.sleep(STATE_POLL_S)

    def _create_socket(self) -> None:  # as discord.py's own, with a socket whose close wakes the reader
        self.socket = _WakingSocket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        self._socket_reader.resume()

    async def _voice_connect(self, *, self_deaf: bool = False, self_mute: bool = False) -> None:
        if self.state is ConnectionFlowState.connected:  # resuming after 4015: the call is still ours
            self.state = ConnectionFlowState.got_both_voice_updates
            return
        await super()._voice_connect(self_deaf=self_deaf, self_mute=self_mute)


class ListeningVoiceClient(discord.VoiceClient):
    """`discord.VoiceClient` plus a receive path: `listen(on_frame)` / `stop_listening()`."""

    on_user_disconnect: Callable[[int], None] | None = None
    on_speaking: Callable[[int, bool], None] | None = None

    def __init__(self, client: discord.Client, channel: discord.abc.Connectable) -> None:
        self._receiver: VoiceReceiver | None = None
        self._listening = False
        super().__init__(client, channel)

    def create_connection_state(self) -> VoiceConnectionState:
        return _ConnectionState(self, hook=self._hook)

    # ------------------------------------------------------------ listening

    @property
    def receiver(self) -> VoiceReceiver | None:
        return self._receiver

    def listen(self, on_frame: Callable[[int, bytes], None]) -> VoiceReceiver:
        """Start receiving: ``on_frame(user_id, pcm)`` on the event loop, 20 ms of 48 kHz stereo s16le each."""
        self.stop_listening()
        receiver = VoiceReceiver(lambda: self._connection, on_frame, self.loop)
        self._receiver = receiver
        self._connection.add_socket_listener(receiver.feed)
        self._listening = True
        return receiver

    def stop_listening(self) -> None:
        """Stop receiving; safe before `listen` and twice. The receiver object stays readable."""
        receiver = self._receiver
        if receiver is None or not self._listening:
            return
        self._listening = False
        try:
            self._connection.remove_socket_listener(receiver.feed)
        except Exception:
            _log.debug("voice: removing the socket listener failed", exc_info=True)

    def _ensure_listener(self) -> None:
        receiver = self._receiver
        if receiver is None or not self._listening:
            return
        reader = getattr(self._connection, "_socket_reader", None)
        callbacks = getattr(reader, "_callbacks", None)
        if callbacks is not None and receiver.feed not in callbacks:
            _log.info("voice: socket listener was dropped; registering it again")
            self._connection.add_socket_listener(receiver.feed)

    # ------------------------------------------------------------ websocket hook

    async def _hook(self, ws: Any, msg: dict[str, Any]) -> None:
        try:
            if msg.get("op") == OP_RESUMED:  # bug 2: the session, and its key, go on
                ws.secret_key = self._connection.secret_key
            self._handle_ws(msg)
        except Exception:
            _log.exception("voice: error handling websocket op %r", msg.get("op") if isinstance(msg, dict) else msg)

    def _handle_ws(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        data = msg.get("d") or {}
        receiver = self._receiver
        if op == OP_SESSION_DESCRIPTION:
            if receiver is not None:
                receiver.reset()
                self._ensure_listener()
        elif op == OP_SPEAKING:
            user_id, ssrc = _int(data.get("user_id")), _int(data.get("ssrc"))
            if user_id is None:
                return
            if receiver is not None and ssrc:
                receiver.map_ssrc(ssrc, user_id)
            if self.on_speaking is not None:
                self.on_speaking(user_id, bool(data.get("speaking")))
        elif op == OP_CLIENT_CONNECT:
            user_id, ssrc = _int(data.get("user_id")), _int(data.get("audio_ssrc"))
            if receiver is not None and user_id is not None and ssrc:
                receiver.map_ssrc(ssrc, user_id)
        elif op == OP_CLIENTS_CONNECT:
            _log.debug("voice: clients connected: %s", data.get("user_ids"))
        elif op == OP_CLIENT_DISCONNECT:
            user_id = _int(data.get("user_id"))
            if user_id is None:
                return
            if receiver is not None:
                receiver.forget_user(user_id)
            if self.on_user_disconnect is not None:
                self.on_user_disconnect(user_id)
