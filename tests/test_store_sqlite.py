"""SQLite's connections (bot/store/sqlite.py): one trip to aiosqlite's thread a statement, and the same
results and errors SQLAlchemy gets from aiosqlite's own cursor; a hot write's whole transaction in one
trip, on statements compiled once."""

from __future__ import annotations

import asyncio
import enum
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import JSON, Column, DateTime, Enum, Integer, MetaData, Table, Text, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from bot.store.db import POOL_SIZE, Database, make_engine
from bot.store.sqlite import OneTripConnection, Prepared


@pytest.fixture
async def engine(tmp_path: Path):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE)"))
    yield engine
    await engine.dispose()


async def test_a_statement_takes_one_trip_to_the_connection_thread(engine, monkeypatch):
    trips = []
    real = OneTripConnection._execute

    async def counted(self, fn, *args, **kwargs):
        trips.append(fn)
        return await real(self, fn, *args, **kwargs)

    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert isinstance(raw.driver_connection, OneTripConnection)
        await conn.execute(text("SELECT 0"))  # the transaction's BEGIN is a statement too
        monkeypatch.setattr(OneTripConnection, "_execute", counted)
        rows = (await conn.execute(text("SELECT 1 UNION ALL SELECT 2"))).all()
        # aiosqlite's own cursor takes four: open a cursor, execute, fetch the rows, close
        assert len(trips) == 1
    assert rows == [(1,), (2,)]


async def test_rows_rowcount_lastrowid_and_executemany(engine):
    async with engine.begin() as conn:
        first = await conn.execute(text("INSERT INTO t (name) VALUES ('a')"))
        assert first.lastrowid == 1 and first.rowcount == 1
        many = await conn.execute(text("INSERT INTO t (name) VALUES (:name)"), [{"name": n} for n in "bcde"])
        assert many.rowcount == 4
        returned = await conn.execute(text("INSERT INTO t (name) VALUES ('f') RETURNING id, name"))
        assert returned.all() == [(6, "f")]
        updated = await conn.execute(text("UPDATE t SET name = name || '!' WHERE id > 3"))
        assert updated.rowcount == 3
    async with engine.connect() as conn:
        result = await conn.execute(text("SELECT id, name FROM t ORDER BY id"))
        assert list(result.keys()) == ["id", "name"]
        assert result.fetchone() == (1, "a")
        assert result.fetchmany(2) == [(2, "b"), (3, "c")]
        assert result.fetchall() == [(4, "d!"), (5, "e!"), (6, "f!")]
        assert (await conn.execute(text("SELECT id FROM t WHERE id > 99"))).all() == []


async def test_errors_are_sqlalchemys_and_the_connection_lives_on(engine):
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (name) VALUES ('a')"))
    with pytest.raises(IntegrityError) as caught:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t (name) VALUES ('a')"))
    assert isinstance(caught.value.orig, sqlite3.IntegrityError) or "UNIQUE" in str(caught.value)
    with pytest.raises(OperationalError, match="no such table"):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT * FROM missing"))
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1


async def test_the_urls_file_uri_and_options_reach_sqlite(engine, tmp_path: Path):
    read_only = make_engine(f"sqlite+aiosqlite:///file:{tmp_path / 'one.db'}?mode=ro&uri=true")
    try:
        async with read_only.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 0
        with pytest.raises(OperationalError, match="readonly"):
            async with read_only.begin() as conn:
                await conn.execute(text("INSERT INTO t (name) VALUES ('x')"))
    finally:
        await read_only.dispose()


async def test_rollbacks_roll_back_and_a_committed_connection_goes_back_without_a_trip(engine, monkeypatch):
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t (name) VALUES ('gone')"))
            raise RuntimeError("a failure mid-transaction")
    async with engine.connect() as conn:  # closed without a commit: the pool's reset rolls it back
        await conn.execute(text("INSERT INTO t (name) VALUES ('never committed')"))
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 0

    trips = []
    real = OneTripConnection._execute

    async def counted(self, fn, *args, **kwargs):
        trips.append(getattr(fn, "__name__", ""))
        return await real(self, fn, *args, **kwargs)

    monkeypatch.setattr(OneTripConnection, "_execute", counted)
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (name) VALUES ('kept')"))
    assert trips.count("commit") == 1 and "rollback" not in trips


