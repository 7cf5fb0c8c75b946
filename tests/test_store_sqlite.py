"""SQLite's connections (bot/store/sqlite.py): one trip to aiosqlite's thread a statement, and the same
results and errors SQLAlchemy gets from aiosqlite's own cursor."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from bot.store.db import make_engine
from bot.store.sqlite import OneTripConnection


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
