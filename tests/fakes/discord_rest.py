"""The REST half of the fake Discord: the routes discord.py calls, answering like API v10.

A mixin of `FakeDiscord` (tests/fakes/fake_discord.py), which owns the state it uses: `world`,
`messages`, `webhooks`, `commands`, `interactions`, `blobs` and `dispatch()`. It checks what real
Discord checks where a bot could get it wrong (2000-character content, empty messages, webhook
names with "clyde"/"discord", answering an interaction twice, unknown webhooks and messages, the
shape of voice messages) and echoes created/edited/deleted messages through the gateway as Discord does.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import secrets
from typing import Any

from aiohttp import web

from tests.fakes.discord_payloads import World, attachment_payload, message_payload

API = "/api/v10"
MAX_CONTENT = 2000
EPHEMERAL = 64
VOICE_MESSAGE = 1 << 13  # IS_VOICE_MESSAGE
WAVEFORM_LIMIT = 256  # one-byte samples
_ATTACHMENT_METADATA = ("description", "duration_secs", "waveform")  # what payload_json may say of a file
_FORBIDDEN_WEBHOOK_WORDS = ("clyde", "discord")
# Interaction callback types (Discord docs: Interaction Response Type).
CALLBACK_MESSAGE, CALLBACK_DEFERRED, CALLBACK_UPDATE = 4, 5, 7


CALL = web.RequestKey("call", "RestCall")  # the recorded call of the request being handled


def json_response(data: Any, status: int = 200) -> web.Response:
    """JSON with exactly `Content-Type: application/json`, as Discord sends it (discord.py checks)."""
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


def discord_error(status: int, code: int, message: str) -> web.Response:
    """Discord's JSON error shape."""
    return json_response({"message": message, "code": code}, status=status)


