"""Chaos with real processes: the engine killed mid-stream and brought back, PostgreSQL dropping every connection.

The bot runs unmodified in SimCord. The engine is the fake engine in a child process (SIGKILL is a real
process death: the socket closes mid-body, no goodbye); the database is a real PostgreSQL whose backends
are terminated, which is what a server restart does to the pool's connections.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from bot.settings import BotSettings
from bot.store import Store
from tests.bot.simcord_kit import make_bot, start_story, world

REPO = Path(__file__).resolve().parents[2]
KILL_AT_TOKEN = 5  # the engine dies just before sending this token of the reply
LONG_REPLY = " ".join(f"word{i}" for i in range(200)) + "."
START_TIMEOUT_S = 20.0

# The fake engine as a child process. It prints READY <port> once listening, and TOKEN <n> just before
# it sends the n-th token of a streamed reply (so the test can kill it at a known point of the stream).
CHILD = """
import asyncio, os, sys
import tests.fakes.fake_engine as fe

class Loud(list):
    def __iter__(self):
        for n, token in enumerate(list.__iter__(self), 1):
            print(f"TOKEN {n}", flush=True)
            yield token

split = fe.split_tokens
fe.split_tokens = lambda text: Loud(split(text))

async def main():
    engine = fe.FakeEngine(reply=os.environ["CHILD_REPLY"], token_delay=float(os.environ["CHILD_TOKEN_DELAY"]))
    engine.port = int(sys.argv[1])
    await engine.start()
    print(f"READY {engine.port}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class EngineProcess:
    """The fake engine in a child process; `kill_at_token` SIGKILLs it from a watcher thread."""

    def __init__(self, port: int, reply: str, token_delay: float, kill_at_token: int | None = None):
        env = {**os.environ, "PYTHONPATH": str(REPO), "CHILD_REPLY": reply, "CHILD_TOKEN_DELAY": str(token_delay)}
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, str(port)], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, text=True)
        self.kill_at_token = kill_at_token
        self.lines: list[str] = []
        self.killed = threading.Event()
        self.ready = threading.Event()
        self.port = port
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            self.lines.append(line)
            if line.startswith("READY "):
                self.port = int(line.split()[1])
                self.ready.set()
            if self.kill_at_token is not None and line == f"TOKEN {self.kill_at_token}":
                self.process.send_signal(signal.SIGKILL)
                self.killed.set()

    async def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.is_set():  # a thread event: poll it without blocking the loop
            assert self.process.poll() is None, f"the engine process exited: {self.lines}"
            assert time.monotonic() < deadline, "the engine process did not start"
            await asyncio.to_thread(self.ready.wait, 0.1)
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


async def test_engine_killed_mid_stream_then_restarted_on_the_same_port(tmp_path: Path, store: Store):
    """SIGKILL mid-reply: the user's turn stays, a clear error with Retry is shown, nothing partial is
    kept (a reply is stored only once it is whole: pipeline step 5), and after the engine comes back on
    the same port the Retry answers that turn, stored and shown exactly once."""
    first = EngineProcess(0, LONG_REPLY, token_delay=0.02, kill_at_token=KILL_AT_TOKEN)
    second = None
    try:
        url = await first.wait_ready()
        settings = BotSettings(MASQUE_ENGINE_URL=url, MASQUE_DATABASE_URL=str(store.url), DISCORD_TOKEN=None,
                               _env_file=None)
        async with world(make_bot(settings, store)) as w:
            await start_story(w)
            await w.player.send(w.channel, "Tell me about the harbour.")
            await asyncio.to_thread(first.process.wait, 10)
            assert first.killed.is_set() and first.process.returncode == -signal.SIGKILL, first.lines
            # Killed mid-stream: tokens had gone out, the rest never did.
            assert f"TOKEN {KILL_AT_TOKEN - 1}" in first.lines and f"TOKEN {KILL_AT_TOKEN + 1}" not in first.lines

            note = w.channel.last_message
            assert note.author.id == w.bot.user.id and "not reachable" in note.content, w.env.transcript()[-2000:]
            assert any(c.label == "Retry" for row in note.components for c in row.children)
            assert len(w.persona_messages()) == 1  # the greeting; the half-streamed reply is gone
            story = await store.active_story(w.channel.id)
            turns = await store.recent_turns(story.id)
            assert [(t.author_kind.value, t.text) for t in turns[1:]] == [("user", "Tell me about the harbour.")]
            assert all(f"word{KILL_AT_TOKEN}" not in t.text for t in turns)

            second = EngineProcess(first.port, "The harbour never sleeps.", token_delay=0.0)
            assert await second.wait_ready() == url
            await w.player.click(note, label="Retry")
            assert [m.content for m in w.persona_messages()[1:]] == ["The harbour never sleeps."]
            turns = await store.recent_turns(story.id)
            assert [(t.author_kind.value, t.text) for t in turns[1:]] == [
                ("user", "Tell me about the harbour."), ("persona", "The harbour never sleeps.")]
            assert [m.message_id for m in turns[-1].messages] == [w.persona_messages()[-1].id]
            assert all(m.id != note.id for m in w.channel.history())  # the error note is gone
            assert w.error_types() == []  # the engine's death was handled, not left to discord.py's on_error
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _answer(request: dict) -> str:
    return "Answer to: " + request["messages"][-1]["content"].replace("\n\n", " | ")


