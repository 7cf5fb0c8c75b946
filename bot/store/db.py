"""Database engine, sessions and schema upgrades (alembic, run at start-up)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from platformdirs import user_data_dir
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot.store.notify import ALL, CacheNotices, DatabaseInUse, ProcessLock
from bot.store.sqlite import connector

log = logging.getLogger(__name__)
SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY = "masque_read_only"  # execution option of the engine behind `Database.read()`
CACHE_TTL_S = 60.0  # a bound on staleness for writers that announce nothing (another SQLite process)
# The database connections a process keeps open, and uses at most (MASQUE_DATABASE_POOL_SIZE); a
# session that finds them all busy waits for one. SQLAlchemy's default (5 kept, 10 more opened for a
# session and closed after it) had 50 busy channels open ~20 PostgreSQL connections a second, each a
# TCP and SCRAM handshake and a server process, and SQLite ones at a thread each.
POOL_SIZE = 20
T = TypeVar("T")


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


def make_engine(url: str, pool_size: int = POOL_SIZE) -> AsyncEngine:
    """An async engine keeping `pool_size` connections (no more); SQLite gets a busy timeout, foreign
    keys, write-ahead logging and one trip to its connection's thread a statement (bot/store/sqlite.py)."""
    parsed = make_url(url)
    pool = {"pool_size": pool_size, "max_overflow": 0}
    if parsed.get_backend_name() != "sqlite":
        if parsed.get_driver_name() != "asyncpg":
            return create_async_engine(url, pool_pre_ping=True, **pool)
        engine = create_async_engine(url, **pool)
        _drop_closed_connections(engine)
        return engine
    in_memory = not parsed.database or parsed.database == ":memory:"  # one connection: SQLAlchemy's StaticPool
    if not in_memory:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, async_creator=connector(parsed, timeout=SQLITE_BUSY_TIMEOUT_S),
                                 **({} if in_memory else pool))
    _configure_sqlite(engine)
    return engine


def _drop_closed_connections(engine: AsyncEngine) -> None:
    """A pooled asyncpg connection the server closed (a restart, a failover, an idle timeout) is
    replaced when it is taken from the pool. asyncpg learns of the close as it happens, so this
    costs no round trip, where pool_pre_ping's costs three (begin, ping, rollback) on every
    checkout: about as much CPU as the statements of a typical session."""
    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_conn, _record, _proxy) -> None:
        if dbapi_conn.driver_connection.is_closed():
            raise DisconnectionError("the database closed this pooled connection")


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL loses no committed data on an application crash and keeps the
        # database consistent on power loss; it only skips the fsync on every commit.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (IMMEDIATE): two concurrent writers then queue on
        # the busy timeout instead of one failing on lock upgrade. Readers begin deferred, so with
        # WAL they read a snapshot and never wait behind a writer.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


