"""A local fake Discord: REST under `api_base` and a gateway websocket at `gateway_url`, on loopback.

Point discord.py at it with DISCORD_API_BASE=`api_base` and DISCORD_GATEWAY_URL=`gateway_url` (the
app sets `discord.http.Route.BASE` and `DiscordWebSocket.DEFAULT_GATEWAY`) and the real client runs
its real network path: login (GET /users/@me), application info, command sync (bulk PUT), the
gateway (HELLO, IDENTIFY -> READY + GUILD_CREATE, heartbeats), then REST for everything it does.

Shards (the gateway is tests/fakes/discord_gateway.py): `FakeDiscord(shards=N)` makes GET /gateway/bot
recommend N shards; every IDENTIFY `shard: [id, count]` gets its own session (a second IDENTIFY of a shard
replaces it), READY and GUILD_CREATE carry only that shard's guilds, and an event goes only to the shard
owning its guild (shard 0 without one), as Discord does. Several bot processes, each running some shards,
share one fake: `shard_of()` (or `world.guild_shard(count)`) says which one gets the guild,
`identified_shards` which shards have a session, `session(shard_id)` a shard's session. With more
guilds (`world.add_guilds()`, before the bot connects) each shard gets its own; `listen_again()` gives
each process an address of its own, so every recorded call's `port` says which process made it.

The test plays the users: `user_says()` dispatches MESSAGE_CREATE (with attachments served by this
server), `slash()` an application-command INTERACTION_CREATE built from the synced commands,
`press()` a button. Every REST call is recorded (`calls`) with its body, files and time, and
`wait_for_call()` waits for one; created messages are echoed through the gateway like Discord does.

Voice: the guild has voice channels (`world.voice_channel_id`); `user_joins_voice()` /
`user_leaves_voice()` dispatch users' VOICE_STATE_UPDATEs (the states are in GUILD_CREATE too), and
the bot's gateway op 4 VOICE_STATE_UPDATE is answered like Discord does: its VOICE_STATE_UPDATE (with
the session id of the shard that sent op 4) and a VOICE_SERVER_UPDATE whose token and endpoint lead to the
`FakeVoiceServer` given as `voice` (without one, the endpoint is null: no voice server allocated).
`move_bot()` moves or disconnects the bot as a moderator would.

Chaos: `limits` (tests/fakes/discord_chaos.py) answers chosen routes with Discord's 429s; the gateway
keeps each shard session's events, so `drop_gateway()` (close 4000 or a dropped socket; every shard, or
`shard=n`) is followed by a real RESUME that replays what that shard missed (from `replay_from` when set,
to redeliver events it had).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import discord
import yarl
from aiohttp import web

from tests.fakes.discord_chaos import RateLimiter
from tests.fakes.discord_gateway import HEARTBEAT_MS, Gateway
from tests.fakes.discord_payloads import World, attachment_payload, message_payload, option_payloads
from tests.fakes.discord_rest import API, CALL, RestRoutes, discord_error

if TYPE_CHECKING:
    from tests.fakes.fake_voice import FakeVoiceServer

HOST = "127.0.0.1"
WAIT_S = 10.0
ATTACHMENT_LIMIT = 10 * 1024 * 1024  # what Discord allows a server without boosts
VOICE_DISCONNECTED_CLOSE = 4014


@dataclass
class Upload:
    """One file of a multipart request."""

    part: str  # the form field, e.g. files[0]
    filename: str
    content_type: str
    data: bytes


@dataclass
class RestCall:
    """One REST request the bot made: what, with which body and files, and when (perf_counter)."""

    method: str
    path: str  # without the API prefix, e.g. /webhooks/1/abc
    query: dict[str, str]
    json: Any = None
    files: list[Upload] = field(default_factory=list)
    multipart: bool = False
    at: float = 0.0
    done_at: float = 0.0
    status: int = 0
    response: Any = None  # the JSON answered
    authed: bool = False  # sent with the bot's token (webhooks by token and callbacks go without)
    port: int = 0  # the server's port it came in on (see FakeDiscord.listen_again)


@dataclass
class Attachment:
    """A file a fake user attaches to a message."""

    filename: str
    content_type: str
    data: bytes
    voice: bool = False


class FakeDiscord(Gateway, RestRoutes):
    """The fake server. `await start()`, point the bot at `api_base`/`gateway_url`, `await stop()`."""

    def __init__(self, token: str = "fake-bot-token", *, heartbeat_ms: int = HEARTBEAT_MS,
                 echo: bool = True, voice: FakeVoiceServer | None = None, shards: int = 1) -> None:
        super().__init__()  # the gateway's sessions and records (tests/fakes/discord_gateway.py)
        self.token = token
        self.shards = shards  # what GET /gateway/bot recommends
        self.voice = voice
        # Discord does not promise an order for the bot's VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE.
        self.voice_server_update_first = False
        self.heartbeat_ms = heartbeat_ms
        self.echo = echo  # Discord echoes every message, webhook posts included, through the gateway
        self.world = World()
        self.messages: dict[int, dict[str, Any]] = {}
        self.webhooks: dict[int, dict[str, Any]] = {}
        self.commands: list[dict[str, Any]] = []
        self.refuse_command_sync = False  # answer the bulk command overwrite with 403 Missing Access
        self.interactions: dict[str, dict[str, Any]] = {}
        self.blobs: dict[str, tuple[str, bytes]] = {}
        self.calls: list[RestCall] = []
        self.limits = RateLimiter()  # 429 storms a test sets up (tests/fakes/discord_chaos.py)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def http_base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_base(self) -> str:
        """What DISCORD_API_BASE should be."""
        return self.http_base + API

    @property
    def gateway_url(self) -> str:
        """What DISCORD_GATEWAY_URL should be."""
        return f"ws://{HOST}:{self.port}/gateway"

    async def start(self) -> FakeDiscord:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        self.add_rest_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def listen_again(self) -> str:
        """Serve on one more port as well, and return that port's API base (for DISCORD_API_BASE): give each of
        several bot processes its own, and a call's `port` tells which process made it."""
        assert self._runner is not None, "start() first"
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        return f"http://{HOST}:{self._runner.addresses[-1][1]}{API}"

    async def stop(self) -> None:
        await self._close_gateway()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- recording -----------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if not request.path.startswith(API):
            return await handler(request)
        call = RestCall(request.method, request.path.removeprefix(API), dict(request.query), at=time.perf_counter(),
                        port=request.url.port or 0)
        auth = request.headers.get("Authorization")
        if (auth is None and not _tokenless(call.path)) or (auth is not None and auth != f"Bot {self.token}"):
            return discord_error(401, 0, "401: Unauthorized")
        call.authed = auth is not None
        await _read_body(request, call)
        request[CALL] = call
        try:
            response = self.limits.check(call) or await handler(request)
        except web.HTTPNotFound:
            response = discord_error(404, 0, "404: Not Found")
        call.status, call.done_at = response.status, time.perf_counter()
        if isinstance(response, web.Response) and response.content_type == "application/json" and response.body:
            call.response = json.loads(response.body)
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()
        return response

    def calls_to(self, method: str, prefix: str) -> list[RestCall]:
        """Recorded calls with this method whose path starts with `prefix`."""
        return [c for c in self.calls if c.method == method and c.path.startswith(prefix)]

    def webhook_calls(self) -> list[RestCall]:
        """Calls that execute or edit a channel webhook (persona messages), not interaction follow-ups."""
        return [c for c in self.calls if c.path.startswith("/webhooks/")
                and not c.path.startswith(f"/webhooks/{self.world.application_id}/") and c.method != "DELETE"]

    async def wait_for_call(self, match: Callable[[RestCall], bool], *, wait_s: float = WAIT_S,
                            since: int = 0) -> RestCall:
        """The first recorded call (from index `since`) that `match`es, waiting for it if needed."""
        def found() -> RestCall | None:
            return next((c for c in self.calls[since:] if match(c)), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), wait_s)
        call = found()
        assert call is not None
        return call

    # -- the test plays the users --------------------------------------------------------------

    async def user_says(self, content: str, *, channel_id: int | None = None, user_id: int | None = None,
                        attachments: list[Attachment] = (), reference_id: int | None = None) -> dict[str, Any]:
        """A user posts a message: MESSAGE_CREATE through the gateway. Returns the message payload."""
        channel_id = channel_id or self.world.story_channel_id
        user_id = user_id or self.world.user_id
        message_id = self.world.ids.next()
        files = []
        for item in attachments:
            attachment_id = self.world.ids.next()
            path = f"/attachments/{channel_id}/{attachment_id}/{item.filename}"
            self.blobs[path] = (item.content_type, item.data)
            files.append(attachment_payload(attachment_id, item.filename, item.content_type, len(item.data),
                                            self.http_base + path, voice=item.voice))
        flags = 1 << 13 if any(a.voice for a in attachments) else 0  # IS_VOICE_MESSAGE
        message = message_payload(self.world, message_id, channel_id, self.world.users()[user_id], content,
                                  member=self.world.member(user_id, self.world.guild_of(channel_id)), attachments=files,
                                  reference_id=reference_id, flags=flags)
        self.messages[message_id] = message
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def slash(self, command: str, *, channel_id: int | None = None, user_id: int | None = None,
                    **options: Any) -> dict[str, Any]:
        """A user runs `/command sub ...` with options: INTERACTION_CREATE. Returns the interaction."""
        name, *path = command.split()
        definition = next((c for c in self.commands if c["name"] == name), None)
        if definition is None:
            raise KeyError(f"/{name} was not synced (synced: {sorted(c['name'] for c in self.commands)})")
        data = {"id": definition["id"], "name": name, "type": definition.get("type", 1),
                "options": option_payloads(definition, path, options),
                "guild_id": str(self.world.guild_of(channel_id or self.world.story_channel_id))}
        return await self._interact(2, data, channel_id, user_id)

    async def press(self, message_id: int, custom_id: str, *, user_id: int | None = None) -> dict[str, Any]:
        """A user presses a button on a message: a component INTERACTION_CREATE."""
        message = self.messages[message_id]
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._interact(3, data, int(message["channel_id"]), user_id, message=message)

    async def _interact(self, kind: int, data: dict[str, Any], channel_id: int | None, user_id: int | None,
                        message: dict[str, Any] | None = None) -> dict[str, Any]:
        channel_id = channel_id or self.world.story_channel_id
        user_id = user_id or self.world.user_id
        guild_id = self.world.guild_of(channel_id)
        token = secrets.token_urlsafe(24)
        permissions = str(self.world.permissions_of(user_id))
        interaction: dict[str, Any] = {
            "id": str(self.world.ids.next()), "application_id": str(self.world.application_id), "type": kind,
            "data": data, "guild_id": str(guild_id), "channel_id": str(channel_id),
            "channel": self.world.channel(channel_id),
            "member": {**self.world.member_with_user(user_id, guild_id), "permissions": permissions},
            "token": token, "version": 1, "locale": "en-US", "guild_locale": "en-US", "entitlements": [],
            "attachment_size_limit": ATTACHMENT_LIMIT,
            "app_permissions": str(self.world.permissions_of(self.world.bot_id)),
            "authorizing_integration_owners": {"0": str(guild_id)}, "context": 0,
        }
        if message is not None:
            interaction["message"] = message
        self.interactions[token] = interaction
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    # -- voice -------------------------------------------------------------------------------------

    async def user_joins_voice(self, user_id: int, channel_id: int | None = None) -> None:
        """A user joins (or moves to) a voice channel: their VOICE_STATE_UPDATE, and op 11 in that call."""
        channel_id = channel_id or self.world.voice_channel_id
        before = self.world.voice_channel_of(user_id)
        await self._set_voice_state(user_id, channel_id, secrets.token_hex(16))
        if self.voice is not None:
            if before is not None and before != channel_id:
                await self.voice.user_left(before, user_id)
            await self.voice.user_joined(channel_id, user_id)

    async def user_leaves_voice(self, user_id: int) -> None:
        """A user hangs up: VOICE_STATE_UPDATE with no channel, and op 13 in the call they left."""
        before = self.world.voice_channel_of(user_id)
        if before is None:
            return
        await self._set_voice_state(user_id, None, self.world.voice_states[user_id]["session_id"])
        if self.voice is not None:
            await self.voice.user_left(before, user_id)

    async def move_bot(self, channel_id: int | None) -> None:
        """A moderator moves the bot to another voice channel, or disconnects it (None)."""
        bot = self.world.bot_id
        session_id = self._guild_session_id(self.world.guild_id)  # the shard owning the guild
        if channel_id is not None:
            await self._bot_voice_state(channel_id, session_id)
            return
        if self.voice is not None:  # the voice server drops the call, the gateway says so
            await self.voice.revoke(bot, close_code=VOICE_DISCONNECTED_CLOSE)
        await self._set_voice_state(bot, None, session_id)

    async def _bot_voice_state(self, channel_id: int | None, session_id: str, *, self_mute: bool = False,
                               self_deaf: bool = False) -> None:
        """The bot's op 4 (or a move): its VOICE_STATE_UPDATE with the session id of the gateway session that
        asked, then the voice server to use when it joined."""
        bot = self.world.bot_id
        if channel_id is None:
            if self.world.voice_channel_of(bot) is not None:
                await self._set_voice_state(bot, None, session_id)
            if self.voice is not None:
                await self.voice.revoke(bot)
            return
        server = self._voice_server(channel_id, session_id)
        if self.voice_server_update_first:
            await self.dispatch("VOICE_SERVER_UPDATE", server)
        await self._set_voice_state(bot, channel_id, session_id, self_mute=self_mute, self_deaf=self_deaf)
        if not self.voice_server_update_first:
            await self.dispatch("VOICE_SERVER_UPDATE", server)

    def _voice_server(self, channel_id: int, session_id: str) -> dict[str, Any]:
        """VOICE_SERVER_UPDATE for the bot joining `channel_id`: a token the voice server accepts, its endpoint."""
        guild_id = self.world.guild_id
        if self.voice is None:
            return {"token": secrets.token_hex(8), "guild_id": str(guild_id), "endpoint": None}
        others = [u for u in self.world.users_in_voice(channel_id) if u != self.world.bot_id]
        grant = self.voice.grant(server_id=guild_id, user_id=self.world.bot_id, session_id=session_id,
                                 channel_id=channel_id, others=others)
        return {"token": grant.token, "guild_id": str(guild_id), "endpoint": self.voice.endpoint}

    async def _set_voice_state(self, user_id: int, channel_id: int | None, session_id: str, **flags: bool) -> None:
        state = self.world.voice_state(user_id, channel_id, session_id, **flags)
        if channel_id is None:
            self.world.voice_states.pop(user_id, None)
        else:
            self.world.voice_states[user_id] = state
        await self.dispatch("VOICE_STATE_UPDATE", state)

    def delete_webhook(self, channel_id: int) -> None:
        """Someone deletes the channel's webhooks behind the bot's back (next use: 10015)."""
        for hook_id in [i for i, h in self.webhooks.items() if h["channel_id"] == str(channel_id)]:
            del self.webhooks[hook_id]


