"""Discord API objects as JSON, shaped like the real API v10 sends them, for the fake Discord server.

Pure builders: a small world (one guild, an admin, a normal user, the bot, text channels, a
thread and two voice channels) and the payloads of users, members, channels, voice states,
messages, attachments, webhooks and interactions that discord.py parses. `World.add_guilds()` adds
more guilds (text channels only; the same members, roles and permissions), e.g. to spread a load
over several shards; every channel's payloads then carry its own guild's id (`guild_of()`).
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field
from typing import Any

import discord

ADMINISTRATOR = discord.Permissions.all().value
MEMBER_PERMISSIONS = discord.Permissions(
    view_channel=True, send_messages=True, read_message_history=True, attach_files=True, embed_links=True,
    add_reactions=True, use_application_commands=True, send_messages_in_threads=True).value
BOT_PERMISSIONS = MEMBER_PERMISSIONS | discord.Permissions(manage_webhooks=True, manage_messages=True).value
# What @everyone may do in the voice channels (Discord's defaults): join, talk, be heard by voice activity.
VOICE_PERMISSIONS = discord.Permissions(view_channel=True, connect=True, speak=True, use_voice_activation=True).value
TEXT_CHANNEL, VOICE_CHANNEL, PUBLIC_THREAD = 0, 2, 11


class Snowflakes:
    """Increasing snowflake ids whose timestamps are now, as Discord's are."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def next(self) -> int:
        return discord.utils.time_snowflake(discord.utils.utcnow()) + next(self._counter)

    def consecutive(self, count: int) -> list[int]:
        """`count` ids timestamped on consecutive milliseconds up to now: as guild ids they fall on
        consecutive shards ((id >> 22) % shard_count), the way a bot's many guilds spread over its shards."""
        now = discord.utils.time_snowflake(discord.utils.utcnow()) >> 22
        return [((now - count + 1 + i) << 22) + next(self._counter) for i in range(count)]


def iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def user_payload(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {"id": str(user_id), "username": name, "global_name": None if bot else name.title(),
            "discriminator": "0", "avatar": None, "bot": bot, "public_flags": 0}


@dataclass
class World:
    """The fake Discord's guild and who is in it, and any guilds added. Ids are fixed per world, distinct per run."""

    ids: Snowflakes = field(default_factory=Snowflakes)
    guild_id: int = 0
    application_id: int = 0
    bot_id: int = 0
    admin_id: int = 0
    user_id: int = 0
    admin_role_id: int = 0
    channel_ids: list[int] = field(default_factory=list)
    nsfw_channel_id: int = 0
    thread_id: int = 0
    voice_channel_ids: list[int] = field(default_factory=list)
    voice_states: dict[int, dict[str, Any]] = field(default_factory=dict)  # user id -> state, while in a call
    guild_name: str = "Masque Test Guild"
    # Guilds added by add_guilds (not the main one): guild id -> its text channels, and its Admins role.
    extra_guilds: dict[int, list[int]] = field(default_factory=dict)
    extra_admin_roles: dict[int, int] = field(default_factory=dict)
    _guild_of: dict[int, int] = field(default_factory=dict)  # an added guild's channel -> that guild

    def __post_init__(self) -> None:
        self.guild_id, self.application_id = self.ids.next(), self.ids.next()
        self.bot_id = self.application_id  # a bot user's id is its application's id
        self.admin_id, self.user_id, self.admin_role_id = self.ids.next(), self.ids.next(), self.ids.next()
        self.channel_ids = [self.ids.next() for _ in range(3)]
        self.nsfw_channel_id = self.channel_ids[-1]
        self.thread_id = self.ids.next()
        self.voice_channel_ids = [self.ids.next() for _ in range(2)]

    @property
    def story_channel_id(self) -> int:
        return self.channel_ids[0]

    @property
    def voice_channel_id(self) -> int:
        """The voice channel the users meet in."""
        return self.voice_channel_ids[0]

    @property
    def other_voice_channel_id(self) -> int:
        """A second voice channel (somewhere to move the bot to)."""
        return self.voice_channel_ids[1]

    def add_channels(self, count: int) -> list[int]:
        """More text channels (before the gateway connects), e.g. for a benchmark."""
        extra = [self.ids.next() for _ in range(count)]
        self.channel_ids[-1:-1] = extra  # keep the NSFW channel last
        return extra

    def add_guilds(self, count: int, channels_each: int) -> dict[int, list[int]]:
        """More guilds (before the gateway connects), each with `channels_each` text channels of its own, the
        same bot, admin and user as members and the same roles and permissions as the main guild. Their ids
        fall on consecutive shards. Returns {guild id: its channel ids}."""
        added = {}
        for guild_id in self.ids.consecutive(count):
            added[guild_id] = [self.ids.next() for _ in range(channels_each)]
            self.extra_admin_roles[guild_id] = self.ids.next()
            self._guild_of.update(dict.fromkeys(added[guild_id], guild_id))
        self.extra_guilds.update(added)
        return added

    @property
    def guild_ids(self) -> list[int]:
        """Every guild: the main one first, then the added ones."""
        return [self.guild_id, *self.extra_guilds]

    def guild_of(self, channel_id: int) -> int:
        """The guild a channel (or thread) belongs to."""
        return self._guild_of.get(channel_id, self.guild_id)

    def admin_role_of(self, guild_id: int | None = None) -> int:
        """The Admins role of a guild (default: the main one)."""
        return self.extra_admin_roles.get(guild_id, self.admin_role_id) if guild_id else self.admin_role_id

    def users(self) -> dict[int, dict[str, Any]]:
        return {self.bot_id: user_payload(self.bot_id, "Masque", bot=True),
                self.admin_id: user_payload(self.admin_id, "ada_admin"),
                self.user_id: user_payload(self.user_id, "uma_user")}

    def member(self, user_id: int, guild_id: int | None = None) -> dict[str, Any]:
        """A member of the guild (default: the main one) without its user (as in MESSAGE_CREATE);
        `member_with_user` adds it."""
        roles = [str(self.admin_role_of(guild_id))] if user_id == self.admin_id else []
        return {"roles": roles, "joined_at": iso_now(), "deaf": False, "mute": False, "flags": 0,
                "pending": False, "nick": None, "avatar": None, "premium_since": None,
                "communication_disabled_until": None}

    def member_with_user(self, user_id: int, guild_id: int | None = None) -> dict[str, Any]:
        return {**self.member(user_id, guild_id), "user": self.users()[user_id]}

    def permissions_of(self, user_id: int) -> int:
        if user_id == self.admin_id:
            return ADMINISTRATOR
        return BOT_PERMISSIONS if user_id == self.bot_id else MEMBER_PERMISSIONS

    def channel(self, channel_id: int) -> dict[str, Any]:
        if channel_id in self.voice_channel_ids:
            return self.voice_channel(channel_id)
        if channel_id == self.thread_id:
            return {"id": str(self.thread_id), "type": PUBLIC_THREAD, "guild_id": str(self.guild_id),
                    "name": "side-quest", "parent_id": str(self.story_channel_id), "owner_id": str(self.user_id),
                    "message_count": 0, "member_count": 2, "rate_limit_per_user": 0, "flags": 0,
                    "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                        "archive_timestamp": iso_now(), "locked": False}}
        if channel_id in self._guild_of:  # a text channel of an added guild
            guild_id = self._guild_of[channel_id]
            position = self.extra_guilds[guild_id].index(channel_id)
            return {"id": str(channel_id), "type": TEXT_CHANNEL, "guild_id": str(guild_id),
                    "name": f"story-{position}", "position": position, "permission_overwrites": [], "nsfw": False,
                    "parent_id": None, "topic": None, "rate_limit_per_user": 0, "last_message_id": None, "flags": 0}
        position = self.channel_ids.index(channel_id)
        return {"id": str(channel_id), "type": TEXT_CHANNEL, "guild_id": str(self.guild_id),
                "name": f"story-{position}", "position": position, "permission_overwrites": [],
                "nsfw": channel_id == self.nsfw_channel_id, "parent_id": None, "topic": None,
                "rate_limit_per_user": 0, "last_message_id": None, "flags": 0}

    def voice_channel(self, channel_id: int) -> dict[str, Any]:
        position = self.voice_channel_ids.index(channel_id)
        everyone = {"id": str(self.guild_id), "type": 0, "allow": str(VOICE_PERMISSIONS), "deny": "0"}
        return {"id": str(channel_id), "type": VOICE_CHANNEL, "guild_id": str(self.guild_id),
                "name": ("Tavern", "Cellar")[position], "position": position, "permission_overwrites": [everyone],
                "nsfw": False, "parent_id": None, "bitrate": 64000, "user_limit": 0, "rtc_region": None,
                "video_quality_mode": 1, "rate_limit_per_user": 0, "last_message_id": None, "flags": 0}

    def voice_state(self, user_id: int, channel_id: int | None, session_id: str, *, self_mute: bool = False,
                    self_deaf: bool = False) -> dict[str, Any]:
        """A VOICE_STATE_UPDATE payload: `user_id` is in `channel_id` (None: left the call)."""
        return {"guild_id": str(self.guild_id), "channel_id": str(channel_id) if channel_id else None,
                "user_id": str(user_id), "member": self.member_with_user(user_id), "session_id": session_id,
                "deaf": False, "mute": False, "self_deaf": self_deaf, "self_mute": self_mute, "self_video": False,
                "self_stream": False, "suppress": False, "request_to_speak_timestamp": None}

    def voice_channel_of(self, user_id: int) -> int | None:
        state = self.voice_states.get(user_id)
        return int(state["channel_id"]) if state else None

    def users_in_voice(self, channel_id: int) -> list[int]:
        return [user_id for user_id in self.voice_states if self.voice_channel_of(user_id) == channel_id]

    def roles(self, guild_id: int | None = None) -> list[dict[str, Any]]:
        """A guild's roles (default: the main guild's): @everyone (whose id is the guild's) and Admins."""
        guild_id = guild_id or self.guild_id
        def role(role_id: int, name: str, permissions: int, position: int) -> dict[str, Any]:
            return {"id": str(role_id), "name": name, "permissions": str(permissions), "position": position,
                    "color": 0, "colors": {"primary_color": 0}, "hoist": False, "managed": False,
                    "mentionable": False, "icon": None, "unicode_emoji": None, "flags": 0}
        return [role(guild_id, "@everyone", MEMBER_PERMISSIONS, 0),
                role(self.admin_role_of(guild_id), "Admins", ADMINISTRATOR, 1)]

    def guild(self, guild_id: int | None = None) -> dict[str, Any]:
        """The GUILD_CREATE payload of a guild (default: the main one; an added one has only its text channels)."""
        if guild_id and guild_id != self.guild_id:
            number = list(self.extra_guilds).index(guild_id) + 1
            return {**self.guild(), "id": str(guild_id), "name": f"{self.guild_name} {number}",
                    "roles": self.roles(guild_id), "voice_states": [], "threads": [],
                    "members": [self.member_with_user(uid, guild_id) for uid in (self.bot_id, self.admin_id,
                                                                                  self.user_id)],
                    "channels": [self.channel(cid) for cid in self.extra_guilds[guild_id]]}
        return {
            "id": str(self.guild_id), "name": self.guild_name, "icon": None, "splash": None,
            "discovery_splash": None, "owner_id": str(self.admin_id), "afk_channel_id": None, "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "roles": self.roles(), "emojis": [], "stickers": [], "features": [], "mfa_level": 0,
            "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
            "vanity_url_code": None, "description": None, "banner": None, "premium_tier": 0,
            "preferred_locale": "en-US", "public_updates_channel_id": None, "nsfw_level": 0,
            "premium_progress_bar_enabled": False, "joined_at": iso_now(), "large": False, "unavailable": False,
            "member_count": 3, "voice_states": list(self.voice_states.values()), "presences": [], "stage_instances": [],
            "guild_scheduled_events": [], "soundboard_sounds": [],
            "members": [self.member_with_user(uid) for uid in (self.bot_id, self.admin_id, self.user_id)],
            "channels": [self.channel(cid) for cid in (*self.channel_ids, *self.voice_channel_ids)],
            "threads": [self.channel(self.thread_id)],
        }

    def guild_shard(self, shard_count: int, guild_id: int | None = None) -> int:
        """The shard that gets a guild's events (default: the main guild's) among `shard_count`: Discord's
        (guild_id >> 22) % shard_count."""
        return ((guild_id or self.guild_id) >> 22) % shard_count

    def shard_guilds(self, shard_id: int, shard_count: int) -> list[int]:
        """The guilds shard `shard_id` of `shard_count` gets."""
        return [g for g in self.guild_ids if self.guild_shard(shard_count, g) == shard_id]

    def ready(self, session_id: str, resume_url: str, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
        """The READY payload of shard (shard_id, shard_count): the bot user, its application, the guilds that
        shard owns (unavailable until their GUILD_CREATE)."""
        shard_id, shard_count = shard
        guilds = [{"id": str(g), "unavailable": True} for g in self.shard_guilds(shard_id, shard_count)]
        return {"v": 10, "user": {**self.users()[self.bot_id], "verified": True, "mfa_enabled": False, "flags": 0},
                "guilds": guilds, "session_id": session_id,
                "resume_gateway_url": resume_url, "application": {"id": str(self.application_id), "flags": 0},
                "private_channels": [], "relationships": [], "presences": [], "shard": [shard_id, shard_count]}

    def application(self) -> dict[str, Any]:
        """GET /oauth2/applications/@me."""
        return {"id": str(self.application_id), "name": "Masque", "icon": None, "description": "role-play",
                "bot_public": True, "bot_require_code_grant": False, "verify_key": "0" * 64, "flags": 0,
                "owner": self.users()[self.admin_id], "team": None, "summary": "", "rpc_origins": [],
                "bot": self.users()[self.bot_id]}

    def guild_channel_ids(self) -> set[int]:
        # voice channels have a text chat
        return {*self.channel_ids, self.thread_id, *self.voice_channel_ids, *self._guild_of}


def message_payload(world: World, message_id: int, channel_id: int, author: dict[str, Any], content: str, *,
                    member: dict[str, Any] | None = None, attachments: list[dict] | None = None,
                    webhook_id: int | None = None, components: list | None = None,
                    reference_id: int | None = None, flags: int = 0) -> dict[str, Any]:
    """A message object as Discord returns it from REST and sends it in MESSAGE_CREATE."""
    guild_id = world.guild_of(channel_id)
    body: dict[str, Any] = {
        "id": str(message_id), "channel_id": str(channel_id), "guild_id": str(guild_id), "author": author,
        "content": content, "timestamp": iso_now(), "edited_timestamp": None, "tts": False,
        "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": attachments or [],
        "embeds": [], "pinned": False, "type": 19 if reference_id else 0, "flags": flags,
        "components": components or [],
    }
    if member is not None:
        body["member"] = member
    if webhook_id is not None:
        body["webhook_id"] = str(webhook_id)
        body["application_id"] = str(world.application_id)
    if reference_id is not None:
        body["message_reference"] = {"type": 0, "message_id": str(reference_id), "channel_id": str(channel_id),
                                     "guild_id": str(guild_id)}
    return body


def attachment_payload(attachment_id: int, filename: str, content_type: str, size: int, url: str, *,
                       voice: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": str(attachment_id), "filename": filename, "size": size, "url": url,
                            "proxy_url": url, "content_type": content_type}
    if voice:
        body.update(duration_secs=2.0, waveform="AAAA")
    return body


def option_payloads(definition: dict[str, Any], path: list[str], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The `options` of an application-command interaction for `/name sub... key:value` from its synced definition.

    Sub-command (group) levels nest like Discord nests them; value types come from the definition.
    """
    options = definition.get("options", [])
    for name in path:
        sub = next((o for o in options if o["name"] == name), None)
        if sub is None:
            raise KeyError(f"/{definition['name']} has no sub-command {name!r}")
        return [{"name": name, "type": sub["type"], "options": option_payloads(sub, path[1:], values)}]
    known = {o["name"]: o["type"] for o in options}
    unknown = set(values) - set(known)
    if unknown:
        raise KeyError(f"/{definition['name']} has no option(s) {sorted(unknown)}")
    return [{"name": key, "type": known[key], "value": value} for key, value in values.items()]
