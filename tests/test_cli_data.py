"""`masque data export` and `masque data delete`: a real process on a real SQLite database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from bot.builtin import builtin_personas
from bot.store import AuthorKind, NewTurn, Store
from tests.test_cli import MASQUE, run

ADA, BOB = 501, 502
PICTURE = {"kind": "image", "filename": "map.png", "url": "https://cdn.example/map.png",
           "content_type": "image/png", "size": 10}


@pytest.fixture
async def db(tmp_path: Path) -> str:
    """A database where Ada and Bob each spoke in two guilds."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    store = Store(url)
    await store.upgrade()
    await store.sync_builtin_personas(builtin_personas())
    for channel, guild in ((10, 111), (20, 222)):
        story = await store.start_story(channel, guild, None)
        await store.add_turn(story.id, NewTurn(AuthorKind.USER, f"Ada says hi in {guild}", author_id=ADA,
                                               author_name="Ada", attachments=[PICTURE]))
        await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, f"The persona answers in {guild}"))
        await store.add_turn(story.id, NewTurn(AuthorKind.USER, f"Bob's secret in {guild}", author_id=BOB,
                                               author_name="Bob"))
        await store.add_fact(story.id, f"Ada pinned this in {guild}", author_id=ADA)
    await store.close()
    return url


def _turns_of(url: str, user: int) -> int:
    async def count() -> int:
        store = Store(url)
        try:
            return await store.count_user_turns(user)
        finally:
            await store.close()
    return asyncio.run(count())


def test_export_has_the_users_turns_and_nothing_of_others(db: str, tmp_path: Path):
    out = tmp_path / "ada.json"
    result = run("data", "export", "--user", str(ADA), "--out", str(out), db=db)
    assert result.returncode == 0, result.stderr
    assert "2 turns" in result.stdout
    data = json.loads(out.read_text())
    assert data["user_id"] == ADA and data["guilds"] == [111, 222]
    assert [t["text"] for t in data["turns"]] == ["Ada says hi in 111", "Ada says hi in 222"]
    assert data["turns"][0]["attachments"] == [PICTURE] and data["turns"][0]["channel_id"] == 10
    assert [f["text"] for f in data["pinned_facts"]] == ["Ada pinned this in 111", "Ada pinned this in 222"]
    assert "Bob" not in out.read_text() and "persona answers" not in out.read_text()

    printed = run("data", "export", "--user", str(BOB), db=db)  # no --out: JSON on stdout
    assert [t["text"] for t in json.loads(printed.stdout)["turns"]] == ["Bob's secret in 111", "Bob's secret in 222"]


def test_delete_asks_then_removes_the_user_everywhere(db: str):
    assert _turns_of(db, ADA) == 2
    unconfirmed = subprocess.run([*MASQUE, "data", "delete", "--user", str(ADA)], input="no\n", capture_output=True,
                                 text=True, env={**os.environ, "MASQUE_DATABASE_URL": db}, timeout=120)
    assert "Type 'yes'" in unconfirmed.stdout
    assert unconfirmed.returncode == 2 and "nothing was deleted" in unconfirmed.stderr
    assert _turns_of(db, ADA) == 2

    result = run("data", "delete", "--user", str(ADA), "--yes", db=db)
    assert result.returncode == 0, result.stderr
    assert "turns 2" in result.stdout and "facts 2" in result.stdout
    assert _turns_of(db, ADA) == 0 and _turns_of(db, BOB) == 2
    after = json.loads(run("data", "export", "--user", str(ADA), db=db).stdout)
    assert after["turns"] == [] and after["pinned_facts"] == []