class Database:
    """Owns the engine and the session factory; the base of `Store`."""

    def __init__(self, url: str | None = None, pool_size: int = POOL_SIZE):
        self.url = url or default_database_url()
        self.engine = make_engine(self.url, pool_size)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._sqlite = self.engine.dialect.name == "sqlite"
        # PostgreSQL reads run without BEGIN/COMMIT (two round trips each, on every read): at its
        # default isolation, READ COMMITTED, each statement takes its own snapshot in a transaction too.
        reads = {READ_ONLY: True} if self._sqlite else {READ_ONLY: True, "isolation_level": "AUTOCOMMIT"}
        self.read_sessions = async_sessionmaker(self.engine.execution_options(**reads), expire_on_commit=False)
        self._write_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
            weakref.WeakKeyDictionary()
        # Rows read on every message: active stories, personas, guild and channel settings. See
        # `_cached`; other processes' changes arrive through `_notices` (bot/store/notify.py).
        self._cache: dict[tuple[str, int], tuple[float, Any]] = {}
        self._cache_epoch = 0
        self._cache_live = True  # False while the PostgreSQL listener is down: nothing is cached then
        self._notices: CacheNotices | None = None
        self._persona_turn_at: dict[int, int] = {}  # story id -> its newest persona turn (StoryRepo.answer_after)
        self._process_lock: ProcessLock | None = None

    async def listen(self) -> None:
        """PostgreSQL: hear other processes' changes to cached rows, and announce ours (bot processes
        and the CLI call this after `upgrade`). SQLite: nothing to do."""
        if self._sqlite or self._notices is not None:
            return
        self._notices = CacheNotices(self.url, self._drop, self._set_live)
        await self._notices.start()

    def claim_process(self, *, every_shard: bool = True) -> None:
        """A bot process takes the database. SQLite serves one process, which runs every shard:
        raise `DatabaseInUse` for a second process or for one that runs only some shards."""
        if not self._sqlite:
            return
        if not every_shard:
            raise DatabaseInUse("MASQUE_SHARD_IDS runs only some of the bot's shards here, so other "
                                "processes run the rest; they need one PostgreSQL database "
                                "(MASQUE_DATABASE_URL=postgresql+asyncpg://...), not SQLite.")
        database = make_url(self.url).database
        if self._process_lock is None and database and database != ":memory:":
            lock = ProcessLock(Path(database).expanduser())
            lock.acquire()
            self._process_lock = lock

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction that may write: committed on success, rolled back on error."""
        async with self._writer_turn(), self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A Core connection in a transaction that may write, for hot writes of Core statements: the
        ORM's execution path (`session.execute`) costs more CPU than the statements themselves."""
        async with self._writer_turn(), self.engine.begin() as connection:
            yield connection

    async def write_in_one_trip(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """SQLite only, for the hottest writes: `work(sqlite3_connection)` in one write transaction, run in
        one trip to the connection's thread (`OneTripConnection.write`; its statements: `Prepared`).
        sqlite3's errors come back as SQLAlchemy's (IntegrityError, OperationalError, ...)."""
        async with self._writer_turn(), self.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            try:
                return await raw.driver_connection.write(work)
            except sqlite3.Error as exc:
                raise DBAPIError.instance(None, None, exc, sqlite3.Error, dialect=self.engine.dialect) from exc

    @asynccontextmanager
    async def _writer_turn(self) -> AsyncIterator[None]:
        """SQLite has one writer at a time. Queue this process's writers here, in arrival order,
        rather than in SQLite's busy handler, which sleeps in steps of up to 100 ms and so leaves
        the lock idle while writers wait (the busy timeout still covers other processes)."""
        if not self._sqlite:
            yield
            return
        lock = self._write_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with asyncio.timeout(SQLITE_BUSY_TIMEOUT_S):
            await lock.acquire()
        try:
            yield
        finally:
            lock.release()

    async def retrying_disconnect(self, write: Callable[[], Awaitable[T]]) -> T:
        """`write()`, run once more when its connection died under it (a database restart, a failover):
        the server rolled the transaction back, and the pool hands the retry a live connection.
        Only for writes that are safe to repeat should the first one have committed after all (a
        connection lost during COMMIT): a turn with message ids is (the second insert is refused)."""
        try:
            return await write()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.warning("the database connection was lost during a write; retrying it once (%s)",
                        type(exc.orig).__name__)
        return await write()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads (SQLite: one snapshot, in a transaction that never waits for a writer;
        PostgreSQL: each statement sees what was committed when it began, as in a transaction there)."""
        async with self.read_sessions() as session, session.begin():
            yield session

    async def _cached(self, kind: str, key: int, load: Callable[[], Awaitable[T]]) -> T:
        """`load()`'s result, kept for CACHE_TTL_S. The writers of such rows call `forget` after
        committing; a load that overlapped a `forget` is returned but not kept."""
        if not self._cache_live:
            return await load()
        entry = self._cache.get((kind, key))
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        epoch = self._cache_epoch
        value = await load()
        if epoch == self._cache_epoch and self._cache_live:
            self._cache[(kind, key)] = (time.monotonic() + CACHE_TTL_S, value)
        return value

    def forget(self, kind: str, key: int | None = None) -> None:
        """Drop cached `kind` rows (all of them when `key` is None; every kind's when `kind` is
        `ALL`), here and in every other process listening; call it after the change commits."""
        self._drop(kind, key)
        if self._notices is not None:
            self._notices.publish(kind, key)

    def _drop(self, kind: str, key: int | None) -> None:
        self._cache_epoch += 1
        if kind == ALL:
            self._cache.clear()
        elif key is not None:
            self._cache.pop((kind, key), None)
        else:
            for cached in [k for k in self._cache if k[0] == kind]:
                del self._cache[cached]

    def _forget_all(self) -> None:
        self._cache_epoch += 1
        self._cache.clear()

    def _set_live(self, live: bool) -> None:
        """The listener is up (or down): notices missed meanwhile make every cached row suspect."""
        self._forget_all()
        self._cache_live = live

    async def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to `revision` (the app calls this at start; no create_all)."""
        cfg = alembic_config(self.url)
        async with self.engine.begin() as conn:
            await conn.run_sync(_run_with_connection, cfg, command.upgrade, revision)
        self._forget_all()

    async def downgrade(self, revision: str) -> None:
        cfg = alembic_config(self.url)
        async with self.engine.begin() as conn:
            await conn.run_sync(_run_with_connection, cfg, command.downgrade, revision)
        self._forget_all()

    async def current_revision(self) -> str | None:
        async with self.engine.connect() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    async def close(self) -> None:
        if self._notices is not None:
            await self._notices.close()
            self._notices = None
        if self._process_lock is not None:
            self._process_lock.release()
            self._process_lock = None
        await self.engine.dispose()


def _run_with_connection(conn: Connection, cfg: Config, action, revision: str) -> None:
    # migrations/env.py uses this connection instead of opening its own event loop.
    cfg.attributes["connection"] = conn
    action(cfg, revision)
