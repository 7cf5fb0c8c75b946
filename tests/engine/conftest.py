"""Engine fixtures: real servers on free loopback ports, driven by the official openai client.

Each server runs the real application (``engine.app.create_app``) on its own event loop in a
background thread, so both the sync and the async openai clients can talk to it, and loads its
models through the real registry. Servers are session-scoped: models load once per run, and
converted/built models are cached under MASQUE_CACHE_DIR between runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from engine.app import create_app
from engine.registry import Registry
from engine.routes import METRICS, REGISTRY
from engine.settings import EngineSettings

READY_TIMEOUT = 300.0  # first run converts the GGUF and builds the tiny models
POLL_SECONDS = 0.25
API_KEY = "test-secret-key"


@dataclass
class RunningEngine:
    """A live engine: its base URL, its app (for white-box checks) and how to stop it."""

    url: str
    app: web.Application
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    stop: asyncio.Event

    @property
    def registry(self) -> Registry:
        return self.app[REGISTRY]

    @property
    def metrics(self) -> Any:
        return self.app[METRICS]


def _serve(settings: EngineSettings, started: dict[str, Any], ready: threading.Event) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()

    async def main() -> None:
        app = create_app(settings)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        started.update(url=f"http://127.0.0.1:{port}", app=app, loop=loop, stop=stop)
        ready.set()
        await stop.wait()
        await runner.cleanup()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def start_engine(settings: EngineSettings) -> RunningEngine:
    """Start a server thread and wait until /health says every configured model is ready."""
    started: dict[str, Any] = {}
    ready = threading.Event()
    thread = threading.Thread(target=_serve, args=(settings, started, ready), daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("engine did not start listening")
    engine = RunningEngine(started["url"], started["app"], started["loop"], thread, started["stop"])
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{engine.url}/health") as resp:  # noqa: S310 - loopback
                if json.load(resp)["ready"]:
                    return engine
        except urllib.error.HTTPError as exc:  # 503 while loading
            status = json.load(exc)
            failed = [r for r, s in status["roles"].items() if s["state"] == "failed"]
            if failed:
                stop_engine(engine)
                raise RuntimeError(f"engine roles failed to load: {status['roles']}") from None
        time.sleep(POLL_SECONDS)
    stop_engine(engine)
    raise RuntimeError("engine models did not load in time")


def stop_engine(engine: RunningEngine) -> None:
    """Stop the server and wait for its thread (models and threads are released)."""
    engine.loop.call_soon_threadsafe(engine.stop.set)
    engine.thread.join(timeout=60)


def offline_settings(**overrides: Any) -> EngineSettings:
    """The offline preset with the test cache dir, plus overrides (role dicts are merged)."""
    return EngineSettings(
        preset="offline", cache_dir=Path(os.environ["MASQUE_CACHE_DIR"]), **overrides
    )


# The offline preset has no captioner and no image model (no real weights small enough); the
# tests load the tiny random ones explicitly, to test those roles' code.
TINY_MEDIA = {
    "caption": {"model": "tiny:caption", "device": "cpu", "dtype": "float32"},
    "images": {"model": "tiny:diffusion", "device": "cpu", "dtype": "float32", "max_side": 1024},
}


@pytest.fixture(scope="session")
def engine_settings() -> EngineSettings:
    """The offline preset (SmolLM2, Whisper tiny.en, piper, MiniLM) plus the tiny captioner and tiny SD."""
    return offline_settings(**TINY_MEDIA)


@pytest.fixture(scope="session")
def engine(engine_settings: EngineSettings) -> Iterator[RunningEngine]:
    """The offline-preset engine (composed fusion), shared by the whole session."""
    running = start_engine(engine_settings)
    yield running
    stop_engine(running)


@pytest.fixture(scope="session")
def engine_url(engine: RunningEngine) -> str:
    """Base URL of the offline engine (no /v1)."""
    return engine.url


@pytest.fixture(scope="session")
def native_engine() -> Iterator[RunningEngine]:
    """An engine whose chat role is a tiny random Qwen2.5-Omni thinker (native fusion)."""
    settings = offline_settings(
        chat={"backend": "omni", "model": "tiny:omni", "served_name": "masque-omni"},
        caption={"model": ""}, stt={"model": ""}, tts={"model": ""},
        images={"model": ""}, embeddings={"model": ""},
    )
    running = start_engine(settings)
    yield running
    stop_engine(running)


@pytest.fixture(scope="session")
def strict_engine() -> Iterator[RunningEngine]:
    """SmolLM2 behind an API key, a one-job chat queue and small request limits."""
    settings = offline_settings(
        api_key=API_KEY,
        chat={"max_queue": 1, "max_batch": 1, "max_context_tokens": 512},
        caption={"model": ""}, stt={"model": ""}, tts={"model": ""},
        images={"model": ""}, embeddings={"model": ""},
        limits={"max_request_bytes": 64 * 1024},
    )
    running = start_engine(settings)
    yield running
    stop_engine(running)


def make_client(url: str, **kwargs: Any) -> openai.OpenAI:
    """A sync openai client for ``url`` (no retries: tests want to see every status)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kwargs.pop("api_key", "unused"),
                         max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def openai_client(engine_url: str) -> Iterator[openai.OpenAI]:
    """The official sync client pointed at the offline engine."""
    client = make_client(engine_url)
    yield client
    client.close()


@pytest.fixture
async def async_openai_client(engine_url: str) -> Any:
    """The official async client pointed at the offline engine (one per test loop)."""
    client = openai.AsyncOpenAI(base_url=f"{engine_url}/v1", api_key="unused",
                                max_retries=0, timeout=120)
    yield client
    await client.close()


def espeak_wav(text: str, path: Path) -> bytes:
    """Speech made here with espeak-ng (no model weights), as WAV bytes."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(path), text], check=True)
    return path.read_bytes()


@dataclass
class Reply:
    """A raw HTTP reply: status, parsed JSON body (or text) and headers."""

    status: int
    body: Any
    headers: dict[str, str]


async def request(method: str, url: str, *, body: Any = None, data: bytes | None = None,
                  headers: dict[str, str] | None = None) -> Reply:
    """One raw HTTP request with aiohttp (for what the openai client will not send)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.request(
        method, url, json=body, data=data, headers=headers
    ) as resp:
        text = await resp.text()
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text
        return Reply(resp.status, parsed, dict(resp.headers))