async def _admin_connection(url: str) -> asyncpg.Connection:
    """A connection of the test's own to the story's database (not one of the bot's)."""
    u = make_url(url)
    return await asyncpg.connect(user=u.username, password=u.password, host=u.host or "127.0.0.1",
                                 port=u.port or 5432, database=u.database)


async def _terminate_backends(url: str) -> int:
    """What a server restart does to the pool: every other connection to the database dies."""
    conn = await _admin_connection(url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS killed")
    finally:
        await conn.close()


async def _story_turns(store: Store, channel_id: int) -> list[tuple[str, str]]:
    story = await store.active_story(channel_id)
    return [(t.author_kind.value, t.text) for t in await store.recent_turns(story.id)]


async def test_postgres_connections_dropped_mid_story_the_bot_reconnects(pg_store: Store, fake_engine):
    """Every connection of the bot's pool is terminated between turns (a PostgreSQL restart, as the
    client sees it): the next turns reconnect, and no turn is lost or doubled."""
    fake_engine.reply = _answer
    settings = BotSettings(MASQUE_ENGINE_URL=fake_engine.url, MASQUE_DATABASE_URL=str(pg_store.url),
                           DISCORD_TOKEN=None, _env_file=None)
    async with world(make_bot(settings, pg_store)) as w:
        await start_story(w)
        said = ["I push the door open.", "Is anyone here?", "I sit by the fire."]
        for text in said:
            await w.player.send(w.channel, text)
        before = await _story_turns(pg_store, w.channel.id)
        assert [t for k, t in before if k == "user"] == said

        assert await _terminate_backends(pg_store.url) >= 1  # the bot's pooled connections were there to kill
        more = ["The fire crackles; I warm my hands.", "Who owns this inn?"]
        for text in more:
            await w.player.send(w.channel, text)
        assert w.error_types() == []
        after = await _story_turns(pg_store, w.channel.id)
        assert after[:len(before)] == before
        assert after[len(before):] == [item for text in more for item in
                                       [("user", text), ("persona", f"Answer to: Pip: {text}")]]
        assert [m.content for m in w.persona_messages()[1:]] == [t for k, t in after[1:] if k == "persona"]


async def test_postgres_reads_after_a_restart_get_live_connections(pg_store: Store):
    """After a restart the first thing may be a read (a button's lookup, /story status), which nothing
    retries: the pool must hand it a live connection, never one the server closed."""
    story = await pg_store.start_story(77, 78, None)
    await asyncio.gather(*(pg_store.recent_turns(story.id) for _ in range(4)))  # several pooled connections
    assert await _terminate_backends(pg_store.url) >= 2
    await asyncio.sleep(0.2)  # the server's goodbye reaches the client, as it does between two messages
    assert await asyncio.gather(*(pg_store.recent_turns(story.id) for _ in range(4))) == [[]] * 4


async def test_postgres_connection_dropped_during_a_write(pg_store: Store, fake_engine):
    """The connection dies while the user's turn is being written (held behind a lock, then terminated):
    the server rolls that transaction back, so nothing is half-stored, and the store writes the turn once
    more on a fresh connection, so the message is neither lost nor doubled and is answered as usual."""
    fake_engine.reply = _answer
    settings = BotSettings(MASQUE_ENGINE_URL=fake_engine.url, MASQUE_DATABASE_URL=str(pg_store.url),
                           DISCORD_TOKEN=None, _env_file=None)
    async with world(make_bot(settings, pg_store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I push the door open.")
        before = await _story_turns(pg_store, w.channel.id)

        locker = await _admin_connection(pg_store.url)
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE turns IN ACCESS EXCLUSIVE MODE")
            w.env.backend.create_message(w.channel.id, w.player.id, "Is anyone here?")
            deadline = time.monotonic() + 10
            waiting: list = []
            while not waiting:
                assert time.monotonic() < deadline, "the bot never started writing the turn"
                await asyncio.to_thread(time.sleep, 0.05)
                waiting = await locker.fetch(
                    "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
            assert any("INSERT INTO turns" in r["query"] for r in waiting), waiting  # the turn's write
            killed = await locker.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                " datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()) AS k")
            assert killed >= 1
            await tx.rollback()
        finally:
            await locker.close()
        await w.env.settle()
        # The server rolled the half-done insert back; the store wrote the turn again on a fresh connection.
        assert w.error_types() == []
        assert await _story_turns(pg_store, w.channel.id) == [
            *before, ("user", "Is anyone here?"), ("persona", "Answer to: Pip: Is anyone here?")]
        assert [m.content for m in w.persona_messages()[1:]] == [
            "Answer to: Pip: I push the door open.", "Answer to: Pip: Is anyone here?"]
