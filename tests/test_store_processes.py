"""Several bot processes on one database: cached rows stay right, and SQLite refuses a second process.

Two `Store`s on one database stand for two processes (each has its own engine, pool, cache and
listener connection, as a process would). On PostgreSQL a change made through one reaches the
other's cache through LISTEN/NOTIFY; a change made behind a store's back (plain SQL, no notice)
shows that the cache really is a cache, so these tests would fail without the notices.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from bot.builtin import builtin_personas
from bot.store import GLOBAL_GUILD, DatabaseInUse, Store
from bot.store.notify import listener_connect_args, notice, parse_notice

GUILD = 42
WAIT_S = 10.0


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def two_processes(postgres_database_url: str) -> AsyncIterator[tuple[Store, Store]]:
    first, second = Store(postgres_database_url), Store(postgres_database_url)
    await first.upgrade()
    await first.sync_builtin_personas(builtin_personas())
    for store in (first, second):
        await store.listen()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def set_behind_its_back(store: Store, guild_id: int, settings: str) -> None:
    """Change a guild's settings with plain SQL: no store method, so no notice."""
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE guild_settings SET settings = CAST(:s AS JSON) WHERE guild_id = :g"),
                           {"s": settings, "g": guild_id})


async def heard_by(store: Store, change: Awaitable[object]) -> None:
    """Make `change` and wait until `store` (another process) has acted on its notice."""
    heard = store._notices.heard  # noqa: SLF001
    await change
    await until(lambda: _async(store._notices.heard > heard), "the notice")  # noqa: SLF001


async def _async(value: bool) -> bool:
    return value


async def test_a_change_in_one_process_reaches_the_others_cache_at_once(two_processes):
    first, second = two_processes
    await heard_by(second, first.update_guild_settings(GUILD, reply_mode="mention"))
    assert (await second.guild_settings(GUILD))["reply_mode"] == "mention"  # cached in `second` now
    await set_behind_its_back(first, GUILD, '{"reply_mode": "unseen"}')
    assert (await second.guild_settings(GUILD))["reply_mode"] == "mention"  # a cache: it does not re-read

    started = time.monotonic()
    await first.update_guild_settings(GUILD, reply_mode="all")
    await until(lambda: _mode_is(second, "all"), "the second process to see the change")
    assert time.monotonic() - started < 2.0  # not the 60 s cache lifetime

    persona = await first.get_persona(GLOBAL_GUILD, "Wren Halloway")
    await second.get_persona_by_id(persona.id)  # cached in `second`
    await first.update_persona(persona.id, avatar=b"new avatar")
    async def avatar_changed() -> bool:
        return (await second.get_persona_by_id(persona.id)).avatar == b"new avatar"
    await until(avatar_changed, "the edited persona in the second process")


async def _mode_is(store: Store, mode: str) -> bool:
    return (await store.guild_settings(GUILD)).get("reply_mode") == mode


async def test_while_the_listener_is_down_nothing_is_cached_and_it_comes_back(two_processes):
    first, second = two_processes
    await heard_by(second, first.update_guild_settings(GUILD, reply_mode="mention"))
    assert await _mode_is(second, "mention")
    pid = second._notices.connection.get_server_pid()  # noqa: SLF001 - the listener's backend
    async with first.engine.begin() as conn:  # as a failover or an admin's pg_terminate_backend would
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    # Notices may be missed now, so `second` must read afresh: a change nobody announced is seen.
    await set_behind_its_back(first, GUILD, '{"reply_mode": "unseen"}')
    await until(lambda: _mode_is(second, "unseen"), "a fresh read while not listening")

    await until(_listening_again(second, pid), "the listener to reconnect")
    assert await _mode_is(second, "unseen")
    await first.update_guild_settings(GUILD, reply_mode="all")  # announced: heard on the new connection
    await until(lambda: _mode_is(second, "all"), "the change after the reconnect")


