"""Alembic environment (async). target_metadata is the store's metadata.

Two ways in: the app passes an open connection in `config.attributes`
(`Database.upgrade`), or the `alembic` command line opens its own async engine
from `sqlalchemy.url` / MASQUE_DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection

from bot.store.db import default_database_url, make_engine
from bot.store.models import Base, include_in_schema_compare

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else url.split(":", 1)[0]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=dialect.startswith("sqlite"),  # SQLite cannot ALTER most things
        compare_type=True,
        include_object=include_in_schema_compare,
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    return (config.get_main_option("sqlalchemy.url") or os.environ.get("MASQUE_DATABASE_URL")
            or default_database_url())


async def _run_async() -> None:
    engine = make_engine(_url())
    async with engine.begin() as conn:
        await conn.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    _run(conn)
else:
    asyncio.run(_run_async())
