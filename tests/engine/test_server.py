"""The server around the models: health, model list, metrics, auth, limits, the bounded queue,
client disconnects, settings and the command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from engine.__main__ import parse_args
from engine.app import create_app
from engine.settings import EngineSettings, load_settings
from tests.engine.conftest import API_KEY, Reply, RunningEngine, make_client, request

MODEL = "masque-chat"
LONG_STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
POLL = 0.05
AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def test_health_says_which_roles_are_ready(engine_url: str) -> None:
    reply = await request("GET", f"{engine_url}/health")
    assert reply.status == 200
    assert reply.body["status"] == "ok" and reply.body["ready"] is True
    roles = reply.body["roles"]
    assert set(roles) == {"chat", "caption", "stt", "tts", "images", "embeddings"}
    assert all(role["state"] == "ready" for role in roles.values())
    assert roles["chat"]["model"].endswith(".gguf")


MISSING = "package:masque_no_such_package/model"  # fails at once, before any backend is imported


@asynccontextmanager
async def serving(settings: EngineSettings) -> AsyncIterator[str]:
    """The real app on a free loopback port, in this test's loop; yields its URL."""
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def health_once_loaded(url: str) -> Reply:
    """/health once no role is pending or loading any more ("loading" 503 until then)."""
    for _ in range(400):
        health = await request("GET", f"{url}/health")
        if health.body["status"] != "loading":
            return health
        assert health.status == 503
        await asyncio.sleep(0.05)
    raise AssertionError(f"still loading: {health.body}")


async def test_health_says_failed_with_the_role_and_its_error(tmp_path: Path) -> None:
    settings = EngineSettings(preset="none", cache_dir=tmp_path,
                              chat={"model": str(tmp_path / "missing-model")}, stt={"model": MISSING})
    async with serving(settings) as url:
        health = await health_once_loaded(url)
        assert health.status == 503 and health.body["status"] == "failed" and health.body["ready"] is False
        error = health.body["roles"]["chat"]["error"]
        assert error and health.body["failed"] == {"chat": error}
        assert health.body["roles"]["stt"] == {"state": "pending", "model": MISSING}  # not loaded: no point
        assert health.body["roles"]["images"] == {"state": "disabled"}
        chat = await request("POST", f"{url}/v1/chat/completions",
                             body={"model": MODEL, "messages": LONG_STORY})
        assert chat.status == 503
        assert chat.body["error"]["code"] == "model_load_failed"


async def test_start_degraded_loads_the_other_roles_and_serves_them(tmp_path: Path) -> None:
    settings = EngineSettings(preset="none", cache_dir=tmp_path, start_degraded=True,
                              chat={"model": MISSING}, stt={"model": MISSING})
    async with serving(settings) as url:
        health = await health_once_loaded(url)
        assert health.status == 200 and health.body["status"] == "degraded" and health.body["ready"] is False
        assert set(health.body["failed"]) == {"chat", "stt"}  # the failed chat did not stop stt's turn
        assert "masque_no_such_package" in health.body["failed"]["stt"]


