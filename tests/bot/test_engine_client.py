"""The engine client against a real OpenAI-shaped HTTP server: streaming, failover, timeouts, garbage."""

from __future__ import annotations

import io
import json

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from bot.engine_client import (
    EngineBadResponse,
    EngineClient,
    EngineTimeout,
    EngineUnavailable,
    Health,
    health_url,
    probe_health,
)
from bot.engine_process import free_port
from tests.fakes.fake_engine import FakeEngine, embed_text

HELLO = [{"role": "user", "content": "hello"}]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


async def collect(client: EngineClient) -> tuple[str, list[dict]]:
    text, extras = "", []
    async for event in client.chat_stream(HELLO, max_tokens=20):
        text += event.text
        if event.extras is not None:
            extras.append(event.extras)
    return text, extras


@pytest.mark.parametrize("chunk", ["first", "last"])
async def test_stream_yields_text_deltas_and_the_masque_extras_from_any_chunk(fake_engine: FakeEngine, chunk: str):
    fake_engine.reply, fake_engine.masque_chunk = "one two three", chunk
    client = EngineClient([fake_engine.url], retries=0)
    assert not client.speaks_masque()
    text, extras = await collect(client)
    assert text == "one two three"
    assert extras == [{"fusion": "composed", "transcripts": [], "captions": []}]
    assert client.speaks_masque()
    [request] = fake_engine.requests_to("/v1/chat/completions")
    assert request.json["max_tokens"] == 20 and request.json["stream"] is True
    assert request.json["model"] == "masque-chat"
    await client.close()


async def test_an_engine_without_extras_is_known_not_to_speak_masque(fake_engine: FakeEngine):
    fake_engine.masque, fake_engine.reply = False, "plain"
    client = EngineClient([fake_engine.url], retries=0)
    result = await client.chat(HELLO)
    assert result.text == "plain" and result.extras == {}
    await collect(client)
    assert not client.speaks_masque()
    await client.close()


async def test_one_url_down_the_other_answers_and_the_dead_one_is_skipped_afterwards(fake_engine: FakeEngine):
    client = EngineClient([dead_url(), fake_engine.url], retries=0, unhealthy_s=60)
    for _ in range(4):
        assert (await client.chat(HELLO)).text
    assert len(fake_engine.requests_to("/v1/chat/completions")) == 4
    assert await client.health() == {client.urls[0]: False, client.urls[1]: True}
    await client.close()


async def test_urls_are_used_in_turn():
    async with FakeEngine() as first, FakeEngine() as second:
        client = EngineClient([first.url, second.url], retries=0)
        for _ in range(4):
            await client.chat(HELLO)
        assert len(first.requests_to("/v1/chat/completions")) == 2
        assert len(second.requests_to("/v1/chat/completions")) == 2
        await client.close()


async def test_an_engine_that_goes_down_mid_run_fails_over_to_the_other():
    async with FakeEngine(reply="from one") as one, FakeEngine(reply="from two") as two:
        client = EngineClient([one.url, two.url], retries=0, unhealthy_s=60)
        await one.set_mode("down")
        answers = {(await collect(client))[0] for _ in range(3)}
        assert answers == {"from two"}
        await client.close()


async def test_all_urls_down_raises_unavailable():
    client = EngineClient([dead_url(), dead_url()], retries=0, connect_timeout_s=1)
    with pytest.raises(EngineUnavailable):
        await client.chat(HELLO)
    with pytest.raises(EngineUnavailable):
        await collect(client)
    await client.close()


async def test_a_500_is_unavailable(fake_engine: FakeEngine):
    await fake_engine.set_mode("error")
    client = EngineClient([fake_engine.url], retries=0)
    with pytest.raises(EngineUnavailable, match="500"):
        await collect(client)
    await client.close()


@pytest.mark.parametrize("mode", ["slow", "stall"])
async def test_a_slow_or_stalled_engine_times_out(fake_engine: FakeEngine, mode: str):
    await fake_engine.set_mode(mode)
    client = EngineClient([fake_engine.url], retries=0, timeout_s=0.5)
    with pytest.raises(EngineTimeout):
        await collect(client)
    with pytest.raises(EngineTimeout):
        await client.embed(["x"])
    await client.close()