class Mood(enum.Enum):
    CALM = "calm"
    STORMY = "stormy"


_FEELINGS = Table("feelings", MetaData(), Column("id", Integer, primary_key=True), Column("mood", Enum(Mood)),
                  Column("notes", JSON), Column("at", DateTime(timezone=True)), Column("said", Text))


async def test_prepared_statements_store_what_sqlalchemy_stores(tmp_path: Path):
    """A row written through `Prepared` on the raw connection is stored byte for byte as SQLAlchemy's
    own insert stores it (its enum, JSON and datetime conversions), so the ORM reads both alike."""
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'prepared.db'}")
    async with database.engine.begin() as conn:
        await conn.run_sync(_FEELINGS.metadata.create_all)
    row = {"mood": Mood.STORMY, "notes": [{"weather": "hail"}, "ünï"], "at": datetime(2026, 12, 6, 9, 5, tzinfo=UTC),
           "said": "it's 'quoted'"}
    try:
        async with database.engine.begin() as conn:
            await conn.execute(insert(_FEELINGS), {"id": 1, **row})
        prepared = Prepared(insert(_FEELINGS).returning(_FEELINGS.c.id), ["id", *row])
        returned = await database.write_in_one_trip(
            lambda db: db.execute(prepared.sql, prepared.parameters({"id": 2, **row})).fetchone())
        assert returned == (2,)
        async with database.engine.connect() as conn:
            stored = (await conn.execute(text("SELECT mood, notes, at, said FROM feelings ORDER BY id"))).all()
            read = (await conn.execute(select(_FEELINGS).order_by(_FEELINGS.c.id))).all()
        assert stored[0] == stored[1]
        assert read[1][1:] == read[0][1:] and read[1].mood is Mood.STORMY and read[1].notes == row["notes"]
    finally:
        await database.close()


async def test_a_write_in_one_trip_is_one_transaction_and_one_trip(tmp_path: Path, monkeypatch):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'trip.db'}")
    async with database.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE)"))

    def insert_names(*names: str):
        def work(db: sqlite3.Connection) -> int:
            for name in names:
                db.execute("INSERT INTO t (name) VALUES (?)", (name,))
            return len(names)
        return work

    def fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (name) VALUES ('half')")
        raise LookupError("the story is gone")

    trips = []
    real = OneTripConnection._execute

    async def counted(self, fn, *args, **kwargs):
        trips.append(fn)
        return await real(self, fn, *args, **kwargs)

    try:
        monkeypatch.setattr(OneTripConnection, "_execute", counted)
        assert await database.write_in_one_trip(insert_names("a", "b", "c")) == 3
        assert len(trips) == 1  # BEGIN IMMEDIATE, three inserts and COMMIT; giving the connection back: none
        monkeypatch.undo()
        with pytest.raises(IntegrityError):  # sqlite3's error, as SQLAlchemy's
            await database.write_in_one_trip(insert_names("d", "a"))
        with pytest.raises(LookupError, match="gone"):
            await database.write_in_one_trip(fail)
        async with database.engine.connect() as conn:
            names = (await conn.execute(text("SELECT name FROM t ORDER BY id"))).scalars().all()
        assert names == ["a", "b", "c"]  # "d" and "half" were rolled back with their transactions
        assert await database.write_in_one_trip(insert_names("e")) == 1  # the connection lives on
    finally:
        await database.close()


async def test_a_burst_waits_for_the_pools_connections_instead_of_opening_more(tmp_path: Path, monkeypatch):
    """Two bursts of 60 sessions at once: at most POOL_SIZE connections are ever opened (each one a
    thread here, a handshake and a server process with PostgreSQL), and the second burst opens none."""
    opened = []
    real = OneTripConnection.__init__

    def counted(self, *args, **kwargs):
        opened.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(OneTripConnection, "__init__", counted)
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")

    async def reader(i: int) -> int:
        async with database.read() as session:
            await asyncio.sleep(0.01)  # all 60 overlap
            return (await session.execute(text(f"SELECT {i}"))).scalar()

    try:
        assert await asyncio.gather(*(reader(i) for i in range(60))) == list(range(60))
        assert len(opened) == POOL_SIZE
        assert await asyncio.gather(*(reader(i) for i in range(60))) == list(range(60))
        assert len(opened) == POOL_SIZE
    finally:
        await database.close()