def start_engine_process(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`masque-engine` whose chat model cannot load, on a free port; returns the process and its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASQUE_CACHE_DIR": str(tmp_path), "MASQUE_ENGINE_CHAT__MODEL": MISSING, **env}
    process = subprocess.Popen([sys.executable, "-m", "engine", "--preset", "none", "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{port}"


def test_a_model_that_fails_to_load_stops_the_engine_with_code_3(tmp_path: Path) -> None:
    process, _ = start_engine_process(tmp_path)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 3, err
    assert "masque-engine: the chat model (package:masque_no_such_package/model) failed to load" in err
    assert "MASQUE_ENGINE_START_DEGRADED" in err


async def test_a_degraded_engine_keeps_serving_until_sigterm(tmp_path: Path) -> None:
    process, url = start_engine_process(tmp_path, MASQUE_ENGINE_START_DEGRADED="true")
    try:
        health = None
        for _ in range(600):
            assert process.poll() is None, process.communicate()[1]
            with contextlib.suppress(aiohttp.ClientError):
                health = await request("GET", f"{url}/health")
                if health.body["status"] != "loading":
                    break
            await asyncio.sleep(0.1)
        assert health is not None and health.status == 200 and health.body["status"] == "degraded"
        process.send_signal(signal.SIGTERM)  # docker stop, systemd
        _, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert "Serving degraded, without: chat" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_models_lists_every_served_model(openai_client: openai.OpenAI) -> None:
    ids = {model.id for model in openai_client.models.list().data}
    assert MODEL in ids
    assert "whisper-1" in ids  # the stt role's OpenAI-compatible alias
    assert openai_client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")


async def test_metrics_count_requests_tokens_and_queues(
    engine_url: str, openai_client: openai.OpenAI
) -> None:
    openai_client.chat.completions.create(model=MODEL, messages=LONG_STORY, max_tokens=4)
    reply = await request("GET", f"{engine_url}/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    text = reply.body
    assert 'masque_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "masque_request_seconds_bucket" in text
    assert 'masque_queue_depth{role="chat"}' in text
    assert 'masque_queue_depth{role="images"}' in text
    generated = [line for line in text.splitlines()
                 if line.startswith('masque_generated_tokens_total{role="chat"}')]
    assert float(generated[0].split()[-1]) >= 4
    assert "masque_time_to_first_token_seconds_count" in text


async def test_api_key_is_required_when_set(strict_engine: RunningEngine) -> None:
    url = strict_engine.url
    body = {"model": MODEL, "messages": LONG_STORY, "max_tokens": 2}
    missing = await request("POST", f"{url}/v1/chat/completions", body=body)
    assert missing.status == 401
    assert missing.body["error"]["type"] == "authentication_error"
    wrong = await request("POST", f"{url}/v1/chat/completions", body=body,
                          headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    assert (await request("GET", f"{url}/metrics")).status == 401
    assert (await request("GET", f"{url}/health")).status == 200  # probes need no key
    good = await request("POST", f"{url}/v1/chat/completions", body=body, headers=AUTH)
    assert good.status == 200
    with pytest.raises(openai.AuthenticationError):
        make_client(url).models.list()
    assert make_client(url, api_key=API_KEY).models.list().data


async def test_request_size_limit(strict_engine: RunningEngine) -> None:
    big = {"model": MODEL, "max_tokens": 2,
           "messages": [{"role": "user", "content": "x" * (80 * 1024)}]}
    reply = await request("POST", f"{strict_engine.url}/v1/chat/completions", body=big,
                          headers=AUTH)
    assert reply.status == 413
    assert reply.body["error"]["code"] == "too_large"


async def _open_stream(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    body = {"model": MODEL, "messages": LONG_STORY, "max_tokens": 400, "temperature": 0,
            "stream": True}
    resp = await session.post(f"{url}/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status == 200
    await resp.content.readline()  # the first chunk: generation is running
    return resp


async def _wait_idle(engine: RunningEngine, seconds: float = 10) -> float:
    backend = engine.registry.get("chat")
    start = time.perf_counter()
    for _ in range(int(seconds / POLL)):
        if not backend.queue_depth():
            break
        await asyncio.sleep(POLL)
    return time.perf_counter() - start


async def test_full_queue_answers_503_with_retry_after(strict_engine: RunningEngine) -> None:
    url = strict_engine.url
    async with aiohttp.ClientSession() as session:
        resp = await _open_stream(session, url)
        body = {"model": MODEL, "messages": LONG_STORY, "max_tokens": 2}
        refused = await request("POST", f"{url}/v1/chat/completions", body=body, headers=AUTH)
        resp.close()
    assert refused.status == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.body["error"]["code"] == "queue_full"
    await _wait_idle(strict_engine)
    again = await request("POST", f"{url}/v1/chat/completions", body=body, headers=AUTH)
    assert again.status == 200  # the slot came back


async def test_client_disconnect_stops_generation(strict_engine: RunningEngine) -> None:
    backend = strict_engine.registry.get("chat")
    counter = strict_engine.metrics.tokens.labels("chat")
    async with aiohttp.ClientSession() as session:
        resp = await _open_stream(session, strict_engine.url)
        await resp.content.readline()
        assert backend.queue_depth() == 1  # still generating when the client leaves
        resp.close()
    waited = await _wait_idle(strict_engine)
    assert backend.queue_depth() == 0 and waited < 5
    after = counter._value.get()
    await asyncio.sleep(0.5)
    assert counter._value.get() == after  # nothing is decoding any more


def test_non_loopback_needs_an_api_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="API key"):
        create_app(EngineSettings(host="0.0.0.0", cache_dir=tmp_path))
    assert create_app(EngineSettings(host="0.0.0.0", api_key="k", cache_dir=tmp_path))


def test_settings_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "engine.toml"
    config.write_text('port = 9001\n[chat]\nmax_batch = 3\nserved_name = "from-file"\n')
    monkeypatch.setenv("MASQUE_ENGINE_CHAT__MAX_BATCH", "5")
    monkeypatch.setenv("MASQUE_ENGINE_CAPTION__MODEL", "")
    monkeypatch.setenv("MASQUE_CACHE_DIR", str(tmp_path / "cache"))
    settings = load_settings(config, host="127.0.0.2")
    assert settings.host == "127.0.0.2"  # CLI over everything
    assert settings.chat.max_batch == 5  # env over file
    assert settings.chat.served_name == "from-file" and settings.port == 9001
    assert settings.chat.model.endswith(".gguf")  # the preset fills what nobody set
    assert settings.caption.model == ""  # ...but an explicit "" disables the role
    assert settings.cache_dir == tmp_path / "cache"
    gpu = load_settings(preset="gpu")
    assert gpu.chat.backend == "omni" and gpu.images.model
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_command_line() -> None:
    args = parse_args(["--host", "0.0.0.0", "--port", "9000", "--preset", "gpu",
                       "--config", "x.toml"])
    assert (args.host, args.port, args.preset, args.config) == ("0.0.0.0", 9000, "gpu", "x.toml")
    with pytest.raises(SystemExit):
        parse_args(["--preset", "cloud"])


def test_api_key_is_never_in_the_settings_repr(tmp_path: Path) -> None:
    settings = EngineSettings(api_key="super-secret", cache_dir=tmp_path)
    assert "super-secret" not in repr(settings)
    assert "super-secret" not in json.dumps(settings.model_dump(mode="json"))


def test_bad_set_ups_exit_2_with_one_line(tmp_path: Path) -> None:
    """`masque-engine` as a user runs it: no key off loopback, a taken port, a bad setting, a missing file."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    env = {**os.environ, "MASQUE_CACHE_DIR": str(tmp_path)}
    cases = [
        (["--host", "0.0.0.0", "--preset", "none"], {}, "API key"),
        (["--port", str(taken.getsockname()[1]), "--preset", "none"], {}, "address already in use"),
        (["--preset", "none"], {"MASQUE_ENGINE_CHAT__MAX_BATCH": "many"}, "max_batch"),
        (["--preset", "none", "--config", str(tmp_path / "missing.toml")], {}, "missing.toml"),
    ]
    try:
        for args, extra_env, says in cases:
            done = subprocess.run([sys.executable, "-m", "engine", *args], env={**env, **extra_env},
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, (args, done.stderr)
            assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
    finally:
        taken.close()
