"""Two bot processes, one bot: the real MasqueBot on shards 0 and 1 of 2, on one PostgreSQL database.

Each "process" is a MasqueBot with its own Store (its own pool, cache and LISTEN connection) and
MASQUE_SHARD_COUNT=2 / MASQUE_SHARD_IDS=<its shard>, against one fake Discord that shards its gateway
as Discord does. The guild's events reach only the shard that owns it, so a message is answered once;
a settings change made through the other process reaches the owner's cache at once (LISTEN/NOTIFY),
not after the cache's 60 s lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from bot.builtin import builtin_personas
from bot.prefs import ReplyMode
from bot.store import Store
from tests.bot.test_e2e_gateway import persona_posts, running_bot, start_story
from tests.fakes.fake_discord import FakeDiscord
from tests.fakes.fake_engine import FakeEngine

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def two_bots(postgres_database_url: str, fake_engine: FakeEngine,
                   endpoints_restored: None) -> AsyncIterator[tuple[FakeDiscord, list]]:
    """The fake Discord with 2 shards and a bot process on each: [shard 0's bot, shard 1's bot]."""
    stores = [Store(postgres_database_url), Store(postgres_database_url)]
    await stores[0].upgrade()
    await stores[0].sync_builtin_personas(builtin_personas())
    for store in stores:
        await store.listen()
    async with FakeDiscord(shards=2) as server, contextlib.AsyncExitStack() as stack:
        bots = []
        for shard, store in enumerate(stores):
            bots.append(await stack.enter_async_context(running_bot(
                server, fake_engine.url, store, postgres_database_url,
                MASQUE_SHARD_COUNT=2, MASQUE_SHARD_IDS=str(shard))))
        try:
            yield server, bots
        finally:
            await stack.aclose()
            for store in stores:
                await store.close()


async def test_each_guild_is_played_by_the_process_of_its_shard(two_bots, fake_engine: FakeEngine):
    server, bots = two_bots
    owner = server.shard_of()
    assert sorted(server.identified_shards) == [(0, 2), (1, 2)]
    assert bots[owner].get_guild(server.world.guild_id) is not None
    assert bots[1 - owner].get_guild(server.world.guild_id) is None  # never sent to the other process

    await start_story(server)  # the slash command reaches the owner alone
    since = len(server.calls)
    said = await server.user_says("Is anyone on watch tonight?")
    await server.wait_for_call(lambda c: c.method == "POST" and c in server.webhook_calls(), since=since)
    await asyncio.sleep(1.0)  # time for a second answer, were one coming
    assert len(persona_posts(server)) == 2  # the greeting and one reply: answered once
    assert await bots[owner].store.turn_by_message(int(said["id"])) is not None
    assert len(fake_engine.requests_to("/v1/chat/completions")) == 1


async def test_a_change_made_in_the_other_process_is_used_at_once(two_bots):
    server, bots = two_bots
    owner = server.shard_of()
    guild = server.world.guild_id
    await bots[owner].store.update_guild_settings(guild, cooldown_s=0)  # so only reply_mode can hold it back
    await start_story(server)
    since = len(server.calls)
    await server.user_says("Hello, keeper.")
    await server.wait_for_call(lambda c: c.method == "POST" and c in server.webhook_calls(), since=since)
    posts = len(persona_posts(server))  # the owner has read (and cached) the guild's settings by now
    assert posts == 2  # the greeting and this reply

    # An admin's change handled by the other process (or `masque` on another machine): only mentions.
    other = bots[1 - owner].store
    heard = bots[owner].store._notices.heard  # noqa: SLF001
    started = time.monotonic()
    await other.update_guild_settings(guild, reply_mode=ReplyMode.MENTIONS.value)
    while bots[owner].store._notices.heard == heard:  # noqa: SLF001
        assert time.monotonic() - started < 5, "the owner never heard of the change"
        await asyncio.sleep(0.02)
    await server.user_says("Just talking to myself here.")
    await asyncio.sleep(1.5)
    assert len(persona_posts(server)) == posts  # not answered: the owner uses the new setting already
