"""Forgetting, through the real bot in SimCord: /masque forget-me, /masque forget-server, and the guilds the
bot left (purged after the retention period, kept when it is added back)."""

from __future__ import annotations

from types import SimpleNamespace

import discord
import pytest
from simcord.backend.errors import SetupError

from bot.discord_io.confirm import CANCELLED, CONFIRM_TIMEOUT_S, NOT_YOURS, TIMED_OUT, ConfirmView
from bot.store import Store
from tests.bot.simcord_kit import World, make_bot, start_story, world

DAY_S = 24 * 3600


async def _their_turns(store: Store, channel_id: int, user_id: int) -> list[str]:
    story = await store.active_story(channel_id)
    return [t.text for t in await store.recent_turns(story.id) if t.author_id == user_id]


async def _second_guild(w: World):
    """Another server where the same player plays (and runs it); returns it, its channel and the player there."""
    other = w.env.create_guild("Other club")
    channel = other.create_text_channel("inn")
    owners = other.create_role("Owners", permissions=discord.Permissions(manage_guild=True))
    player = other.add_member(w.player.user, roles=[owners])
    await w.env.settle()
    await w.bot.store.update_guild_settings(other.id, cooldown_s=0)
    assert (await player.slash(channel, "story start", persona="Wren Halloway")).acknowledged
    return other, channel, player


async def test_forget_me_deletes_only_my_turns_in_this_server(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I order a cider.")
        await w.player.send(w.channel, "And a second one.")
        await w.admin.send(w.channel, "The admin waves.")
        story = await store.active_story(w.channel.id)
        await store.add_fact(story.id, "Pip hates rain", author_id=w.player.user.id)
        _, elsewhere, player_there = await _second_guild(w)
        await player_there.send(elsewhere, "Hello from the other server.")
        assert len(await _their_turns(store, w.channel.id, w.player.user.id)) == 2
        replies = len(w.persona_messages())

        asked = await w.player.slash(w.channel, "masque forget-me")
        assert asked.ephemeral and "2 turns" in asked.response.content
        assert await _their_turns(store, w.channel.id, w.player.user.id) != []  # nothing before confirming
        done = await w.player.click(asked.response, label="Confirm")

        shown = asked.response.content  # the question, edited into the answer
        assert asked.response.components == [] and done.acknowledged
        assert "deleted 2 turns of yours in this server" in shown and "1 pinned fact" in shown
        assert await _their_turns(store, w.channel.id, w.player.user.id) == []
        assert await _their_turns(store, w.channel.id, w.admin.user.id) == ["The admin waves."]
        assert await _their_turns(store, elsewhere.id, w.player.user.id) == ["Hello from the other server."]
        assert await store.facts(story.id) == []
        assert len(w.persona_messages()) == replies  # the personas' replies stay, on Discord and in the story
        story_turns = await store.recent_turns(story.id)
        assert sum(t.author_kind == "persona" for t in story_turns) >= 3


async def test_forget_me_everywhere(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I order a cider.")
        _, elsewhere, player_there = await _second_guild(w)
        await player_there.send(elsewhere, "Hello from the other server.")
        asked = await w.player.slash(w.channel, "masque forget-me", scope="everywhere")
        assert "in every server" in asked.response.content
        await w.player.click(asked.response, label="Confirm")
        assert await store.count_user_turns(w.player.user.id) == 0
        assert await _their_turns(store, elsewhere.id, w.player.user.id) == []


async def test_cancel_or_a_stranger_deletes_nothing(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I order a cider.")
        asked = await w.player.slash(w.channel, "masque forget-me")

        # The question is ephemeral: nobody else sees it, so nobody else can press it (the view checks too,
        # see test_the_question_answers_only_its_owner).
        with pytest.raises(SetupError, match="not visible to this user"):
            await w.admin.click(asked.response, label="Confirm")
        assert await _their_turns(store, w.channel.id, w.player.user.id) == ["I order a cider."]

        cancelled = await w.player.click(asked.response, label="Cancel")
        assert cancelled.acknowledged and asked.response.content == CANCELLED
        assert await _their_turns(store, w.channel.id, w.player.user.id) == ["I order a cider."]


async def test_an_unanswered_question_times_out(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I order a cider.")
        asked = await w.player.slash(w.channel, "masque forget-me")
        await w.env.advance_time(CONFIRM_TIMEOUT_S + 1)
        assert asked.response.content == TIMED_OUT and asked.response.components == []  # the buttons are gone
        with pytest.raises(SetupError, match="No matching component"):
            await w.player.click(asked.response, label="Confirm")
        assert await _their_turns(store, w.channel.id, w.player.user.id) == ["I order a cider."]


async def test_forget_server_is_for_admins_and_deletes_the_server(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I order a cider.")
        story = await store.active_story(w.channel.id)
        turns = await store.count_turns(story.id)
        _, elsewhere, _ = await _second_guild(w)

        refused = await w.player.slash(w.channel, "masque forget-server")
        assert refused.ephemeral and "Manage Server" in refused.response.content
        assert w.error_types() == ["MissingPermissions"]
        assert await store.count_turns(story.id) == turns > 0

        asked = await w.admin.slash(w.channel, "masque forget-server")
        assert asked.ephemeral and await store.get_story(story.id) is not None
        done = await w.admin.click(asked.response, label="Confirm")
        shown = asked.response.content
        assert done.acknowledged
        assert f"deleted 1 story ({turns} turns)" in shown
        assert await store.get_story(story.id) is None and await store.active_story(w.channel.id) is None
        assert await store.guild_settings(w.guild.id) == {}
        assert await store.active_story(elsewhere.id) is not None  # another server keeps its story


async def test_a_guild_left_is_purged_after_the_retention_unless_the_bot_comes_back(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I order a cider.")
        story = await store.active_story(w.channel.id)
        other, elsewhere, _ = await _second_guild(w)
        kept = await store.active_story(elsewhere.id)

        # Both guilds remove the bot; the other one adds it back within the 30 days.
        gone = w.bot.get_guild(other.id)
        for guild_id in (w.guild.id, other.id):
            await w.bot.get_guild(guild_id).leave()
        await w.env.settle()
        assert await store.guild_left_at(w.guild.id) is not None
        await w.env.advance_time(20 * DAY_S)
        assert await store.get_story(story.id) is not None  # not yet
        # SimCord cannot re-create a guild under the same id, so the bot's join event is dispatched as
        # discord.py does on GUILD_CREATE for a guild it did not have.
        w.bot.dispatch("guild_join", gone)
        await w.env.settle()
        assert await store.guild_left_at(other.id) is None

        await w.env.advance_time(11 * DAY_S)
        assert await store.get_story(story.id) is None
        assert await store.guild_left_at(w.guild.id) is None
        assert await store.get_story(kept.id) is not None


async def test_the_question_answers_only_its_owner():
    """Should a stranger's press reach the view (an ephemeral message makes that impossible on Discord), it is
    refused and the deletion does not run."""
    ran = []

    async def action() -> str:
        ran.append(True)
        return "done"

    view = ConfirmView(owner_id=1, action=action)
    said = []
    stranger = SimpleNamespace(user=SimpleNamespace(id=2), response=SimpleNamespace(
        send_message=lambda text, ephemeral: said.append((text, ephemeral)) or _done()))
    assert await view.interaction_check(stranger) is False
    assert said == [(NOT_YOURS, True)] and ran == [] and not view.answered
    owner = SimpleNamespace(user=SimpleNamespace(id=1))
    assert await view.interaction_check(owner) is True


async def _done() -> None:
    return None
