"""Migrations: the models and alembic agree, and upgrade/downgrade/upgrade works, on both databases."""

from __future__ import annotations

import ast
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from bot.store import Store
from bot.store.models import Base, include_in_schema_compare

REPO = Path(__file__).resolve().parent.parent


def _diff(connection) -> list:
    opts = {"compare_type": True, "include_object": include_in_schema_compare}
    context = MigrationContext.configure(connection, opts=opts)
    return compare_metadata(context, Base.metadata)


async def test_models_and_migrations_agree(database_url: str):
    store = Store(database_url)
    try:
        await store.upgrade()
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        assert await store.current_revision() == store.head_revision()
    finally:
        await store.close()


async def test_upgrade_downgrade_upgrade(database_url: str):
    store = Store(database_url)
    try:
        await store.upgrade()
        await store.downgrade("base")
        async with store.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert set(tables) <= {"alembic_version"}
        assert await store.current_revision() is None
        await store.upgrade()
        async with store.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert set(Base.metadata.tables) <= tables
    finally:
        await store.close()


def test_the_app_never_uses_create_all():
    offenders = []
    for path in [*REPO.glob("bot/**/*.py"), *REPO.glob("engine/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "create_all":
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