def _listening_again(store: Store, old_pid: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        connection = store._notices.connection  # noqa: SLF001
        return connection is not None and connection.get_server_pid() != old_pid and store._cache_live  # noqa: SLF001
    return check


async def test_changes_made_while_disconnected_are_announced_after(two_processes):
    first, second = two_processes
    await heard_by(second, first.update_guild_settings(GUILD, reply_mode="mention"))
    assert await _mode_is(second, "mention")
    pid = first._notices.connection.get_server_pid()  # noqa: SLF001 - the announcing side goes down
    async with second.engine.begin() as conn:
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    await first.update_guild_settings(GUILD, reply_mode="all")  # its notice waits for the reconnect
    await until(lambda: _mode_is(second, "all"), "the announcement sent once reconnected")


def test_the_listener_connects_as_the_pool_does_tls_included():
    args = listener_connect_args("postgresql+asyncpg://bot:s3cret@db.example:6543/masque?ssl=require"
                                 "&prepared_statement_cache_size=0")  # SQLAlchemy's option, not asyncpg's
    assert args == {"host": "db.example", "port": 6543, "user": "bot", "password": "s3cret",
                    "database": "masque", "ssl": "require"}
    assert listener_connect_args("postgresql+asyncpg://bot@/masque") == {"user": "bot", "database": "masque"}


def test_notices_parse_back_and_junk_is_ignored():
    assert parse_notice(notice("abc", "personas", None)) == ("abc", "personas", None)
    assert parse_notice(notice("abc", "guild_settings", -7)) == ("abc", "guild_settings", -7)
    for junk in ("", "abc personas", "a b c d", "abc personas x1"):
        assert parse_notice(junk) is None


# -- SQLite: one process ---------------------------------------------------------------------------

async def test_a_second_process_on_one_sqlite_file_is_refused(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'masque.db'}"
    first, second = Store(url), Store(url)
    await first.upgrade()
    first.claim_process()
    with pytest.raises(DatabaseInUse, match="another Masque bot process is using the SQLite database"):
        second.claim_process()
    await first.close()  # the first process stops: the database is free
    second.claim_process()
    await second.close()


async def test_sqlite_refuses_a_process_that_runs_only_some_shards(tmp_path: Path):
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'masque.db'}")
    try:
        with pytest.raises(DatabaseInUse, match="PostgreSQL"):
            store.claim_process(every_shard=False)
    finally:
        await store.close()


HOLD = """
import asyncio, sys
from bot.store import Store
async def main():
    store = Store(sys.argv[1]); await store.upgrade(); store.claim_process()
    print("holding", flush=True); await asyncio.sleep(60)
asyncio.run(main())
"""


def test_masque_bot_says_why_it_will_not_start(tmp_path: Path):
    """The real `masque-bot`: refused beside another process, and with some shards on SQLite."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'masque.db'}"
    env = {**os.environ, "MASQUE_DATABASE_URL": url, "MASQUE_ENGINE_URL": "http://127.0.0.1:9",
           "MASQUE_CACHE_DIR": str(tmp_path)}
    env.pop("DISCORD_TOKEN", None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        second = subprocess.run([sys.executable, "-m", "bot", "--console"], env=env, capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert second.returncode == 2
        assert "another Masque bot process is using the SQLite database" in second.stderr
    finally:
        holder.kill()
        holder.wait()
    sharded = subprocess.run([sys.executable, "-m", "bot"], capture_output=True, text=True, timeout=120,
                             env={**env, "MASQUE_SHARD_COUNT": "4", "MASQUE_SHARD_IDS": "0-1"},
                             stdin=subprocess.DEVNULL)
    assert sharded.returncode == 2 and "need one PostgreSQL database" in sharded.stderr


async def test_a_server_erased_in_one_process_leaves_no_cached_rows_in_the_others(two_processes):
    """`/masque forget-server` (or the 30-day purge) in one process: the other processes' caches of
    that server's active stories, channels, settings and personas go at once, not after 60 s."""
    first, second = two_processes
    guild, channel = GUILD + 1, 4242
    persona = await first.get_persona(GLOBAL_GUILD, "Wren Halloway")
    await first.bind_personas(channel, guild, [persona.id])
    await first.start_story(channel, guild, persona.id)
    await first.update_guild_settings(guild, reply_mode="mention")
    assert await second.active_story(channel) is not None  # cached in `second` now
    assert await second.channel_persona_ids(channel) == [persona.id]
    assert (await second.guild_settings(guild))["reply_mode"] == "mention"

    await heard_by(second, first.erase_guild(guild))
    assert await second.active_story(channel) is None
    assert await second.channel_persona_ids(channel) == []
    assert "reply_mode" not in await second.guild_settings(guild)