@pytest.mark.parametrize("mode", ["garbage", "wrong_shape"])
async def test_garbage_is_a_bad_response(fake_engine: FakeEngine, mode: str):
    await fake_engine.set_mode(mode)
    client = EngineClient([fake_engine.url], retries=0)
    with pytest.raises(EngineBadResponse):
        await client.chat(HELLO)
    with pytest.raises(EngineBadResponse):
        await collect(client)
    with pytest.raises(EngineBadResponse):
        await client.embed(["x"])
    with pytest.raises(EngineBadResponse):
        await client.generate_image("a cat")
    await client.close()


async def test_media_calls_transcribe_paint_and_embed(fake_engine: FakeEngine):
    fake_engine.transcript = "I heard you"
    client = EngineClient([fake_engine.url], retries=0)
    assert await client.transcribe(b"RIFF....", "voice.wav", "audio/wav") == "I heard you"
    png = await client.generate_image("a cat", negative_prompt="blurry", seed=7, safe=False, size="64x32")
    assert Image.open(io.BytesIO(png)).size == (64, 32)
    vectors = await client.embed(["a cat", "b c"])
    assert vectors == [pytest.approx(embed_text("a cat")), pytest.approx(embed_text("b c"))]
    [image] = fake_engine.requests_to("/v1/images/generations")
    assert image.json["safe"] is False and image.json["seed"] == 7 and image.json["model"] == "masque-art"
    assert image.json["negative_prompt"] == "blurry" and image.json["response_format"] == "b64_json"
    [heard] = fake_engine.requests_to("/v1/audio/transcriptions")
    assert heard.form["file"]["filename"] == "voice.wav" and heard.form["model"] == "masque-whisper"
    await client.close()


async def test_the_api_key_is_sent_as_a_bearer_token(fake_engine: FakeEngine):
    client = EngineClient([fake_engine.url], "s3cret", retries=0)
    await client.chat(HELLO)
    assert fake_engine.requests[-1].headers["Authorization"] == "Bearer s3cret"
    await client.close()


def test_health_url_sits_beside_v1():
    assert health_url("http://h:8000/v1") == "http://h:8000/health"
    assert health_url("http://h:8000/v1/") == "http://h:8000/health"
    assert health_url("http://h:8000") == "http://h:8000/health"


LOADING = {"status": "loading", "ready": False, "roles": {
    "chat": {"state": "ready", "model": "smol"}, "stt": {"state": "loading", "model": "whisper"},
    "images": {"state": "disabled"}}}
FAILED = {"status": "failed", "ready": False, "failed": {"chat": "OSError: no such file"}, "roles": {
    "chat": {"state": "failed", "model": "smol", "error": "OSError: no such file"}, "stt": {"state": "pending"}}}


@pytest.mark.parametrize("status, body, expected", [
    (200, {"status": "ok", "ready": True, "roles": {"chat": {"state": "ready"}}}, Health(True)),
    (503, LOADING, Health(False, loading=["the stt model (whisper)"])),
    (503, FAILED, Health(False, failed={"chat": "OSError: no such file"})),
    (200, "", Health(True)),  # vLLM: 200 and an empty body
    (502, "<html>Bad Gateway</html>", Health(False)),  # a proxy in front of a dead server
], ids=["ready", "loading", "failed", "vllm", "proxy-error"])
async def test_the_health_probe_reads_our_engine_and_any_other_server(status, body, expected):
    async def health(_: web.Request) -> web.Response:
        return web.Response(status=status, text=body if isinstance(body, str) else json.dumps(body))

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        async with aiohttp.ClientSession() as session:
            assert await probe_health(session, url) == expected
            assert await probe_health(session, dead_url()) == Health(False)
        client = EngineClient([url])
        assert await client.health() == {url: expected.ready}  # the client's probe is the same one
        await client.close()
    finally:
        await runner.cleanup()


def test_a_client_needs_a_url():
    with pytest.raises(ValueError):
        EngineClient([])


async def test_images_get_their_own_longer_timeout(fake_engine: FakeEngine):
    fake_engine.latency = 1.0
    client = EngineClient([fake_engine.url], retries=0, timeout_s=0.3, image_timeout_s=10)
    with pytest.raises(EngineTimeout):
        await client.chat(HELLO)
    assert await client.generate_image("a slow lighthouse", size="32x32")
    await client.close()
