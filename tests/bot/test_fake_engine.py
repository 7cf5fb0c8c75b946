"""The fake engine itself, checked with the official `openai` client so every bot test can trust it."""

from __future__ import annotations

import base64
import io
import json
import math

import aiohttp
import openai
import pytest
from PIL import Image

from tests.fakes.fake_engine import FailureMode, FakeEngine, default_reply

TINY_WAV = base64.b64encode(b"RIFF fake wav bytes").decode()


_clients: list[openai.AsyncOpenAI] = []


def client_for(engine: FakeEngine, timeout: float = 5.0) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=engine.url, api_key="test-key", timeout=timeout, max_retries=0)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients():
    """Close each test's clients in its own event loop (else they close in a later test's, long gone)."""
    yield
    while _clients:
        await _clients.pop().close()


def media_messages() -> list[dict]:
    return [
        {"role": "system", "content": "You are Wren."},
        {"role": "user", "content": [
            {"type": "text", "text": "look and listen"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "input_audio", "input_audio": {"data": TINY_WAV, "format": "wav"}},
        ]},
    ]


async def test_chat_whole_reply(fake_engine: FakeEngine) -> None:
    fake_engine.reply = lambda body: f"Hello {len(body['messages'])}"
    completion = await client_for(fake_engine).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello 1"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 2
    assert completion.model_extra["masque"] == {"fusion": "composed", "transcripts": [], "captions": []}
    assert fake_engine.requests_to("/v1/chat/completions")[0].json["messages"][0]["content"] == "hi"


async def test_chat_stream_is_shaped_like_openai(fake_engine: FakeEngine) -> None:
    fake_engine.reply = "The lantern flickers, and Wren smiles."
    stream = await client_for(fake_engine).chat.completions.create(
        model="any", messages=media_messages(), stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["masque"]["transcripts"] == [{"message": 1, "text": fake_engine.transcript}]
    assert chunks[0].model_extra["masque"]["captions"] == [{"message": 1, "text": fake_engine.caption}]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fake_engine.reply
    assert len(chunks) > 3  # several deltas, not one lump
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"


async def test_raw_stream_ends_with_done(fake_engine: FakeEngine) -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as http, http.post(f"{fake_engine.url}/chat/completions", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = [line for line in (await resp.text()).split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert '"usage"' in lines[-2] and '"choices": []' in lines[-2]


async def test_masque_on_last_chunk_or_absent(fake_engine: FakeEngine) -> None:
    fake_engine.masque_chunk = "last"
    client = client_for(fake_engine)
    chunks = [c async for c in await client.chat.completions.create(model="m", messages=media_messages(), stream=True)]
    assert [i for i, c in enumerate(chunks) if "masque" in (c.model_extra or {})] == [len(chunks) - 1]
    fake_engine.masque = False  # like vLLM / OpenAI
    completion = await client.chat.completions.create(model="m", messages=media_messages())
    assert "masque" not in (completion.model_extra or {})


async def test_max_tokens_cuts_with_length(fake_engine: FakeEngine) -> None:
    fake_engine.reply = "one two three four five"
    completion = await client_for(fake_engine).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert completion.choices[0].message.content == "one two"
    assert completion.choices[0].finish_reason == "length"


async def test_default_reply_quotes_the_user(fake_engine: FakeEngine) -> None:
    assert default_reply({"messages": media_messages()}) == "*nods slowly* You said: look and listen"


async def test_bad_requests_get_openai_errors(fake_engine: FakeEngine) -> None:
    client = client_for(fake_engine)
    with pytest.raises(openai.BadRequestError, match="messages"):
        await client.chat.completions.create(model="m", messages=[])
    fake_engine.api_key = "right"
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()


async def test_down_then_back(fake_engine: FakeEngine) -> None:
    client = client_for(fake_engine)
    await fake_engine.set_mode(FailureMode.DOWN)
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(f"{fake_engine.base}/health")
    await fake_engine.set_mode(FailureMode.OK)
    assert (await client.models.list()).data[0].id == fake_engine.model


async def test_slow_and_stalled_time_out(fake_engine: FakeEngine) -> None:
    client = client_for(fake_engine, timeout=0.3)
    messages = [{"role": "user", "content": "x"}]
    await fake_engine.set_mode("slow")
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=messages)
    await fake_engine.set_mode("stall")
    stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
    first = await anext(aiter(stream))
    assert first.choices[0].delta.role == "assistant"
    with pytest.raises(openai.APITimeoutError):  # the read timeout fires mid-stream
        await anext(aiter(stream))


async def test_garbage_wrong_shape_and_500(fake_engine: FakeEngine) -> None:
    client = client_for(fake_engine)
    messages = [{"role": "user", "content": "x"}]
    await fake_engine.set_mode("garbage")
    with pytest.raises(json.JSONDecodeError):  # what the official client raises on a non-JSON body
        await client.chat.completions.create(model="m", messages=messages)
    await fake_engine.set_mode("wrong_shape")
    wrong = await client.chat.completions.create(model="m", messages=messages)
    assert not isinstance(wrong.choices, list)
    await fake_engine.set_mode("error", times=1)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="m", messages=messages)
    assert caught.value.status_code == 500
    assert caught.value.body["message"] == "The fake engine failed on purpose."
    assert (await client.chat.completions.create(model="m", messages=messages)).choices[0].message.content


async def test_failure_limited_to_paths(fake_engine: FakeEngine) -> None:
    client = client_for(fake_engine)
    await fake_engine.set_mode("error", paths=("/v1/images/generations",))
    assert (await client.embeddings.create(model="e", input="fine")).data
    with pytest.raises(openai.InternalServerError):
        await client.images.generate(prompt="a cat", size="256x256")


async def test_images_are_real_pngs_of_the_asked_size(fake_engine: FakeEngine) -> None:
    result = await client_for(fake_engine).images.generate(prompt="a lighthouse", size="64x32",
                                                           response_format="b64_json",
                                                           extra_body={"seed": 3, "safe": True})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (64, 32)
    assert fake_engine.requests_to("/v1/images/generations")[0].json["safe"] is True


async def test_embeddings_are_deterministic_and_similar_for_similar_text(fake_engine: FakeEngine) -> None:
    client = client_for(fake_engine)
    texts = ["a rainy harbour at night with ships", "ships in a rainy harbour at night", "a sunny desert market"]
    first = await client.embeddings.create(model="e", input=texts)  # the client asks for base64 by default
    again = await client.embeddings.create(model="e", input=texts[0], encoding_format="float")
    vectors = [d.embedding for d in first.data]
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(vectors[0], again.data[0].embedding, strict=True))

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert math.isclose(cos(vectors[0], vectors[0]), 1.0, rel_tol=1e-5)
    assert cos(vectors[0], vectors[1]) > 0.8 > 0.2 > cos(vectors[0], vectors[2])


async def test_transcriptions_and_health(fake_engine: FakeEngine) -> None:
    fake_engine.transcript = "meet me at the docks"
    result = await client_for(fake_engine).audio.transcriptions.create(
        model="whisper-1", file=("note.ogg", b"OggS fake voice", "audio/ogg"))
    assert result.text == "meet me at the docks"
    form = fake_engine.requests_to("/v1/audio/transcriptions")[0].form
    assert form["file"]["filename"] == "note.ogg" and form["file"]["data"] == b"OggS fake voice"
    assert form["model"] == "whisper-1"
    async with aiohttp.ClientSession() as http, http.get(f"{fake_engine.base}/health") as resp:
        assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_token_delay_and_latency_are_timed() -> None:
    async with FakeEngine(reply="a b c d", token_delay=0.02, latency=0.05) as engine:
        stream = await client_for(engine).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "a b c d"
        assert engine.requests[0].engine_seconds >= 0.05 + 4 * 0.02
