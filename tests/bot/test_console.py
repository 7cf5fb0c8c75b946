"""Console mode end to end: `python -m bot --console` in a subprocess, piped stdin, a fake engine over HTTP.

Also the local child engine: started, health-waited and stopped (a fake engine
stands in for `python -m engine`, which loads real models).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from bot.engine_client import EngineClient
from bot.engine_process import EngineProcess, EngineStartError, engine_urls, free_port
from bot.settings import BotSettings
from tests.bot.story_helpers import Script, chats
from tests.fakes.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 90


async def masque_bot(tmp_path: Path, engine_url: str, stdin: str, *args: str) -> tuple[int, str, str]:
    """Run `python -m bot` with piped stdin; returns (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(MASQUE_ENGINE_URL=engine_url, MASQUE_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}",
               MASQUE_ENGINE_RETRIES="0", MASQUE_LOG_LEVEL="WARNING")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, cwd=tmp_path, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), RUN_TIMEOUT_S)
    return process.returncode, out.decode(), err.decode()


async def test_console_role_play_with_commands(tmp_path: Path):
    script = "My brother vanished.\n/swipe\n/back\n/regen\n/continue\n/rewind 2\n/nonsense\n/quit\nnever read\n"
    replies = Script(["First try.", "Second try.", "Third try.", "And more."])
    async with FakeEngine(reply=replies) as fake:
        code, out, err = await masque_bot(tmp_path, fake.url, script, "--console", "--persona", "wren", "--name", "Ann")
    assert code == 0, err
    assert "--- Wren Halloway ---" in out
    assert "Wren: *The door rattles in its frame" in out  # the greeting, macros expanded
    assert "Wren: First try." in out and "Wren: Second try." in out  # /swipe past the end writes a new one
    assert "(reply 1/2)" in out  # /back shows the first again
    assert "Wren: Third try." in out and "Third try. And more." in out  # /regen, then /continue
    assert "[Removed 2 turn(s).]" in out and "Unknown command /nonsense" in out
    assert out.rstrip().endswith("Goodbye. The story is saved.")
    assert chats(fake)[0]["messages"][-1]["content"].startswith("Ann: My brother vanished.")
    assert len(chats(fake)) == 4  # nothing after /quit was sent


async def test_console_numbered_choice_and_end_of_input(tmp_path: Path):
    async with FakeEngine(reply=Script()) as fake:
        code, out, _ = await masque_bot(tmp_path, fake.url, "9\n2\nhello\n", "--console")
    assert code == 0
    assert "1. Captain Isolde Varga" in out and "Choose a persona (1-3):" in out
    assert "--- Old Mossback ---" in out and f"Old Mossback: {fake.reply.default}" in out
    assert "Traveller: hello" in chats(fake)[0]["messages"][-1]["content"]


async def test_console_engine_down_keeps_the_turn_and_a_restart_resumes_and_retries(tmp_path: Path):
    async with FakeEngine(reply=Script()) as fake:
        url = fake.url
        await fake.set_mode("down")
        code, out, _ = await masque_bot(tmp_path, url, "hello?\n", "--console", "--persona", "Wren Halloway")
        assert code == 0
        assert "The story engine is not reachable right now" in out and "/regen" in out
        await fake.set_mode("ok")
        code, out, _ = await masque_bot(tmp_path, url, "/regen\n", "--console", "--persona", "Wren Halloway")
        assert code == 0
        assert "(resumed)" in out and "Traveller: hello?" in out  # the kept turn, read back from SQL
        assert f"Wren: {fake.reply.default}" in out
        assert chats(fake)[-1]["messages"][-1]["content"].startswith("Traveller: hello?")
        code, out, _ = await masque_bot(tmp_path, url, "", "--console", "--persona", "Wren Halloway", "--new")
    assert "(resumed)" not in out and "Wren: *The door rattles" in out


