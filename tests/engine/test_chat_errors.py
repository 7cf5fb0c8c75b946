"""Every bad chat request gets the OpenAI error body with the right status, and harms no one."""

from __future__ import annotations

import asyncio
import base64
import io
import wave
from typing import Any

import openai
import pytest
from PIL import Image

from tests.engine.conftest import Reply, request

MODEL = "masque-chat"
USER = [{"role": "user", "content": "Hello there."}]


async def post(url: str, body: Any = None, raw: bytes | None = None) -> Reply:
    return await request("POST", f"{url}/v1/chat/completions", body=body, data=raw)


def assert_error(resp: Reply, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    assert resp.status == status, resp.body
    error = resp.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def with_part(part: dict) -> dict:
    return {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}]}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(data: str, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def silent_wav(seconds: float, rate: int = 8000) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(rate)
        out.writeframes(bytes([128]) * int(seconds * rate))
    return base64.b64encode(buffer.getvalue()).decode()


async def test_malformed_json(engine_url: str) -> None:
    error = assert_error(await post(engine_url, raw=b'{"model": "masque-chat", "messages": ['), 400,
                         code="invalid_json")
    assert error["type"] == "invalid_request_error"
    assert_error(await post(engine_url, raw=b"[1, 2]"), 400, code="invalid_json")
    assert_error(await post(engine_url, raw=b""), 400, code="empty_body")


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": USER}, "model", "missing_required_parameter"),
    ({"model": MODEL}, "messages", "missing_required_parameter"),
    ({"model": MODEL, "messages": []}, "messages", "invalid_value"),
    ({"model": MODEL, "messages": [{"content": "hi"}]}, "messages.0.role", None),
    ({"model": MODEL, "messages": USER, "temperature": 3}, "temperature", "invalid_value"),
    ({"model": MODEL, "messages": USER, "top_p": 0}, "top_p", "invalid_value"),
    ({"model": MODEL, "messages": USER, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"model": MODEL, "messages": USER, "n": 0}, "n", "invalid_value"),
    ({"model": MODEL, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"model": MODEL, "messages": USER, "seed": "x"}, "seed", "invalid_value"),
])
async def test_invalid_fields_name_the_param(engine_url: str, body: dict, param: str, code: str) -> None:
    assert_error(await post(engine_url, body), 400, param, code)


async def test_unknown_part_type(engine_url: str) -> None:
    error = assert_error(await post(engine_url, with_part({"type": "video_url", "video_url": {}})), 400)
    assert error["param"].startswith("messages.0.content")


def test_unknown_model_is_404(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="gpt-9", messages=USER, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"


async def test_too_many_tokens(engine_url: str, engine_settings: Any) -> None:
    asked = engine_settings.chat.max_new_tokens + 1
    assert_error(await post(engine_url, {"model": MODEL, "messages": USER, "max_tokens": asked}),
                 400, "max_tokens", "context_length_exceeded")
    huge = [{"role": "user", "content": "treasure " * (engine_settings.chat.max_context_tokens + 10)}]
    assert_error(await post(engine_url, {"model": MODEL, "messages": huge}), 400, "messages",
                 "context_length_exceeded")
    n = engine_settings.chat.max_n + 1
    assert_error(await post(engine_url, {"model": MODEL, "messages": USER, "n": n}), 400, "n")


async def test_invalid_base64(engine_url: str) -> None:
    assert_error(await post(engine_url, with_part(image_part("data:image/png;base64,@@not-base64@@"))),
                 400, "messages[0].content[1]", "invalid_base64")
    assert_error(await post(engine_url, with_part(audio_part("%%%"))), 400, "messages[0].content[1]",
                 "invalid_base64")


async def test_image_that_is_not_an_image(engine_url: str) -> None:
    fake = base64.b64encode(b"this is plain text, not a picture").decode()
    assert_error(await post(engine_url, with_part(image_part(f"data:image/png;base64,{fake}"))),
                 400, "messages[0].content[1]", "invalid_image")
    assert_error(await post(engine_url, with_part(image_part("not-a-url"))), 400, code="invalid_url")


async def test_image_too_large(engine_url: str, engine_settings: Any) -> None:
    side = int(engine_settings.limits.max_image_pixels ** 0.5) + 16
    url = "data:image/png;base64," + base64.b64encode(png_bytes(side, side, "1")).decode()
    assert_error(await post(engine_url, with_part(image_part(url))), 413, "messages[0].content[1]",
                 "image_too_large")


async def test_remote_image_url_refused(engine_url: str) -> None:
    part = image_part("http://169.254.169.254/latest/meta-data/")
    assert_error(await post(engine_url, with_part(part)), 400, "messages[0].content[1]",
                 "remote_url_disabled")


async def test_audio_that_is_not_audio(engine_url: str) -> None:
    junk = base64.b64encode(b"RIFF....WAVEjunkjunkjunk" * 10).decode()
    error = assert_error(await post(engine_url, with_part(audio_part(junk))), 400)
    assert error["param"] == "messages[0].content[1]"


async def test_audio_longer_than_the_limit(engine_url: str, engine_settings: Any) -> None:
    clip = silent_wav(engine_settings.limits.max_audio_seconds + 5)
    error = assert_error(await post(engine_url, with_part(audio_part(clip))), 400)
    assert error["param"] == "messages[0].content[1]"


async def test_wrong_method_and_unknown_path(engine_url: str) -> None:
    assert_error(await request("GET", f"{engine_url}/v1/chat/completions"), 405)
    assert_error(await request("GET", f"{engine_url}/v1/nothing-here"), 404)


async def test_bad_requests_do_not_harm_a_good_one(
    async_openai_client: openai.AsyncOpenAI, engine_url: str
) -> None:
    bad = [
        post(engine_url, raw=b"{broken"),
        post(engine_url, with_part(image_part("data:image/png;base64,AAAA"))),
    ]
    good = async_openai_client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, temperature=0
    )
    *bad_replies, reply = await asyncio.gather(*bad, good)
    assert [r.status for r in bad_replies] == [400, 400]
    assert reply.choices[0].message.content.strip()
