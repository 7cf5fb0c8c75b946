"""The bot with the real engine on the offline models, as the README's main command runs it.

`python -m bot --console` with no MASQUE_ENGINE_URL: the bot starts `python -m engine` on the offline
preset as its child (real SmolLM2, Whisper, Piper, MiniLM and the tiny art model), waits for /health,
role-plays one turn through the same pipeline and store as Discord, and stops the engine on /quit.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import pytest

RUN_TIMEOUT_S = 600  # loading every offline model on two busy cores, then one short reply

pytestmark = pytest.mark.slow


async def test_console_role_play_with_the_real_offline_engine(tmp_path: Path):
    database = tmp_path / "story.db"
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "MASQUE_ENGINE_URL")}
    env.update(HOME=str(tmp_path), MASQUE_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
               MASQUE_REPLY_MAX_TOKENS="24", MASQUE_LOG_LEVEL="WARNING")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--console", "--persona", "wren", "--name", "Ann", cwd=tmp_path, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(
        process.communicate(b"I knock on the door and ask for the harbour master.\n/quit\n"), RUN_TIMEOUT_S)
    out_text, err_text = out.decode(), err.decode()
    assert process.returncode == 0, err_text
    assert "The engine is ready" in err_text
    assert "--- Wren Halloway ---" in out_text
    assert out_text.rstrip().endswith("Goodbye. The story is saved.")

    with sqlite3.connect(database) as db:
        turns = db.execute("SELECT author_kind, text FROM turns ORDER BY position").fetchall()
    kinds = [str(kind).lower() for kind, _ in turns]
    assert kinds == ["persona", "user", "persona"], turns  # greeting, Ann, the model's reply
    assert turns[1][1] == "I knock on the door and ask for the harbour master."
    reply = turns[2][1]
    assert reply.strip() and reply.strip()[:20] in out_text  # the real model wrote it, the console showed it
    log = tmp_path / ".local" / "state" / "masque" / "log" / "engine.log"
    assert "POST /v1/chat/completions" in log.read_text()  # it came from the child engine


LONG_STORY_TURNS = 100
LINES = [
    "I show you the torn map and point at the lighthouse.", "Who else knew about the brass key?",
    "*I shake the rain off my coat and sit down.*", "The harbour master lied to us, I am sure of it.",
    "Let us follow the smugglers to the old mill tonight.", "What do you make of the green scarf?",
]


async def test_a_100_turn_console_story_against_the_real_offline_engine(tmp_path: Path):
    """Every turn is answered, no chat request is refused for length, and memory work succeeds."""
    database = tmp_path / "long.db"
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "MASQUE_ENGINE_URL")}
    env.update(HOME=str(tmp_path), MASQUE_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
               MASQUE_REPLY_MAX_TOKENS="8", MASQUE_SUMMARY_MAX_TOKENS="48", MASQUE_LOG_LEVEL="WARNING")
    script = "".join(f"{LINES[i % len(LINES)]} ({i})\n" for i in range(LONG_STORY_TURNS)) + "/quit\n"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--console", "--persona", "wren", "--name", "Ann", cwd=tmp_path, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(script.encode()), RUN_TIMEOUT_S * 3)
    assert process.returncode == 0, err.decode()[-2000:]
    assert "The story engine" not in out.decode()  # no engine error reached the player
    with sqlite3.connect(database) as db:
        kinds = [str(k).lower() for (k,) in db.execute("SELECT author_kind FROM turns ORDER BY position")]
        embedded = db.execute("SELECT count(*) FROM turn_embeddings").fetchone()[0]
    assert kinds.count("user") == LONG_STORY_TURNS and kinds.count("persona") == LONG_STORY_TURNS + 1
    assert embedded > LONG_STORY_TURNS  # the background worker embedded the story as it went
    log = (tmp_path / ".local" / "state" / "masque" / "log" / "engine.log").read_text()
    chats = [line for line in log.splitlines() if "POST /v1/chat/completions" in line]
    assert len(chats) >= LONG_STORY_TURNS and not [line for line in chats if '" 400 ' in line]
    assert "POST /tokenize" in log  # the bot counted with the engine's own tokenizer