class RestRoutes:
    """Route handlers; `self` is the FakeDiscord that holds the state."""

    world: World
    messages: dict[int, dict[str, Any]]
    webhooks: dict[int, dict[str, Any]]
    commands: list[dict[str, Any]]
    interactions: dict[str, dict[str, Any]]
    blobs: dict[str, tuple[str, bytes]]
    http_base: str
    gateway_url: str
    token: str
    shards: int  # the shard count GET /gateway/bot recommends
    echo: bool
    refuse_command_sync: bool
    refuse_webhook_voice: bool = False  # answer voice messages sent through a webhook with 400 (to test fallbacks)

    def add_rest_routes(self, app: web.Application) -> None:
        add = app.router.add_route
        add("GET", f"{API}/gateway", self._gateway_info)
        add("GET", f"{API}/gateway/bot", self._gateway_info)
        add("GET", f"{API}/users/@me", self._me)
        add("GET", f"{API}/oauth2/applications/@me", self._application)
        add("GET", f"{API}/applications/{{app}}/commands", self._get_commands)
        add("PUT", f"{API}/applications/{{app}}/commands", self._put_commands)
        add("PUT", f"{API}/applications/{{app}}/guilds/{{guild}}/commands", self._put_commands)
        add("POST", f"{API}/channels/{{channel}}/messages", self._create_message)
        add("GET", f"{API}/channels/{{channel}}/messages/{{message}}", self._get_message)
        add("PATCH", f"{API}/channels/{{channel}}/messages/{{message}}", self._edit_message)
        add("DELETE", f"{API}/channels/{{channel}}/messages/{{message}}", self._delete_message)
        add("POST", f"{API}/channels/{{channel}}/typing", self._no_content)
        add("PUT", f"{API}/channels/{{channel}}/messages/{{message}}/reactions/{{emoji}}/@me", self._no_content)
        add("GET", f"{API}/channels/{{channel}}/webhooks", self._list_webhooks)
        add("POST", f"{API}/channels/{{channel}}/webhooks", self._create_webhook)
        add("DELETE", f"{API}/webhooks/{{hook}}", self._delete_webhook)
        add("POST", f"{API}/webhooks/{{hook}}/{{token}}", self._execute_webhook)
        add("GET", f"{API}/webhooks/{{hook}}/{{token}}/messages/{{message}}", self._get_webhook_message)
        add("PATCH", f"{API}/webhooks/{{hook}}/{{token}}/messages/{{message}}", self._edit_webhook_message)
        add("DELETE", f"{API}/webhooks/{{hook}}/{{token}}/messages/{{message}}", self._delete_webhook_message)
        add("POST", f"{API}/interactions/{{interaction}}/{{token}}/callback", self._interaction_callback)
        add("GET", "/attachments/{channel}/{attachment}/{filename}", self._attachment)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:  # implemented by FakeDiscord
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------

    def _body(self, request: web.Request) -> dict[str, Any]:
        return request[CALL].json or {}

    def _attachments_from(self, request: web.Request, channel_id: int) -> list[dict[str, Any]]:
        """Uploaded files become attachments served by this server (as Discord's CDN would).

        What `payload_json.attachments` says of `files[n]` (entry with id n: description, and a voice
        message's duration_secs and waveform) is kept on the attachment, as Discord does.
        """
        said = {str(a.get("id")): a for a in (self._body(request).get("attachments") or []) if isinstance(a, dict)}
        out = []
        for index, upload in enumerate(request[CALL].files):
            attachment_id = self.world.ids.next()
            path = f"/attachments/{channel_id}/{attachment_id}/{upload.filename}"
            # discord.py uploads everything as application/octet-stream; Discord infers the type.
            content_type = mimetypes.guess_type(upload.filename)[0] or upload.content_type
            self.blobs[path] = (content_type, upload.data)
            attachment = attachment_payload(attachment_id, upload.filename, content_type, len(upload.data),
                                            self.http_base + path)
            meta = said.get(str(index), {})  # discord.py gives files[n] the id n
            attachment.update({key: meta[key] for key in _ATTACHMENT_METADATA if key in meta})
            out.append(attachment)
        return out

    def _check_message(self, body: dict[str, Any], request: web.Request) -> web.Response | None:
        error = self._check_voice(body, request)  # the more specific rules first
        return error if error is not None else self._check_content(body, bool(request[CALL].files))

    def _check_voice(self, body: dict[str, Any], request: web.Request) -> web.Response | None:
        """Discord's rules for a message flagged IS_VOICE_MESSAGE (none for other messages).

        No content (or embeds, components, stickers); exactly one file, an OGG Opus audio file
        (stricter than Discord, which would take other audio its clients then cannot play);
        `duration_secs` and `waveform` (base64, at most 256 bytes) for it in payload_json.
        """
        if not int(body.get("flags") or 0) & VOICE_MESSAGE:
            return None
        if body.get("content") or body.get("embeds") or body.get("components") or body.get("sticker_ids"):
            return discord_error(400, 50159, "Voice messages do not support additional content.")
        files, said = request[CALL].files, body.get("attachments") or []
        if len(files) != 1 or len(said) != 1:
            return discord_error(400, 50160, "Voice messages must have a single audio attachment.")
        content_type = mimetypes.guess_type(files[0].filename)[0] or files[0].content_type
        ogg_opus = files[0].data[:4] == b"OggS" and b"OpusHead" in files[0].data[:64]
        if not content_type.startswith("audio/") or not ogg_opus:
            return discord_error(400, 50160, "Voice messages must have a single audio attachment.")
        meta = said[0]
        if not isinstance(meta, dict) or meta.get("duration_secs") is None or meta.get("waveform") is None:
            return discord_error(400, 50161, "Voice messages must have supporting metadata.")
        try:
            waveform = base64.b64decode(meta["waveform"], validate=True)
            duration = float(meta["duration_secs"])
        except (binascii.Error, TypeError, ValueError):
            waveform, duration = b"", -1.0
        if not 0 < len(waveform) <= WAVEFORM_LIMIT or duration <= 0:
            return discord_error(400, 50035, "Invalid Form Body: attachments.0: invalid duration_secs or waveform")
        return None

    def _check_content(self, body: dict[str, Any], has_files: bool) -> web.Response | None:
        content = body.get("content") or ""
        if len(content) > MAX_CONTENT:
            return discord_error(400, 50035, f"Invalid Form Body: content: Must be {MAX_CONTENT} or fewer in length.")
        if not content and not has_files and not body.get("embeds") and not body.get("components"):
            return discord_error(400, 50006, "Cannot send an empty message")
        return None

    def _channel_or_404(self, raw: str) -> int | web.Response:
        channel_id = int(raw)
        if channel_id not in self.world.guild_channel_ids():
            return discord_error(404, 10003, "Unknown Channel")
        return channel_id

    def _hook_or_404(self, request: web.Request) -> dict[str, Any] | web.Response:
        hook = self.webhooks.get(int(request.match_info["hook"]))
        if hook is None or hook["token"] != request.match_info["token"]:
            return discord_error(404, 10015, "Unknown Webhook")
        return hook

    async def _store_message(self, message: dict[str, Any], *, echo: bool = True) -> dict[str, Any]:
        self.messages[int(message["id"])] = message
        if echo and self.echo:
            await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def _update_message(self, message: dict[str, Any], body: dict[str, Any], request: web.Request) -> None:
        for key in ("content", "components", "embeds", "flags"):
            if key in body:
                message[key] = body[key]
        if request[CALL].files or "attachments" in body:
            kept_ids = {str(a.get("id")) for a in body.get("attachments", [])}
            kept = [a for a in message["attachments"] if a["id"] in kept_ids]
            message["attachments"] = kept + self._attachments_from(request, int(message["channel_id"]))
        message["edited_timestamp"] = message["timestamp"]
        if self.echo and not message["flags"] & EPHEMERAL:
            await self.dispatch("MESSAGE_UPDATE", message)

    async def _remove_message(self, message_id: int) -> web.Response:
        message = self.messages.pop(message_id, None)
        if message is None:
            return discord_error(404, 10008, "Unknown Message")
        if self.echo:
            await self.dispatch("MESSAGE_DELETE", {"id": str(message_id), "channel_id": message["channel_id"],
                                                   "guild_id": message["guild_id"]})
        return web.Response(status=204)

    # -- session, application, commands -------------------------------------------------------

    async def _gateway_info(self, request: web.Request) -> web.Response:
        return json_response({"url": self.gateway_url, "shards": self.shards, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})

    async def _me(self, request: web.Request) -> web.Response:
        return json_response(self.world.users()[self.world.bot_id])

    async def _application(self, request: web.Request) -> web.Response:
        return json_response(self.world.application())

    async def _get_commands(self, request: web.Request) -> web.Response:
        return json_response(self.commands)

    async def _put_commands(self, request: web.Request) -> web.Response:
        """Bulk overwrite: every command gets an id, like Discord answers (or 403 when told to refuse)."""
        if self.refuse_command_sync:
            return discord_error(403, 50001, "Missing Access")
        self.commands = [{**command, "id": str(self.world.ids.next()), "application_id": str(self.world.application_id),
                          "version": str(self.world.ids.next()), "default_member_permissions":
                          command.get("default_member_permissions")} for command in self._body(request)]
        return json_response(self.commands)

    # -- channel messages (sent by the bot itself) ---------------------------------------------

    async def _create_message(self, request: web.Request) -> web.Response:
        channel_id = self._channel_or_404(request.match_info["channel"])
        if isinstance(channel_id, web.Response):
            return channel_id
        body = self._body(request)
        if (error := self._check_message(body, request)) is not None:
            return error
        reference = (body.get("message_reference") or {}).get("message_id")
        bot = self.world.users()[self.world.bot_id]
        message = message_payload(self.world, self.world.ids.next(), channel_id, bot, body.get("content") or "",
                                  member=self.world.member(self.world.bot_id, self.world.guild_of(channel_id)),
                                  components=body.get("components"),
                                  attachments=self._attachments_from(request, channel_id),
                                  reference_id=int(reference) if reference else None,
                                  flags=int(body.get("flags") or 0) & ~EPHEMERAL)
        return json_response(await self._store_message(message))

    def _bot_message(self, request: web.Request) -> dict[str, Any] | web.Response:
        message = self.messages.get(int(request.match_info["message"]))
        if message is None or message["channel_id"] != request.match_info["channel"]:
            return discord_error(404, 10008, "Unknown Message")
        return message

    async def _get_message(self, request: web.Request) -> web.Response:
        message = self._bot_message(request)
        return message if isinstance(message, web.Response) else json_response(message)

    async def _edit_message(self, request: web.Request) -> web.Response:
        message = self._bot_message(request)
        if isinstance(message, web.Response):
            return message
        if message["author"]["id"] != str(self.world.bot_id):
            return discord_error(403, 50005, "Cannot edit a message authored by another user")
        if message["flags"] & VOICE_MESSAGE:
            return discord_error(400, 50162, "Voice messages cannot be edited.")
        await self._update_message(message, self._body(request), request)
        return json_response(message)

    async def _delete_message(self, request: web.Request) -> web.Response:
        message = self._bot_message(request)
        return message if isinstance(message, web.Response) else await self._remove_message(int(message["id"]))

    async def _no_content(self, request: web.Request) -> web.Response:
        channel_id = self._channel_or_404(request.match_info["channel"])
        return channel_id if isinstance(channel_id, web.Response) else web.Response(status=204)

    # -- webhooks ------------------------------------------------------------------------------

    async def _list_webhooks(self, request: web.Request) -> web.Response:
        channel_id = self._channel_or_404(request.match_info["channel"])
        if isinstance(channel_id, web.Response):
            return channel_id
        return json_response([h for h in self.webhooks.values() if h["channel_id"] == str(channel_id)])

    async def _create_webhook(self, request: web.Request) -> web.Response:
        channel_id = self._channel_or_404(request.match_info["channel"])
        if isinstance(channel_id, web.Response):
            return channel_id
        if channel_id == self.world.thread_id:
            return discord_error(400, 50024, "Cannot execute action on this channel type")
        body = self._body(request)
        name = body.get("name") or ""
        if not 1 <= len(name) <= 80 or any(word in name.lower() for word in _FORBIDDEN_WEBHOOK_WORDS):
            return discord_error(400, 50035, f"Invalid Form Body: name: {name!r} is not allowed")
        hook_id = self.world.ids.next()
        avatar = secrets.token_hex(16) if body.get("avatar") else None
        self.webhooks[hook_id] = {
            "id": str(hook_id), "type": 1, "guild_id": str(self.world.guild_of(channel_id)),
            "channel_id": str(channel_id),
            "name": name, "avatar": avatar, "token": secrets.token_urlsafe(32),
            "application_id": str(self.world.application_id), "user": self.world.users()[self.world.bot_id]}
        return json_response(self.webhooks[hook_id])

    async def _delete_webhook(self, request: web.Request) -> web.Response:
        if self.webhooks.pop(int(request.match_info["hook"]), None) is None:
            return discord_error(404, 10015, "Unknown Webhook")
        return web.Response(status=204)

    async def _execute_webhook(self, request: web.Request) -> web.Response:
        if int(request.match_info["hook"]) == self.world.application_id:
            return await self._followup(request)
        hook = self._hook_or_404(request)
        if isinstance(hook, web.Response):
            return hook
        body = self._body(request)
        if (error := self._check_message(body, request)) is not None:
            return error
        flags = int(body.get("flags") or 0) & ~EPHEMERAL
        if flags & VOICE_MESSAGE and self.refuse_webhook_voice:
            return discord_error(400, 50035, "Invalid Form Body: flags: voice messages cannot be sent by this webhook")
        username = body.get("username") or hook["name"]
        if any(word in username.lower() for word in _FORBIDDEN_WEBHOOK_WORDS):
            return discord_error(400, 50035, f"Invalid Form Body: username: {username!r} is not allowed")
        channel_id = int(request.query.get("thread_id") or hook["channel_id"])
        author = {"id": hook["id"], "username": username, "avatar": hook["avatar"], "discriminator": "0000",
                  "bot": True, "global_name": None}
        message = message_payload(self.world, self.world.ids.next(), channel_id, author, body.get("content") or "",
                                  webhook_id=int(hook["id"]), components=body.get("components"),
                                  attachments=self._attachments_from(request, channel_id), flags=flags)
        await self._store_message(message)
        return json_response(message) if request.query.get("wait") in ("1", "true") else web.Response(status=204)

    def _webhook_message(self, request: web.Request) -> dict[str, Any] | web.Response:
        raw = request.match_info["message"]
        if int(request.match_info["hook"]) == self.world.application_id:
            interaction = self.interactions.get(request.match_info["token"])
            if interaction is None:
                return discord_error(404, 10015, "Unknown Webhook")
            raw = interaction.get("original_id") or "0" if raw == "@original" else raw
            message = self.messages.get(int(raw))
            return message if message is not None else discord_error(404, 10008, "Unknown Message")
        hook = self._hook_or_404(request)
        if isinstance(hook, web.Response):
            return hook
        message = self.messages.get(int(raw))
        if message is None or message.get("webhook_id") != hook["id"]:
            return discord_error(404, 10008, "Unknown Message")
        return message

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        message = self._webhook_message(request)
        return message if isinstance(message, web.Response) else json_response(message)

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        message = self._webhook_message(request)
        if isinstance(message, web.Response):
            return message
        if message["flags"] & VOICE_MESSAGE:
            return discord_error(400, 50162, "Voice messages cannot be edited.")
        body = self._body(request)
        if len(body.get("content") or "") > MAX_CONTENT:
            return self._check_content(body, True) or discord_error(400, 50035, "Invalid Form Body")
        await self._update_message(message, body, request)
        return json_response(message)

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        message = self._webhook_message(request)
        return message if isinstance(message, web.Response) else await self._remove_message(int(message["id"]))

    # -- interactions --------------------------------------------------------------------------

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        interaction = self.interactions.get(request.match_info["token"])
        if interaction is None or interaction["id"] != request.match_info["interaction"]:
            return discord_error(404, 10062, "Unknown interaction")
        if interaction.get("answered"):
            return discord_error(400, 40060, "Interaction has already been acknowledged.")
        interaction["answered"] = True
        body = self._body(request)
        kind, data = body.get("type"), body.get("data") or {}
        interaction["callback"] = body
        result: dict[str, Any] = {"interaction": {"id": interaction["id"], "type": interaction["type"]},
                                  "resource": {"type": kind}}
        if kind in (CALLBACK_MESSAGE, CALLBACK_DEFERRED):
            flags = int(data.get("flags") or 0)
            result["interaction"].update(response_message_loading=kind == CALLBACK_DEFERRED,
                                         response_message_ephemeral=bool(flags & EPHEMERAL))
            if kind == CALLBACK_MESSAGE and (error := self._check_content(data, bool(request[CALL].files))):
                return error
            message = await self._interaction_message(interaction, data, request, flags)
            interaction["original_id"] = message["id"]
            result["interaction"]["response_message_id"] = message["id"]
            result["resource"]["message"] = message
        elif kind == CALLBACK_UPDATE and interaction.get("message"):
            target = self.messages.get(int(interaction["message"]["id"]))
            if target is not None:
                await self._update_message(target, data, request)
        return json_response(result)

    async def _interaction_message(self, interaction: dict[str, Any], data: dict[str, Any], request: web.Request,
                                   flags: int) -> dict[str, Any]:
        channel_id = int(interaction["channel_id"])
        bot = self.world.users()[self.world.bot_id]
        message = message_payload(self.world, self.world.ids.next(), channel_id, bot, data.get("content") or "",
                                  webhook_id=self.world.application_id, components=data.get("components"),
                                  attachments=self._attachments_from(request, channel_id), flags=flags)
        message["interaction_metadata"] = {"id": interaction["id"], "type": interaction["type"],
                                           "user": interaction["member"]["user"]}
        return await self._store_message(message, echo=not flags & EPHEMERAL)

    async def _followup(self, request: web.Request) -> web.Response:
        interaction = self.interactions.get(request.match_info["token"])
        if interaction is None:
            return discord_error(404, 10015, "Unknown Webhook")
        if not interaction.get("answered"):
            return discord_error(400, 40060, "The interaction must be answered before a follow-up")
        body = self._body(request)
        if (error := self._check_content(body, bool(request[CALL].files))) is not None:
            return error
        message = await self._interaction_message(interaction, body, request, int(body.get("flags") or 0))
        return json_response(message)

    async def _attachment(self, request: web.Request) -> web.Response:
        blob = self.blobs.get(request.path)
        if blob is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=blob[1], content_type=blob[0])
