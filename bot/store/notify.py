"""Cached rows kept right across bot processes: PostgreSQL LISTEN/NOTIFY, and one process per SQLite file.

Each process caches the rows it reads on every message (`Database._cached`). When it changes one it
drops its own copy and announces the change on the ``masque_cache`` channel; every other process
listening on the same database drops its copy when the notice arrives (milliseconds later), so a
persona edited through one shard's process is the one the others use for their next message.

The listener has its own connection (not one of the pool's). While that connection is down a process
caches nothing (it could miss notices) and keeps what it has to announce; once it is back it drops its
whole cache, announces what waited, and caches again.

SQLite has no such channel, so a SQLite database serves one bot process: `ProcessLock` refuses a
second one at start instead of letting two serve stale rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import filelock
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "masque_cache"
RECONNECT_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # waits between tries after the listener's connection is lost
ALL = "*"  # a notice's key when every row of its kind changed; its kind when every kind's did


class DatabaseInUse(RuntimeError):
    """Another bot process already serves this SQLite database."""


class ProcessLock:
    """An exclusive lock file beside a SQLite database, held while this process serves it."""

    def __init__(self, database: Path):
        self.path = database.with_name(database.name + ".lock")
        self._lock = filelock.FileLock(self.path, timeout=0)

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise DatabaseInUse(
                f"another Masque bot process is using the SQLite database {self.path.with_suffix('')}. "
                "SQLite serves one process: stop the other one, or run several processes on PostgreSQL "
                "(MASQUE_DATABASE_URL=postgresql+asyncpg://...).") from None

    def release(self) -> None:
        self._lock.release()


def notice(origin: str, kind: str, key: int | None) -> str:
    return f"{origin} {kind} {ALL if key is None else key}"


def parse_notice(payload: str) -> tuple[str, str, int | None] | None:
    """(origin, kind, key) of a notice; None for one this version does not understand."""
    parts = payload.split(" ")
    if len(parts) != 3:
        return None
    origin, kind, key = parts
    if key == ALL:
        return origin, kind, None
    return (origin, kind, int(key)) if key.lstrip("-").isdigit() else None


def listener_connect_args(url: str) -> dict[str, object]:
    """asyncpg.connect's arguments for the database of a SQLAlchemy URL: host, port, user, password,
    database, and the query's options as SQLAlchemy's asyncpg dialect passes them (``?ssl=require``)."""
    parsed = make_url(url)
    args: dict[str, object] = {k: v for k, v in parsed.translate_connect_args(username="user").items()
                               if v is not None}
    import asyncpg  # the postgres extra

    accepted = inspect.signature(asyncpg.connect).parameters  # SQLAlchemy's own options are not asyncpg's
    args.update({k: v if isinstance(v, str) else v[-1] for k, v in parsed.query.items() if k in accepted})
    return args


class CacheNotices:
    """This process's end of the ``masque_cache`` channel (PostgreSQL)."""

    def __init__(self, url: str, on_change: Callable[[str, int | None], None],
                 on_live: Callable[[bool], None]):
        self._connect_args = listener_connect_args(url)
        self.origin = secrets.token_hex(6)  # our own notices come back to us too: skip them
        self._on_change, self._on_live = on_change, on_live
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.connection = None  # the listener's asyncpg connection while it is up (tests terminate it)
        self.heard = 0  # other processes' notices acted on

    async def start(self) -> None:
        """Listen now (so a change made right after start is heard), then keep listening in a task."""
        await self._connect()
        self._task = asyncio.create_task(self._run(), name="masque-cache-notices")

    def publish(self, kind: str, key: int | None) -> None:
        """Announce that `kind` row `key` (every `kind` row when None) changed; sent in order, soon."""
        self._outbox.put_nowait(notice(self.origin, kind, key))

    async def flush(self) -> None:
        """Wait until every announcement so far is sent (while connected)."""
        await self._outbox.join()

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(TimeoutError):  # a last chance for what is queued, not a hang
                await asyncio.wait_for(self.flush(), 2.0)
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        await self._disconnect()

    async def _connect(self) -> None:
        import asyncpg  # the postgres extra

        connection = await asyncpg.connect(**self._connect_args)
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _conn: lost.set())
        await connection.add_listener(CHANNEL, self._heard)
        self.connection, self._lost = connection, lost
        self._on_live(True)

    async def _disconnect(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                await connection.close(timeout=2)

    def _heard(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        parsed = parse_notice(payload)
        if parsed is None:
            log.warning("ignored a cache notice this version does not understand: %.80r", payload)
        elif parsed[0] != self.origin:
            self.heard += 1
            self._on_change(parsed[1], parsed[2])

    async def _run(self) -> None:
        while True:
            try:
                await self._send_while_up()
            except Exception as exc:  # the connection died: cache nothing until we hear again
                log.warning("cache notices: the database connection was lost (%s); reconnecting",
                            type(exc).__name__)
            self._on_live(False)
            await self._disconnect()
            for attempt in itertools.count():
                await asyncio.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
                try:
                    await self._connect()
                    break
                except Exception as exc:
                    log.debug("cache notices: reconnecting failed (%s)", exc)
            log.info("cache notices: listening again")

    async def _send_while_up(self) -> None:
        """Send announcements in order until the connection is lost (then raise)."""
        lost_wait = asyncio.ensure_future(self._lost.wait())
        try:
            while True:
                next_one = asyncio.ensure_future(self._outbox.get())
                await asyncio.wait({next_one, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not next_one.done():
                    next_one.cancel()
                    raise ConnectionError("listener connection terminated")
                payload = next_one.result()
                try:
                    await self.connection.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
                except BaseException:
                    self._outbox.put_nowait(payload)  # not sent: after the reconnect (order kept enough:
                    self._outbox.task_done()          # a notice only drops a cached copy)
                    raise
                self._outbox.task_done()
        finally:
            lost_wait.cancel()