async def test_ctrl_c_ends_the_console_while_it_waits_for_input(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    async with FakeEngine() as fake:
        env.update(MASQUE_ENGINE_URL=fake.url, MASQUE_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "--console", "--persona", "wren", cwd=tmp_path, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert process.stdout is not None
        while b"Wren: " not in await asyncio.wait_for(process.stdout.readline(), RUN_TIMEOUT_S):
            pass
        process.send_signal(signal.SIGINT)  # stdin stays open: the reader is blocked
        assert await asyncio.wait_for(process.wait(), 15) == 130


async def test_console_unknown_persona_exits_2(tmp_path: Path):
    async with FakeEngine() as fake:
        code, out, _ = await masque_bot(tmp_path, fake.url, "", "--console", "--persona", "Nobody Atall")
    assert code == 2 and "No persona named 'Nobody Atall'" in out and "Wren Halloway" in out


# A stand-in for `python -m engine`: the fake engine, serving on the port the bot chose.
FAKE_ENGINE_MAIN = """
import asyncio, sys
from tests.fakes.fake_engine import FakeEngine

async def main():
    engine = FakeEngine(reply="child says hi")
    engine.port = int(sys.argv[1])
    await engine.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def fake_engine_command() -> list[str]:
    return [sys.executable, "-c", FAKE_ENGINE_MAIN, "{port}"]


async def test_child_engine_starts_answers_and_stops(tmp_path: Path):
    notes: list[str] = []
    child = EngineProcess(command=fake_engine_command(), log_path=tmp_path / "engine.log", progress=notes.append,
                          start_timeout_s=60)
    url = await child.start()
    try:
        assert child.running and url == f"http://127.0.0.1:{child.port}/v1"
        client = EngineClient([url], retries=0)
        assert (await client.chat([{"role": "user", "content": "hi"}])).text == "child says hi"
        await client.close()
    finally:
        await child.stop()
    assert not child.running
    assert any("ready" in n for n in notes)


# A stand-in package for `python -m engine`, the command the bot runs for its child: the fake engine on the
# port the bot chose, its pid written where the test reads it.
FAKE_ENGINE_PACKAGE_MAIN = """
import asyncio, os, sys
from pathlib import Path
from tests.fakes.fake_engine import FakeEngine

async def main():
    Path(os.environ["FAKE_ENGINE_PID_FILE"]).write_text(str(os.getpid()))
    engine = FakeEngine(reply="child says hi")
    engine.port = int(sys.argv[sys.argv.index("--port") + 1])
    await engine.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent to reap it has stopped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("stop, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
async def test_stopping_the_bot_stops_its_child_engine(tmp_path: Path, stop: signal.Signals, code: int):
    """docker stop and systemd send SIGTERM, a terminal Ctrl+C (SIGINT): either way the child engine goes too."""
    shadow = tmp_path / "shadow"
    (shadow / "engine").mkdir(parents=True)
    (shadow / "engine" / "__init__.py").write_text("")
    (shadow / "engine" / "__main__.py").write_text(FAKE_ENGINE_PACKAGE_MAIN)
    pid_file = tmp_path / "engine.pid"
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "MASQUE_ENGINE_URL")}
    env.update(PYTHONPATH=os.pathsep.join([str(shadow), str(REPO)]), FAKE_ENGINE_PID_FILE=str(pid_file),
               XDG_STATE_HOME=str(tmp_path / "state"),  # the engine log (platformdirs' user_log_dir)
               MASQUE_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--console", "--persona", "wren", cwd=tmp_path, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        while b"Wren: " not in await asyncio.wait_for(process.stdout.readline(), RUN_TIMEOUT_S):
            pass  # the greeting: the child engine answered /health, the console waits for input
        child = int(pid_file.read_text())
        assert alive(child)
        process.send_signal(stop)
        assert await asyncio.wait_for(process.wait(), 30) == code
        assert not alive(child)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # a failed test leaves no engine behind


async def test_child_engine_that_exits_reports_its_log(tmp_path: Path):
    command = [sys.executable, "-c", "import sys; print('no models here', flush=True); sys.exit(3)"]
    child = EngineProcess(command=command, log_path=tmp_path / "engine.log", progress=lambda _: None)
    with pytest.raises(EngineStartError, match="code 3") as caught:
        await child.start()
    assert "no models here" in str(caught.value)


# A child that stays up while its /health says a model failed (our engine exits too, a moment later).
FAILED_ENGINE_MAIN = """
import sys
from aiohttp import web

async def health(request):
    return web.json_response({"status": "failed", "ready": False, "failed": {"chat": "OSError: no model here"},
                              "roles": {"chat": {"state": "failed", "error": "OSError: no model here"}}}, status=503)

app = web.Application()
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]))
"""


async def test_child_engine_whose_model_failed_is_reported_at_once_and_stopped(tmp_path: Path):
    child = EngineProcess(command=[sys.executable, "-c", FAILED_ENGINE_MAIN, "{port}"],
                          log_path=tmp_path / "engine.log", progress=lambda _: None, start_timeout_s=60)
    with pytest.raises(EngineStartError, match="the chat model failed to load: OSError: no model here"):
        await child.start()
    assert not child.running


async def test_child_engine_that_never_gets_ready_times_out_and_is_stopped(tmp_path: Path):
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    child = EngineProcess(command=command, log_path=tmp_path / "engine.log", progress=lambda _: None,
                          start_timeout_s=1.5)
    with pytest.raises(EngineStartError, match="not ready"):
        await child.start()
    assert not child.running


async def test_a_configured_engine_url_starts_no_child():
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with engine_urls(BotSettings(MASQUE_ENGINE_URL=url)) as used:
        assert used == url


async def test_a_bad_setting_is_named_and_exits_2(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(MASQUE_PROMPT_TOKEN_BUDGET="lots", MASQUE_ENGINE_URL="http://127.0.0.1:9/v1")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--console", cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    assert process.returncode == 2
    assert b"bad setting" in err and b"MASQUE_PROMPT_TOKEN_BUDGET" in err
