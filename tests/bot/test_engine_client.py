"""The engine client against a real OpenAI-shaped HTTP server: streaming, failover, timeouts, garbage."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from bot.engine_client import (
    EngineBadResponse,
    EngineClient,
    EngineContextLength,
    EngineFeatureOff,
    EngineTimeout,
    EngineUnavailable,
    Health,
    health_url,
    probe_health,
)
from bot.engine_http import SSEParser, retry_delay
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


# ------------------------------------------------------------ the SSE parser

# Every framing the spec allows, in one stream: LF, CRLF and CR line ends, comments, other fields,
# "data:" with and without its space, an event of several data lines, an event with no data, non-ASCII.
SSE_STREAM = (": keep-alive comment\n"
              "event: ignored\nid: 7\nretry: 1000\n"
              "data: {\"a\": \"caf\u00e9 \U0001f98a\"}\n\n"
              "data:no space\r\ndata: a second line\r\n\r\n"
              "data:  two spaces keep one\r\r"
              "data: first line\ndata\ndata: third line\n\n"
              "event: no data here\n\n"
              ": comment only\n\n"
              "data: [DONE]\n\n"
              "data: unfinished, never ended by a blank line").encode()
SSE_EVENTS = ['{"a": "caf\u00e9 \U0001f98a"}', "no space\na second line", " two spaces keep one",
              "first line\n\nthird line", "[DONE]"]


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[str]:
    parser, events = SSEParser(), []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        events += parser.feed(data[start:end])
    return events


def test_the_sse_parser_reads_every_framing_of_the_spec():
    assert parse_in_pieces(SSE_STREAM, []) == SSE_EVENTS


def test_the_sse_parser_gives_the_same_events_however_the_bytes_are_split():
    # Cut anywhere: mid-line, between CR and LF, inside a UTF-8 character (é is 2 bytes, the fox 4).
    for cut in range(1, len(SSE_STREAM)):
        assert parse_in_pieces(SSE_STREAM, [cut]) == SSE_EVENTS, cut
    assert parse_in_pieces(SSE_STREAM, list(range(1, len(SSE_STREAM)))) == SSE_EVENTS  # a byte at a time


def test_a_cr_at_the_end_of_a_piece_waits_for_the_next():
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r") == []  # CRLF split: one line end, not an empty line
    assert parser.feed(b"\n") == ["a\nb"]


# ------------------------------------------------------------ streams and errors from odd servers


ROUTES = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings"}


@contextlib.asynccontextmanager
async def serving(**routes: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """A one-off server: `chat=handler` answers /v1/chat/completions, `embeddings=` /v1/embeddings.
    Yields the /v1 base URL."""
    app = web.Application()
    for name, handler in routes.items():
        app.router.add_post(ROUTES[name], handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def chunk(text: str) -> str:
    return json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]},
                      ensure_ascii=False)  # raw UTF-8 in the stream, as vLLM sends it


def raw_stream(*pieces: bytes) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.01)  # its own TCP segment, most likely
        return response
    return chat


async def test_a_stream_with_crlf_comments_and_characters_split_between_writes():
    body = f": hello\r\ndata: {chunk('caf')}\r\n\r\ndata: {chunk('é 🦊')}\r\n\r\ndata: [DONE]\r\n\r\n".encode()
    fox = body.index("🦊".encode()) + 2
    accent = body.index("é".encode()) + 1
    pieces = body[:accent], body[accent:fox], body[fox:fox + 3], body[fox + 3:]
    async with serving(chat=raw_stream(*pieces)) as url:
        client = EngineClient([url], retries=0)
        assert await collect(client) == ("café 🦊", [])
        await client.close()


async def test_an_error_sent_mid_stream_is_a_bad_response():
    error = json.dumps({"error": {"message": "the engine's worker died", "type": "InternalServerError",
                                  "code": 500}})
    async with serving(chat=raw_stream(f"data: {chunk('Once')}\n\ndata: {error}\n\n".encode())) as url:
        client = EngineClient([url], retries=0)
        seen = []
        with pytest.raises(EngineBadResponse, match="worker died"):
            async for event in client.chat_stream(HELLO):
                seen.append(event.text)
        assert seen == ["Once"]
        await client.close()


async def test_a_stream_that_is_not_an_event_stream_or_not_json_is_a_bad_response():
    async def json_answer(request: web.Request) -> web.Response:
        return web.json_response({"choices": []})

    async with serving(chat=json_answer) as url:
        client = EngineClient([url], retries=0)
        with pytest.raises(EngineBadResponse, match="application/json"):
            await collect(client)
        await client.close()
    async with serving(chat=raw_stream(b"data: {not json\n\n")) as url:
        client = EngineClient([url], retries=0)
        with pytest.raises(EngineBadResponse, match="not a chunk"):
            await collect(client)
        await client.close()


def answer(status: int, body: str | dict, **headers: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, text=text, headers=headers)
    return handler


LEGACY_VLLM_TOO_LONG = {"object": "error", "type": "BadRequestError", "param": None, "code": 400, "message": (
    "This model's maximum context length is 2048 tokens. However, you requested 2348 tokens (2048 in the "
    "messages, 300 in the completion). Please reduce the length of the messages or completion.")}


@pytest.mark.parametrize("status, body, error, kind", [
    (400, LEGACY_VLLM_TOO_LONG, EngineContextLength, "too_long"),  # vLLM <= 0.9: a flat body
    (400, "Bad request: no such sampler", EngineBadResponse, "refused"),  # plain text
    (404, {"detail": "Not Found"}, EngineBadResponse, "refused"),  # FastAPI's
    (502, "<html>Bad Gateway</html>", EngineUnavailable, "server_error"),  # a proxy before a dead server
    (429, {"error": {"message": "Slow down", "type": "rate_limit", "code": None}}, EngineUnavailable, "overloaded"),
    (503, {"error": {"message": "No chat model", "type": "server_error", "code": "role_disabled"}},
     EngineFeatureOff, "feature_off"),
], ids=["vllm-legacy-length", "text", "fastapi", "html", "rate-limited", "role-disabled"])
async def test_error_bodies_of_every_shape_map_to_our_errors(status, body, error, kind):
    async with serving(chat=answer(status, body)) as url:
        client = EngineClient([url], "s3cret-key", retries=0)
        for call in (client.chat(HELLO), collect(client)):
            with pytest.raises(error) as caught:
                await call
            assert type(caught.value) is error and caught.value.kind == kind
            assert str(status) in str(caught.value) or error is EngineFeatureOff
            assert "s3cret-key" not in str(caught.value)
        if error is EngineContextLength:
            assert caught.value.prompt_tokens == 2048
        if isinstance(body, str):
            assert body[:10] in str(caught.value)
        await client.close()


# ------------------------------------------------------------ retries


def test_the_retry_delay_takes_a_short_retry_after_else_backs_off():
    assert retry_delay(0, {"retry-after": "3"}) == 3.0
    assert retry_delay(0, {"retry-after": "1.5"}) == 1.5
    assert retry_delay(5, {"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # milliseconds first
    for headers in ({}, {"retry-after": "3600"}, {"retry-after": "0"}, {"retry-after": "Wed, 21 Oct 2065 07:28:00 GMT"},
                    {"retry-after": "nan"}):
        assert 0.375 <= retry_delay(0, headers) <= 0.5, headers  # 0.5 s less up to a quarter
    assert 1.5 <= retry_delay(2, {}) <= 2.0
    assert 6.0 <= retry_delay(50, {}) <= 8.0  # capped


async def test_a_retry_waits_as_retry_after_asks():
    calls: list[float] = []

    async def busy_once(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.json_response({"error": {"message": "busy", "type": "rate_limit"}}, status=429,
                                     headers={"Retry-After": "1"})
        return web.json_response({"data": [{"index": 0, "embedding": [1.0]}]})

    async with serving(embeddings=busy_once) as url:
        client = EngineClient([url], retries=1)
        assert await client.embed(["x"]) == [[1.0]]
        assert len(calls) == 2 and calls[1] - calls[0] >= 0.95  # not the 0.5 s backoff
        calls.clear()
        client = EngineClient([url], retries=0)
        with pytest.raises(EngineUnavailable) as caught:
            await client.embed(["x"])
        assert caught.value.kind == "overloaded" and len(calls) == 1
        await client.close()


async def test_5xx_is_retried_but_a_disabled_role_is_not(fake_engine: FakeEngine):
    client = EngineClient([fake_engine.url], retries=1)
    await fake_engine.set_mode("error", times=1)
    assert (await client.chat(HELLO)).text
    assert len(fake_engine.requests_to("/v1/chat/completions")) == 2
    fake_engine.images = False  # our engine's 503 role_disabled (with x-should-retry: false)
    with pytest.raises(EngineFeatureOff):
        await client.generate_image("a cat")
    assert len(fake_engine.requests_to("/v1/images/generations")) == 1
    await client.close()


async def test_a_503_role_disabled_is_not_retried_even_without_x_should_retry():
    calls = []

    async def disabled(request: web.Request) -> web.Response:
        calls.append(request)
        return web.json_response({"error": {"message": "off", "type": "server_error", "code": "role_disabled"}},
                                 status=503)

    async with serving(embeddings=disabled) as url:
        client = EngineClient([url], retries=2)
        with pytest.raises(EngineFeatureOff):
            await client.embed(["x"])
        assert len(calls) == 1
        await client.close()


async def test_every_call_shares_one_kept_alive_connection():
    ports = []

    async def remember_port(request: web.Request) -> web.Response:
        ports.append(request.transport.get_extra_info("peername")[1])
        return await stream(request)

    stream = raw_stream(f"data: {chunk('hi')}\n\ndata: [DONE]\n\n".encode())

    async def embeddings(request: web.Request) -> web.Response:
        ports.append(request.transport.get_extra_info("peername")[1])
        return web.json_response({"data": [{"index": 0, "embedding": [1.0]}]})

    async with serving(chat=remember_port, embeddings=embeddings) as url:
        client = EngineClient([url], retries=0)
        for _ in range(3):
            assert (await collect(client))[0] == "hi"
            await client.embed(["x"])
        assert len(ports) == 6 and len(set(ports)) == 1
        await client.close()
