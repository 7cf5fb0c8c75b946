"""Chaos against the real bot: the fake Discord rate limits, drops the gateway and loses webhooks.

Whatever it does, every reply arrives exactly once and complete: counted in the messages the fake
Discord holds at the end (what people would see), not in what the bot meant to send.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import discord
import pytest

from bot.app import MasqueBot
from bot.discord_io.streaming import STREAM_CURSOR
from bot.store import DuplicateMessage, NewTurn, Store
from bot.store.models import AuthorKind
from tests.bot.test_e2e_gateway import buttons, running_bot, sealed, start_story
from tests.fakes.discord_chaos import (
    CHANNEL_MESSAGE_CREATE,
    CHANNEL_MESSAGE_EDIT,
    WEBHOOK_EXECUTE,
    WEBHOOK_MESSAGE_EDIT,
)
from tests.fakes.fake_discord import FakeDiscord, plain_client
from tests.fakes.fake_engine import FakeEngine


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def bot(discord_server: FakeDiscord, fake_engine: FakeEngine, store: Store, sqlite_url: str,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MasqueBot]:
    # apply_endpoints sets process-wide discord.py state: put it back after the test.
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    async with running_bot(discord_server, fake_engine.url, store, sqlite_url) as client:
        yield client


REPLY = "*Wren lifts the lantern.* " + " ".join(f"Step {i} goes down." for i in range(40))


def persona_messages(server: FakeDiscord, after_id: int) -> list[dict[str, Any]]:
    """Persona (webhook) messages the channel shows now that were created after message `after_id`."""
    return [m for i, m in sorted(server.messages.items())
            if i > after_id and m.get("webhook_id") and m["webhook_id"] != str(server.world.application_id)]


async def reply_to(server: FakeDiscord, text: str, *, replies: int = 1, wait_s: float = 20) -> dict[str, Any]:
    """A user message, and the wait until `replies` replies from here on have their buttons."""
    since = len(server.calls)
    said = await server.user_says(text)
    await server.wait_for_call(lambda _: len(sealed(server, since)) >= replies, since=since, wait_s=wait_s)
    return said


async def assert_answered_once(bot: MasqueBot, server: FakeDiscord, said: dict[str, Any], text: str) -> None:
    """One persona message after `said`, showing all of `text`, stored as the turn that answers it."""
    shown = persona_messages(server, int(said["id"]))
    assert [m["content"] for m in shown] == [text]
    assert STREAM_CURSOR not in shown[0]["content"]
    assert any(":regen:" in b for b in buttons(shown[0]))
    turn = await bot.store.turn_by_message(int(shown[0]["id"]))
    assert turn is not None and turn.author_kind == AuthorKind.PERSONA and turn.text == text
    asked = await bot.store.turn_by_message(int(said["id"]))
    assert asked is not None and asked.position < turn.position


# -- 429 storms -------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_global", [False, True], ids=["per-route", "global"])
async def test_a_429_storm_on_persona_posts_and_edits_delivers_every_reply_once(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine, is_global: bool) -> None:
    await start_story(discord_server)
    fake_engine.reply, fake_engine.token_delay = REPLY, 0.02  # ~1.5 s: streaming edits as well as the seal
    limits = discord_server.limits
    posts = limits.storm(WEBHOOK_EXECUTE, 2, 0.3, is_global=is_global)
    edits = limits.storm(WEBHOOK_MESSAGE_EDIT, 3, 0.4, is_global=is_global)
    since = len(discord_server.calls)
    said = await reply_to(discord_server, "Wren, light the way.")
    assert (posts.answered, edits.answered) == (2, 3)  # the storm happened
    assert [c.status for c in discord_server.calls[since:] if c.status == 429] == [429] * 5
    await assert_answered_once(bot, discord_server, said, REPLY)
    accepted = [c for c in discord_server.calls[since:] if c.method == "POST" and c.status == 200
                and c in discord_server.webhook_calls()]
    assert len(accepted) == 1  # retried posts never made a second message
    assert limits.early_requests(discord_server.calls) == []  # each retry waited its retry_after
    # And the next reply, after the storm, is as clean.
    fake_engine.reply = "The stair goes down."
    again = await reply_to(discord_server, "Down we go.")
    await assert_answered_once(bot, discord_server, again, "The stair goes down.")


async def test_a_storm_longer_than_the_client_retries_on_a_streaming_edit_still_delivers_the_reply(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine) -> None:
    """discord.py tries a request 5 times, then raises: a streaming edit that gives up is only a
    skipped frame, the next edit (or the final one) carries all the text."""
    await start_story(discord_server)
    fake_engine.reply, fake_engine.token_delay = REPLY, 0.04  # ~3 s: the first streaming edit comes at 1.2 s
    edits = discord_server.limits.storm(WEBHOOK_MESSAGE_EDIT, 5, 0.2)
    said = await reply_to(discord_server, "Wren, what is down there?")
    assert edits.answered == 5
    await assert_answered_once(bot, discord_server, said, REPLY)
    assert discord_server.limits.early_requests(discord_server.calls) == []


@pytest.mark.parametrize("is_global", [False, True], ids=["per-route", "global"])
async def test_bot_message_routes_honour_retry_after(discord_server: FakeDiscord, is_global: bool) -> None:
    """Channel message create and edit (the bot's own messages) through discord.py's HTTP client: a global
    429 holds every request of the bot until it is over, a per-route one that route's bucket."""
    channel_id = discord_server.world.story_channel_id
    async with plain_client(discord_server) as client:
        channel = client.get_channel(channel_id)
        assert isinstance(channel, discord.TextChannel)
        first = await channel.send("one")
        limits = discord_server.limits
        edits = limits.storm(CHANNEL_MESSAGE_EDIT, 1, 0.6, is_global=is_global)
        since = len(discord_server.calls)
        editing = asyncio.create_task(first.edit(content="one, edited"))
        await discord_server.wait_for_call(lambda c: c.status == 429, since=since)
        await asyncio.sleep(0.1)  # the client has read the 429 (the fake records it as it answers)
        second = await channel.send("two")  # another route, asked while the edit waits out its 429
        edited = await editing
        assert edits.answered == 1
        assert edited.content == "one, edited" and discord_server.messages[first.id]["content"] == "one, edited"
        made = [c for c in discord_server.calls[since:] if c.method == "POST" and c.status == 200]
        assert [c.json["content"] for c in made] == ["two"] and second.id in discord_server.messages
        assert limits.early_requests(discord_server.calls) == []
        # A global limit holds every request of the bot; a per-route one only its route's bucket.
        assert (made[0].at >= limits.throttles[0].until) is is_global
        sends = limits.storm(CHANNEL_MESSAGE_CREATE, 2, 0.3, is_global=is_global)
        third = await channel.send("three")
        assert sends.answered == 2 and third.content == "three"
        assert [m["content"] for m in discord_server.messages.values()] == ["one, edited", "two", "three"]
        assert limits.early_requests(discord_server.calls) == []


# -- gateway RESUME replaying events ----------------------------------------------------------------


@pytest.mark.parametrize("close", [4000, None], ids=["close-4000", "dropped-socket"])
async def test_a_resume_that_replays_a_handled_message_does_not_answer_it_twice(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine, close: int | None,
        caplog: pytest.LogCaptureFixture) -> None:
    await start_story(discord_server)
    await bot.store.update_guild_settings(discord_server.world.guild_id, cooldown_s=0)
    fake_engine.reply = "The lantern flickers."
    before = discord_server.seq
    first = await reply_to(discord_server, "I light the lantern.")
    chats = len(fake_engine.requests_to("/v1/chat/completions"))
    since = len(discord_server.calls)
    discord_server.replay_from = before  # the RESUME redelivers everything since before that message
    await discord_server.drop_gateway(close)
    fake_engine.reply = "The door opens."
    missed = await discord_server.user_says("I open the door.")  # while the bot may be away: in the replay
    await discord_server.wait_for_call(lambda _: len(sealed(discord_server, since)) >= 1, since=since, wait_s=20)
    await asyncio.sleep(1.0)  # room for a second answer to the replayed message, if the bot were to give one
    # the RESUME was for the session the bot identified (an AutoShardedBot has no bot.ws: ask the fake)
    assert discord_server.resumes and discord_server.resumes[-1]["session_id"] == discord_server.session(0).session_id
    assert len(discord_server.identifies) == 1  # resumed, not a new session
    assert [e for e, d, _ in discord_server.dispatched if e == "MESSAGE_CREATE" and d["id"] == first["id"]]
    assert len(fake_engine.requests_to("/v1/chat/completions")) == chats + 1
    assert len(sealed(discord_server, since)) == 1
    await assert_answered_once(bot, discord_server, missed, "The door opens.")
    story = await bot.store.active_story(discord_server.world.story_channel_id)
    assert await bot.store.count_turns(story.id) == 5  # greeting, and two exchanges: no turn twice
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a replay is expected, not an error


async def test_a_message_seen_again_after_a_restart_is_not_answered_again(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine,
        caplog: pytest.LogCaptureFixture) -> None:
    """The process forgot which messages it handled (a restart): the stored turn is the guard."""
    await start_story(discord_server)
    await bot.store.update_guild_settings(discord_server.world.guild_id, cooldown_s=0)
    said = await reply_to(discord_server, "Is the tide coming in?")
    chats = len(fake_engine.requests_to("/v1/chat/completions"))
    story = await bot.store.active_story(discord_server.world.story_channel_id)
    turns = await bot.store.count_turns(story.id)
    bot.get_cog("Chat")._seen.clear()  # noqa: SLF001  (what a restart forgets)
    since = len(discord_server.calls)
    await discord_server.dispatch("MESSAGE_CREATE", said)
    await asyncio.sleep(1.0)
    assert len(fake_engine.requests_to("/v1/chat/completions")) == chats
    assert [c for c in discord_server.calls[since:] if c in discord_server.webhook_calls()] == []
    assert await bot.store.count_turns(story.id) == turns
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_store_refuses_a_second_turn_for_one_message(store: Store) -> None:
    persona = await store.get_persona(22, "Wren Halloway")
    story = await store.start_story(11, 22, persona.id)
    await store.add_turn(story.id, NewTurn(AuthorKind.USER, "hello", author_id=5, message_ids=[777]))
    with pytest.raises(DuplicateMessage) as refused:
        await store.add_turn(story.id, NewTurn(AuthorKind.USER, "hello", author_id=5, message_ids=[777]))
    assert refused.value.message_ids == [777]
    assert await store.count_turns(story.id) == 1
    after = await store.add_turn(story.id, NewTurn(AuthorKind.USER, "next", author_id=5, message_ids=[778]))
    assert after.position == 2  # the refused one took no position


# -- the webhook deleted during a stream ------------------------------------------------------------


async def test_a_webhook_deleted_while_a_reply_streams_still_delivers_it_once(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine) -> None:
    first = await start_story(discord_server)
    fake_engine.reply, fake_engine.token_delay = REPLY, 0.04  # ~3 s of streaming edits
    since = len(discord_server.calls)
    said = await discord_server.user_says("Wren, tell me the whole story.")
    posted = await discord_server.wait_for_call(
        lambda c: c.method == "POST" and c in discord_server.webhook_calls() and c.status == 200, since=since,
        wait_s=20)
    discord_server.delete_webhook(discord_server.world.story_channel_id)  # mid-stream
    await discord_server.wait_for_call(lambda _: len(sealed(discord_server, since)) >= 1, since=since, wait_s=20)
    gone = [c for c in discord_server.calls[since:] if c.status == 404 and c.response.get("code") == 10015]
    assert gone  # the bot did meet the deleted webhook
    assert posted.path.split("/")[2] != sealed(discord_server, since)[0].path.split("/")[2]
    assert first.path.split("/")[2] != sealed(discord_server, since)[0].path.split("/")[2]
    await assert_answered_once(bot, discord_server, said, REPLY)
