"""Database engine, sessions and schema upgrades (alembic, run at start-up)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from platformdirs import user_data_dir
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)
SQLITE_BUSY_TIMEOUT_S = 30


def default_database_url() -> str:
    """A SQLite file in the user's data folder (~/.local/share/masque/masque.db on Linux)."""
    return f"sqlite+aiosqlite:///{Path(user_data_dir('masque')) / 'masque.db'}"


def migrations_dir() -> Path:
    """The alembic scripts, from the source tree or the installed wheel (bot.migrations)."""
    return Path(str(resources.files("bot.migrations")))


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url:
        cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def make_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite gets a busy timeout, foreign keys and write-ahead logging."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front: two concurrent writers then
        # queue on the busy timeout instead of one failing on lock upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Owns the engine and the session factory; the base of `Store`."""

    def __init__(self, url: str | None = None):
        self.url = url or default_database_url()
        self.engine = make_engine(self.url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    async def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to `revision` (the app calls this at start; no create_all)."""
        cfg = alembic_config(self.url)
        async with self.engine.begin() as conn:
            await conn.run_sync(_run_with_connection, cfg, command.upgrade, revision)

    async def downgrade(self, revision: str) -> None:
        cfg = alembic_config(self.url)
        async with self.engine.begin() as conn:
            await conn.run_sync(_run_with_connection, cfg, command.downgrade, revision)

    async def current_revision(self) -> str | None:
        async with self.engine.connect() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    async def close(self) -> None:
        await self.engine.dispose()


def _run_with_connection(conn: Connection, cfg: Config, action, revision: str) -> None:
    # migrations/env.py uses this connection instead of opening its own event loop.
    cfg.attributes["connection"] = conn
    action(cfg, revision)
