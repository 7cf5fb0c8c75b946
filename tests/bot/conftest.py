"""Fixtures for the bot's tests: a fake engine over real HTTP, and real stores.

- `fake_engine`: a started `tests.fakes.fake_engine.FakeEngine` (one per test); configure it in
  the test (`fake_engine.reply = ...`, `await fake_engine.set_mode("slow")`) and read
  `fake_engine.requests` afterwards.
- `store`: a real SQLite file in tmp_path, migrated with `await store.upgrade()`, built-ins synced.
  (Overrides the root conftest's store, which also runs every test on PostgreSQL.)
- `pg_store`: the same on a fresh PostgreSQL database when MASQUE_TEST_POSTGRES_URL is set,
  skipped otherwise.
- `bot_settings`: BotSettings pointing at the fake engine and the SQLite file, no token.
- `script`: what the fake engine answers (tests.bot.story_helpers.Script); `pipeline`: a
  StoryPipeline on `store` talking to the fake engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.builtin import builtin_personas
from bot.engine_client import EngineClient
from bot.pipeline import StoryPipeline
from bot.settings import BotSettings
from bot.store import Store
from tests.bot.story_helpers import Script, settings_for
from tests.conftest import _drop_postgres_database, _postgres_database, require_postgres
from tests.fakes.fake_engine import FakeEngine


@pytest.fixture
async def fake_engine() -> AsyncIterator[FakeEngine]:
    """A fake OpenAI-shaped engine on a free loopback port, stopped after the test."""
    engine = FakeEngine()
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def _open_store(url: str) -> Store:
    store = Store(url)
    await store.upgrade()
    await store.sync_builtin_personas(builtin_personas())
    return store


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a fresh SQLite file for this test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'masque.db'}"


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    """A real Store on a SQLite file, migrated to head, with the built-in personas."""
    store = await _open_store(sqlite_url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def pg_store() -> AsyncIterator[Store]:
    """A real Store on a fresh PostgreSQL database (skipped without MASQUE_TEST_POSTGRES_URL)."""
    server = require_postgres()
    url, name = await _postgres_database(server)
    store = await _open_store(url)
    try:
        yield store
    finally:
        await store.close()
        await _drop_postgres_database(server, name)


@pytest.fixture
def bot_settings(fake_engine: FakeEngine, sqlite_url: str) -> BotSettings:
    """Settings for a bot that talks to `fake_engine` and keeps its story in `sqlite_url`."""
    return BotSettings(MASQUE_ENGINE_URL=fake_engine.url, MASQUE_DATABASE_URL=sqlite_url, DISCORD_TOKEN=None,
                       _env_file=None)


@pytest.fixture
def script(fake_engine: FakeEngine) -> Script:
    """What the fake engine answers (queued replies, then a default)."""
    script = Script()
    fake_engine.reply = script
    return script


@pytest.fixture
async def pipeline(store: Store, fake_engine: FakeEngine, script: Script) -> AsyncIterator[StoryPipeline]:
    settings = settings_for(fake_engine.url)
    engine = EngineClient.from_settings(settings)
    yield StoryPipeline(store, engine, settings)
    await engine.close()
