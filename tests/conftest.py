"""Shared fixtures: environment for offline models, and a real database on SQLite and PostgreSQL.

PostgreSQL tests run when MASQUE_TEST_POSTGRES_URL is set (a server URL such as
postgresql+asyncpg://masque:masque@127.0.0.1:5432/masque); each test gets a
fresh database created on that server and dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CARDS = REPO / "tests" / "fixtures" / "cards"  # the project's own cards (see make_cards.py there)
SHARED_FIXTURES = Path(os.environ.get("MASQUE_SHARED_DIR", REPO.parent / "shared")) / "fixtures"
POSTGRES_ENV = "MASQUE_TEST_POSTGRES_URL"

# Never reach for a model hub in tests; cache built/converted models between runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MASQUE_CACHE_DIR", str(REPO / ".cache" / "test-models"))


def postgres_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


def require_postgres() -> str:
    url = postgres_url()
    if not url:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql+asyncpg://user:pw@127.0.0.1/db)")
    return url


def ecosystem_cards() -> Path:
    """The ecosystem's real cards (SillyTavern's defaults), beside the repository when present.

    Tests on them are extras: every behaviour is also tested on the project's own cards in CARDS.
    """
    folder = SHARED_FIXTURES / "cards"
    if not folder.is_dir():
        pytest.skip(f"an extra on the ecosystem's real cards, which are not here ({folder} is missing)")
    return folder


@pytest.fixture
def shared_cards() -> Path:
    return ecosystem_cards()


async def _postgres_database(server_url: str) -> tuple[str, str]:
    """Create an empty database on the server; returns (its URL, its name)."""
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"masque_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(user=url.username, password=url.password, host=url.host or "127.0.0.1",
                                 port=url.port or 5432, database=url.database or "postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(database=name).render_as_string(hide_password=False), name


async def _drop_postgres_database(server_url: str, name: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    conn = await asyncpg.connect(user=url.username, password=url.password, host=url.host or "127.0.0.1",
                                 port=url.port or 5432, database=url.database or "postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'masque.db'}"
        return
    async for url in _fresh_postgres_database():
        yield url


@pytest.fixture
async def postgres_database_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database (skips without MASQUE_TEST_POSTGRES_URL)."""
    async for url in _fresh_postgres_database():
        yield url


async def _fresh_postgres_database() -> AsyncIterator[str]:
    server = require_postgres()
    url, name = await _postgres_database(server)
    try:
        yield url
    finally:
        await _drop_postgres_database(server, name)


@pytest.fixture
async def store(database_url: str):
    """A real Store on `database_url`, migrated to head, with the built-in personas."""
    from bot.builtin import builtin_personas
    from bot.store import Store

    store = Store(database_url)
    await store.upgrade()
    await store.sync_builtin_personas(builtin_personas())
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def endpoints_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """discord.py's REST base and gateway URL are process-wide (the app's apply_endpoints and the tests
    that point clients at the fake Discord set them): put them back after the test."""
    import discord

    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
