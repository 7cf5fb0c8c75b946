"""A local engine as a child process, for when MASQUE_ENGINE_URL is unset.

Runs `python -m engine --preset offline --host 127.0.0.1 --port <free>` (the
bot never imports `engine`), waits for its /health to answer 200 while
printing progress, and stops it on exit. Its output goes to a log file so the
console stays readable; when it fails to start, the end of that log is shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from platformdirs import user_log_dir

from bot.engine_client import probe_health
from bot.settings import BotSettings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.5
PROGRESS_EVERY_S = 10.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 20


class EngineStartError(RuntimeError):
    """The child engine exited or did not become healthy in time."""


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def engine_log_path() -> Path:
    return Path(user_log_dir("masque")) / "engine.log"


class EngineProcess:
    """One child engine: `await start()`, then `base_url`; `await stop()` when done."""

    def __init__(self, preset: str = "offline", *, start_timeout_s: float = 900.0,
                 progress: Callable[[str], None] = log.info, log_path: Path | None = None,
                 command: list[str] | None = None):
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}/v1"
        self.start_timeout_s = start_timeout_s
        self.progress = progress
        self.log_path = log_path or engine_log_path()
        # `command` lets tests run another OpenAI-shaped server; {port} is filled in.
        template = command or [sys.executable, "-m", "engine", "--preset", preset,
                               "--host", LOOPBACK, "--port", "{port}"]
        self.command = [part.replace("{port}", str(self.port)) for part in template]
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        """Start the engine and wait until /health is ready; returns its /v1 base URL."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.progress(f"Starting the local engine on port {self.port} (log: {self.log_path})")
        with self.log_path.open("ab") as log_file:
            # Its own session: Ctrl+C in the console reaches the bot, which then stops the engine in order.
            self._process = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self.base_url

    async def _wait_ready(self) -> None:
        started = time.monotonic()
        next_note = started + PROGRESS_EVERY_S
        shown = ""
        timeout = aiohttp.ClientTimeout(total=POLL_INTERVAL_S * 4)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                assert self._process is not None
                if self._process.returncode is not None:
                    raise EngineStartError(f"the engine exited with code {self._process.returncode}:\n"
                                           f"{self.log_tail()}")
                health = await probe_health(session, self.base_url)
                if health.ready:
                    self.progress(f"The engine is ready ({time.monotonic() - started:.0f} s).")
                    return
                if health.failed:  # it exits on its own too; say why now rather than after its shutdown
                    why = "; ".join(f"the {role} model failed to load: {error}"
                                    for role, error in health.failed.items())
                    raise EngineStartError(f"{why}\n{self.log_tail()}")
                loading = ", ".join(health.loading)
                now = time.monotonic()
                if now - started > self.start_timeout_s:
                    raise EngineStartError(f"the engine was not ready after {self.start_timeout_s:.0f} s "
                                           f"(MASQUE_ENGINE_START_TIMEOUT_S):\n{self.log_tail()}")
                if loading and loading != shown:  # say which model loads as soon as it starts loading
                    self.progress(f"Loading {loading} ({now - started:.0f} s)...")
                    shown, next_note = loading, now + PROGRESS_EVERY_S
                elif now >= next_note:
                    what = f"loading {shown}" if shown else "starting"
                    self.progress(f"Waiting for the engine, {what} ({now - started:.0f} s)...")
                    next_note = now + PROGRESS_EVERY_S
                await asyncio.sleep(POLL_INTERVAL_S)

    async def stop(self) -> None:
        """Stop the engine: SIGTERM, then SIGKILL after a grace period."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("the engine did not stop in %.0f s; killing it", STOP_GRACE_S)
            process.kill()
            await process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no engine log)"
        return "\n".join(text.splitlines()[-lines:])


@contextlib.asynccontextmanager
async def engine_urls(settings: BotSettings, progress: Callable[[str], None] = log.info) -> AsyncIterator[str]:
    """The engine URL(s) to use: MASQUE_ENGINE_URL when set, else a child engine's for the duration."""
    if settings.engine_url.strip():
        yield settings.engine_url
        return
    child = EngineProcess(settings.engine_preset, start_timeout_s=settings.engine_start_timeout_s,
                          progress=progress)
    await child.start()
    try:
        yield child.base_url
    finally:
        await child.stop()
