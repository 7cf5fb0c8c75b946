"""MasqueBot itself: intents, the mention default, endpoints, synced commands, persona webhooks, NSFW art."""

from __future__ import annotations

import json

import discord

from bot.app import apply_endpoints, masque_intents
from bot.cogs import COGS
from bot.discord_io import webhooks
from tests.bot.simcord_kit import make_bot, start_story, world

EXPECTED_COMMANDS = {"persona", "story", "memory", "lore", "scene", "imagine", "masque", "voice"}


def test_intents_and_no_pings_by_default(bot_settings, store):
    bot = make_bot(bot_settings, store)
    assert masque_intents().message_content and bot.intents.message_content
    assert not bot.intents.typing and not bot.intents.members and not bot.intents.presences  # unused: not sent
    assert bot._connection.max_messages is None  # edits and deletes come as raw events: no message cache
    mentions = bot.allowed_mentions
    assert not mentions.everyone and not mentions.users and not mentions.roles and not mentions.replied_user


def test_api_base_and_gateway_can_point_at_a_proxy(bot_settings):
    route_base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    try:
        apply_endpoints(bot_settings.model_copy(update={"discord_api_base": "http://127.0.0.1:8080/api/v10/",
                                                        "discord_gateway_url": "ws://127.0.0.1:8081/"}))
        assert discord.http.Route("GET", "/users/@me").url == "http://127.0.0.1:8080/api/v10/users/@me"
        assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == "ws://127.0.0.1:8081/"
        # A bare proxy address (as nirn-proxy is often given) gets Discord's API path.
        apply_endpoints(bot_settings.model_copy(update={"discord_api_base": "http://127.0.0.1:8080"}))
        assert discord.http.Route("GET", "/users/@me").url == "http://127.0.0.1:8080/api/v10/users/@me"
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = route_base, gateway


async def test_commands_are_synced_with_descriptions(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        synced = {c.name: c for c in await w.bot.tree.fetch_commands()}
        assert set(synced) == EXPECTED_COMMANDS
        story = {o.name: o.description for o in synced["story"].options}
        assert story["start"].startswith("Start a new story")
        assert set(story) == {"start", "end", "reset", "rewind", "export", "import", "status", "note", "summary",
                              "add", "remove", "next", "settings"}
        assert {o.name for o in synced["memory"].options} == {"add", "list", "remove"}
        assert {o.name for o in synced["lore"].options} == {"import", "list", "show", "remove"}
        assert {o.name for o in synced["persona"].options} == {
            "create", "import", "export", "edit", "avatar", "voice", "list", "show", "delete"}
        assert synced["persona"].default_member_permissions.manage_guild
        # /masque forget-me is for everyone: the group is visible, its admin commands check Manage Server.
        assert synced["masque"].default_member_permissions is None
        assert {o.name for o in synced["masque"].options} == {"settings", "samplers", "forget-me", "forget-server"}
        # discord.py falls back to "…" where a command has no docstring: every command and subcommand has one.
        for command in synced.values():
            assert command.description not in ("", "…"), command.name
            for option in command.options:
                assert option.description not in ("", "…"), f"{command.name} {option.name}"
        assert set(w.bot.extensions) == set(COGS)  # setup_hook loaded every cog


async def test_a_new_persona_gets_the_channel_webhook_dressed_as_it(bot_settings, store, fake_engine):
    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Marrow", "description": "x", "first_mes": "Evening."}}
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        first_hook = w.persona_messages()[-1].webhook_id
        await w.admin.slash(w.channel, "persona import", card=("m.json", json.dumps(card).encode()))
        await start_story(w, "Marrow")
        greeting = w.persona_messages()[-1]
        assert greeting.author.name == "Marrow" and greeting.content == "Evening."
        assert greeting.webhook_id != first_hook
        hooks = [h for h in w.env.backend.webhooks.values() if h.channel_id == w.channel.id]
        # each persona keeps its own webhook: a message stays editable only through the one that posted it
        assert sorted(h.name for h in hooks) == ["Marrow", "Wren"]


async def test_a_channel_never_piles_up_webhooks(bot_settings, store, fake_engine, monkeypatch):
    monkeypatch.setattr(webhooks, "MAX_OWN_WEBHOOKS", 2)
    async with world(make_bot(bot_settings, store)) as w:
        for name in ("Wren Halloway", "Captain Isolde Varga", "Old Mossback"):
            await start_story(w, name)
        hooks = [h for h in w.env.backend.webhooks.values() if h.channel_id == w.channel.id]
        assert sorted(h.name for h in hooks) == ["Captain Varga", "Old Mossback"]  # the oldest one went


async def test_age_restricted_channels_turn_the_image_safety_switch_off(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.slash(w.channel, "imagine", prompt="a lighthouse")
        assert fake_engine.requests_to("/v1/images/generations")[-1].json.get("safe", True) is True
        # SimCord does not model the age-restricted flag; set it the way a CHANNEL_UPDATE would.
        w.bot.get_channel(w.channel.id).nsfw = True
        await w.admin.slash(w.channel, "imagine", prompt="a lighthouse")  # another user: /imagine has a cooldown
        assert fake_engine.requests_to("/v1/images/generations")[-1].json.get("safe") is False
