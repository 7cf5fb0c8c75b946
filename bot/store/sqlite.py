"""SQLite connections for SQLAlchemy's aiosqlite dialect, at one trip to the connection's thread a statement.

aiosqlite runs each call on a sqlite3 connection in its own thread and hands the result back to the
event loop. SQLAlchemy's adapter makes four such calls a statement (open a cursor, execute, fetch
the rows, close the cursor), and each hand-off costs the event loop a wake-up and the two threads a
GIL exchange: on a message's dozen statements, more CPU than SQLite's own work. The cursor here
does the four in one call and keeps what SQLAlchemy reads afterwards (rows, description, rowcount,
lastrowid). A rollback with no transaction open (the pool's reset of every connection it takes
back) takes no trip. Everything else is aiosqlite's: its thread, its queue, its connection and errors.

The hottest write, a turn, goes further: its whole transaction (BEGIN IMMEDIATE, four statements,
COMMIT) runs in one trip (`OneTripConnection.write`), on statements compiled once (`Prepared`), at
about a third of the CPU of the same statements through SQLAlchemy's execution path.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import aiosqlite
from aiosqlite.context import contextmanager
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine import URL
from sqlalchemy.sql import ClauseElement

T = TypeVar("T")
DIALECT = SQLiteDialect_aiosqlite()  # what `Prepared` compiles for: the engines' dialect (qmark parameters)


class Prepared:
    """A Core statement compiled once for SQLite, for `OneTripConnection.write`'s work: its SQL, and
    its positional parameters from a dict of values converted as SQLAlchemy converts them (the
    columns' bind processors: enums, JSON, datetimes), so what it writes reads back through the ORM
    like any other row. `column_keys`: the columns an insert names (all that its values give)."""

    def __init__(self, statement: ClauseElement, column_keys: Sequence[str] | None = None):
        self._compiled = statement.compile(dialect=DIALECT, column_keys=column_keys)
        self.sql = self._compiled.string
        self._names = list(self._compiled.positiontup or ())
        self._processors = [self._compiled.binds[name].type.dialect_impl(DIALECT).bind_processor(DIALECT)
                            for name in self._names]

    def parameters(self, values: Mapping[str, Any]) -> list[Any]:
        given = self._compiled.construct_params(dict(values))
        return [given[name] if process is None else process(given[name])
                for name, process in zip(self._names, self._processors, strict=True)]


class OneTripCursor:
    """What SQLAlchemy's adapter uses of an aiosqlite cursor; a statement's rows arrive with it."""

    def __init__(self, connection: OneTripConnection):
        self._connection = connection
        self._rows: deque[Any] = deque()
        self.description: Sequence[tuple] | None = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.arraysize = 1

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> OneTripCursor:
        await self._run("execute", sql, [] if parameters is None else parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> OneTripCursor:
        await self._run("executemany", sql, parameters)
        return self

    async def _run(self, method: str, sql: str, parameters: Any) -> None:
        def statement(db: sqlite3.Connection) -> tuple:
            cursor = db.cursor()
            try:
                getattr(cursor, method)(sql, parameters)
                rows = cursor.fetchall() if cursor.description else []
                return rows, cursor.description, cursor.rowcount, cursor.lastrowid
            finally:
                cursor.close()

        rows, self.description, self.rowcount, self.lastrowid = await self._connection.run(statement)
        self._rows = deque(rows)

    async def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return [self._rows.popleft() for _ in range(min(size or self.arraysize, len(self._rows)))]

    async def fetchall(self) -> list[Any]:
        rows, self._rows = list(self._rows), deque()
        return rows

    async def close(self) -> None:
        self._rows.clear()

    async def __aenter__(self) -> OneTripCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class OneTripConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors take one trip a statement (`OneTripCursor`)."""

    @contextmanager
    async def cursor(self) -> OneTripCursor:
        return OneTripCursor(self)

    async def rollback(self) -> None:
        # SQLAlchemy's pool rolls back each connection it takes back, after a commit too: without a
        # transaction open that is a trip to the thread for nothing. (The flag is read here, in the
        # loop's thread: the connection is being returned, so no statement of it is in flight.)
        if self._connection is not None and not self._connection.in_transaction:
            return
        await super().rollback()

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(sqlite3_connection)` on the connection's thread."""
        return await self._execute(lambda: work(self._conn))

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(sqlite3_connection)` in a write transaction, all in one trip to the connection's thread:
        BEGIN IMMEDIATE (the write lock up front, as `bot/store/db.py` begins every writer), then
        COMMIT, or ROLLBACK when `work` or the commit raises (the error is raised again)."""
        def transaction(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result
        return await self.run(transaction)


def connector(url: URL, **options: Any) -> Callable[[], Awaitable[OneTripConnection]]:
    """For `create_async_engine(url, async_creator=connector(url, timeout=...))`: what the aiosqlite
    dialect connects to for `url` (its file, URI and options), on a `OneTripConnection`."""
    args, kwargs = SQLiteDialect_aiosqlite().create_connect_args(url)
    kwargs.update(options)

    async def connect() -> OneTripConnection:
        return await OneTripConnection(lambda: sqlite3.connect(*args, **kwargs), iter_chunk_size=64)
    return connect