def _tokenless(path: str) -> bool:
    # Webhook execution and interaction callbacks are authorised by the token in their URL.
    return path.startswith(("/webhooks/", "/interactions/"))


async def _read_body(request: web.Request, call: RestCall) -> None:
    """JSON bodies, and multipart ones (payload_json + files[n]) the way discord.py sends files."""
    if request.content_type == "application/json":
        call.json = await request.json()
    elif request.content_type.startswith("multipart/"):
        call.multipart = True
        form = await request.post()
        for name, value in form.items():
            if isinstance(value, web.FileField):
                call.files.append(Upload(name, value.filename, value.content_type, value.file.read()))
            elif name == "payload_json":
                call.json = json.loads(value)


@contextlib.asynccontextmanager
async def plain_client(server: FakeDiscord, wait_s: float = WAIT_S) -> AsyncIterator[discord.Client]:
    """A plain discord.py client logged in to `server` (REST and gateway) and ready; closed after.

    discord.py's REST base and gateway URL are process-wide: they point at `server` while the client
    runs and are put back after.
    """
    saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = server.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(server.gateway_url)
    # The fake sends GUILD_CREATE right after READY: no need to wait discord.py's default 2 s for more guilds.
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.1)
    runner = asyncio.create_task(client.start(server.token))
    try:
        await asyncio.wait_for(client.wait_until_ready(), wait_s)
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(runner, wait_s)
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved
