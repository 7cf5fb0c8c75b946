"""The engine client against a real OpenAI-shaped HTTP server: streaming, failover, timeouts, garbage."""

from __future__ import annotations

import pytest

from bot.engine_client import EngineBadResponse, EngineClient, EngineTimeout, EngineUnavailable, health_url
from bot.engine_process import free_port
from tests.bot.c1_engine import FakeEngine, embedding_for, png_bytes, running

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


async def test_stream_yields_text_deltas_and_the_masque_extras():
    async with running(FakeEngine(reply="one two three")) as (fake, url):
        client = EngineClient([url], retries=0)
        assert not client.speaks_masque()
        text, extras = await collect(client)
        assert text == "one two three"
        assert extras == [{"fusion": "composed", "transcripts": [], "captions": []}]
        assert client.speaks_masque()
        assert fake.chats()[0]["max_tokens"] == 20 and fake.chats()[0]["stream"] is True
        await client.close()


async def test_an_engine_without_extras_is_known_not_to_speak_masque():
    async with running(FakeEngine(masque=False)) as (_, url):
        client = EngineClient([url], retries=0)
        result = await client.chat(HELLO)
        assert result.text.startswith("The rain") and result.extras == {}
        assert not client.speaks_masque()
        await client.close()


async def test_one_url_down_the_other_answers_and_the_dead_one_is_skipped_afterwards():
    async with running() as (fake, url):
        client = EngineClient([dead_url(), url], retries=0, unhealthy_s=60)
        for _ in range(4):
            assert (await client.chat(HELLO)).text
        assert len(fake.chats()) == 4
        assert await client.health() == {client.urls[0]: False, client.urls[1]: True}
        await client.close()


async def test_urls_are_used_in_turn():
    async with running() as (first, url1), running() as (second, url2):
        client = EngineClient([url1, url2], retries=0)
        for _ in range(4):
            await client.chat(HELLO)
        assert len(first.chats()) == 2 and len(second.chats()) == 2
        await client.close()


async def test_all_urls_down_raises_unavailable():
    client = EngineClient([dead_url(), dead_url()], retries=0, connect_timeout_s=1)
    with pytest.raises(EngineUnavailable):
        await client.chat(HELLO)
    with pytest.raises(EngineUnavailable):
        await collect(client)
    await client.close()


async def test_a_500_is_unavailable_and_a_slow_engine_times_out():
    async with running(FakeEngine(mode="down")) as (fake, url):
        client = EngineClient([url], retries=0)
        with pytest.raises(EngineUnavailable, match="500"):
            await collect(client)
        fake.mode, fake.delay_s = "ok", 2.0
        slow = EngineClient([url], retries=0, timeout_s=0.3)
        with pytest.raises(EngineTimeout):
            await collect(slow)
        with pytest.raises(EngineTimeout):
            await slow.embed(["x"])
        await client.close()
        await slow.close()


@pytest.mark.parametrize("mode", ["garbage", "html"])
async def test_garbage_is_a_bad_response(mode: str):
    async with running(FakeEngine(mode=mode)) as (_, url):
        client = EngineClient([url], retries=0)
        with pytest.raises(EngineBadResponse):
            await client.chat(HELLO)
        with pytest.raises(EngineBadResponse):
            await collect(client)
        with pytest.raises(EngineBadResponse):
            await client.embed(["x"])
        with pytest.raises(EngineBadResponse):
            await client.generate_image("a cat")
        await client.close()


async def test_media_calls_transcribe_paint_and_embed():
    async with running(FakeEngine(transcript="I heard you")) as (fake, url):
        client = EngineClient([url], retries=0)
        assert await client.transcribe(b"RIFF....", "voice.wav", "audio/wav") == "I heard you"
        assert await client.generate_image("a cat", negative_prompt="blurry", seed=7, safe=False) == png_bytes()
        assert await client.embed(["a", "b c"]) == [embedding_for("a"), embedding_for("b c")]
        image_request = next(body for kind, body in fake.requests if kind == "image")
        assert image_request["safe"] is False and image_request["seed"] == 7
        assert image_request["negative_prompt"] == "blurry" and image_request["response_format"] == "b64_json"
        await client.close()


def test_health_url_sits_beside_v1():
    assert health_url("http://h:8000/v1") == "http://h:8000/health"
    assert health_url("http://h:8000/v1/") == "http://h:8000/health"
    assert health_url("http://h:8000") == "http://h:8000/health"


def test_a_client_needs_a_url():
    with pytest.raises(ValueError):
        EngineClient([])
