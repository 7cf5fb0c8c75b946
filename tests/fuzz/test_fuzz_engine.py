"""Fuzzing the engine's request bodies: never a 500; every 4xx is one OpenAI-shaped error body.

The app is the real one (`create_app`) with no real model: fakes registered by `Registry.add` stand
in for the chat and embedding models, so the examples exercise parsing, validation and the media
decoders, not generation. Roles left off answer 503, which is fine here: the property is about 500s.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from engine.app import create_app
from engine.batching import Delta
from engine.routes import REGISTRY
from engine.settings import EngineSettings
from tests.fuzz import fuzz


class FakeHandle:
    def __init__(self) -> None:
        self.sent = False

    def __aiter__(self) -> FakeHandle:
        return self

    async def __anext__(self) -> Delta:
        if self.sent:
            raise StopAsyncIteration
        self.sent = True
        return Delta("ok", 1, "stop")

    def cancel(self) -> None:
        pass


class FakeTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 1000 for c in text[:4000]]}

    def apply_chat_template(self, messages: list[dict], **_: Any) -> str:
        return json.dumps(messages)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [str(i) for i in ids]


class FakeChat:
    fusion = "native"  # the media go through parse_media's decoders and straight to "the model"
    context_tokens = 4096
    tokenizer = FakeTokenizer()

    def prepare(self, messages: list[dict], images: list, audios: list) -> list[int]:
        return self.tokenizer(json.dumps(messages, default=str))["input_ids"][:1000]

    def submit(self, prompt: list[int], params: Any) -> FakeHandle:
        return FakeHandle()


class FakeEmbeddings:
    dimensions = 4

    def embed_with_usage(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return [[0.5] * 4 for _ in texts], sum(len(t) for t in texts)


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[asyncio.AbstractEventLoop, TestClient]]:
    loop = asyncio.new_event_loop()
    off = {"model": ""}
    settings = EngineSettings(preset="none", chat=off, caption=off, stt=off, tts=off, images=off, embeddings=off)
    app = create_app(settings)
    app[REGISTRY].add("chat", FakeChat())
    app[REGISTRY].add("embeddings", FakeEmbeddings())
    client = TestClient(TestServer(app), loop=loop)
    loop.run_until_complete(client.start_server())
    yield loop, client
    loop.run_until_complete(client.close())
    loop.close()


def post(engine: tuple[asyncio.AbstractEventLoop, TestClient], path: str, **kw: Any) -> tuple[int, Any]:
    loop, client = engine

    async def go() -> tuple[int, Any]:
        async with client.post(path, **kw) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, json.loads(raw)
            return resp.status, raw

    return loop.run_until_complete(go())


def check(status: int, body: Any) -> None:
    assert status != 500 and status < 500 or status == 503, (status, body)
    if status >= 400:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error.get("message"), str) and error["message"], body
        assert {"message", "type", "param", "code"} <= set(error), body


# ---------------------------------------------------------------- strategies

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


def tiny_png(width: int = 2, height: int = 2) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A 2x2 PNG whose header claims another size (the pixels do not follow)."""
    blob = bytearray(tiny_png())
    ihdr = struct.pack(">II", width, height) + bytes(blob[24:29])
    blob[16:29] = ihdr
    blob[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(blob)


def wav(samples: bytes, rate: int = 16000) -> bytes:
    header = b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(samples))
    return header + samples


IMAGE_BYTES = st.one_of(st.binary(max_size=200), st.just(tiny_png()), st.just(b"GIF89a" + b"\0" * 20),
                        st.builds(png_declaring, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)))
DATA_URLS = st.one_of(
    st.builds(lambda mime, data: f"data:{mime};base64,{base64.b64encode(data).decode()}",
              st.sampled_from(["image/png", "image/jpeg", "text/plain", "", "image/png;charset=x"]), IMAGE_BYTES),
    st.text(max_size=40).map(lambda t: "data:" + t),
    st.sampled_from(["data:image/png;base64,!!!", "data:,", "data:image/png,rawbytes", "ftp://x", "", "file:///etc/x"]),
)
AUDIO_DATA = st.one_of(st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
                       st.builds(lambda s: base64.b64encode(wav(s)).decode(), st.binary(max_size=400)),
                       st.text(max_size=30))
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30) | JSON_VALUES}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": DATA_URLS}, optional={"detail": JSON_VALUES})
                           | JSON_VALUES}),
    st.fixed_dictionaries({"type": st.just("input_audio"),
                           "input_audio": st.fixed_dictionaries({"data": AUDIO_DATA,
                                                                 "format": st.sampled_from(["wav", "mp3", "ogg", "",
                                                                                            "exe"]) | JSON_VALUES})
                           | JSON_VALUES}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url", "input_audio", "audio_url"]), JSON_VALUES,
                    max_size=3),
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]) | JSON_VALUES},
    optional={"content": st.text(max_size=30) | st.lists(PART, max_size=3) | JSON_VALUES, "name": JSON_VALUES},
)
CHAT = st.fixed_dictionaries(
    {"model": st.sampled_from(["masque-chat", "gpt-4", ""]) | JSON_VALUES,
     "messages": st.lists(MESSAGE, max_size=3) | JSON_VALUES},
    optional={k: JSON_VALUES | st.integers(-5, 10**6) for k in
              ["max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
               "stream", "stream_options", "logit_bias", "response_format", "presence_penalty"]},
)
BODIES = st.one_of(st.binary(max_size=64), JSON_VALUES.map(lambda v: json.dumps(v).encode()))


# ---------------------------------------------------------------- tests


@fuzz(150)
@given(CHAT)
@example({"model": "masque-chat", "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                               + base64.b64encode(png_declaring(100_000, 100_000)).decode()}}]}]})
@example({"model": "masque-chat", "messages": [{"role": "user", "content": [
    {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"junk").decode(), "format": "wav"}}]}]})
@example({"model": "masque-chat", "messages": [{"role": "user", "content": "hi"}], "n": 10**30})
def test_chat_completions(engine, body: dict) -> None:
    check(*post(engine, "/v1/chat/completions", json=body))


@fuzz(60)
@given(BODIES, st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/tokenize", "/v1/images/generations",
                                "/v1/audio/speech"]))
@example(b"\xff\xfe", "/v1/chat/completions")
@example(b"[]", "/tokenize")
def test_raw_bodies(engine, raw: bytes, path: str) -> None:
    check(*post(engine, path, data=raw, headers={"Content-Type": "application/json"}))


@fuzz(60)
@given(st.fixed_dictionaries({}, optional={"model": JSON_VALUES | st.just("masque-chat"),
                                           "messages": st.lists(MESSAGE, max_size=2) | JSON_VALUES,
                                           "prompt": st.text(max_size=20) | JSON_VALUES,
                                           "add_special_tokens": JSON_VALUES, "return_token_strs": JSON_VALUES,
                                           "add_generation_prompt": JSON_VALUES}))
def test_tokenize(engine, body: dict) -> None:
    check(*post(engine, "/tokenize", json=body))


@fuzz(60)
@given(st.fixed_dictionaries({"input": st.text(max_size=20) | st.lists(st.text(max_size=5), max_size=3)
                              | st.lists(st.integers(-1, 10**9), max_size=3) | JSON_VALUES},
                             optional={"model": JSON_VALUES, "dimensions": JSON_VALUES | st.integers(-1, 10**9),
                                       "encoding_format": st.sampled_from(["float", "base64", "x"]) | JSON_VALUES}))
def test_embeddings(engine, body: dict) -> None:
    check(*post(engine, "/v1/embeddings", json=body))


@fuzz(40)
@given(st.fixed_dictionaries({"prompt": st.text(max_size=20) | JSON_VALUES},
                             optional={k: JSON_VALUES | st.integers(-1, 10**9) | st.sampled_from(["1024x1024", "0x0",
                                                                                                  "x", "99999x1"])
                                       for k in ["model", "n", "size", "response_format", "seed", "steps"]}))
def test_image_generations(engine, body: dict) -> None:
    check(*post(engine, "/v1/images/generations", json=body))


@fuzz(60)
@given(file=st.binary(max_size=300) | st.builds(wav, st.binary(max_size=300)),
       filename=st.sampled_from(["a.wav", "a.mp3", "a", "../../x.ogg", "a.exe"]),
       fields=st.dictionaries(st.sampled_from(["model", "language", "temperature", "response_format", "prompt"]),
                              st.text(max_size=10) | st.sampled_from(["whisper-1", "en", "json", "srt", "-1", "nan"]),
                              max_size=4),
       with_file=st.booleans())
def test_transcriptions(engine, file: bytes, filename: str, fields: dict[str, str], with_file: bool) -> None:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    if with_file:
        form.add_field("file", file, filename=filename, content_type="application/octet-stream")
    check(*post(engine, "/v1/audio/transcriptions", data=form))


@fuzz(30)
@given(st.binary(max_size=200))
@example(b"Content-Disposition: form-data; name=\"file\"\r\n\r\nabc")  # no closing boundary: was a 500
@example(b"\x00\r\n\r\n")  # a part header that is not a header: was a 500
def test_transcriptions_raw_multipart(engine, raw: bytes) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    check(*post(engine, "/v1/audio/transcriptions", data=b"--xyz\r\n" + raw, headers=headers))


class FakeStt:
    multilingual = True

    def transcribe(self, audio: Any, language: str | None, temperature: Any, prompt: Any) -> Any:
        from engine.backends.stt import Transcript

        return Transcript("", language or "en", 0.0, [])


@fuzz(60)
@given(file=st.binary(max_size=400) | st.builds(wav, st.binary(max_size=400)) | IMAGE_BYTES,
       filename=st.sampled_from(["a.wav", "a.mp3", "a.ogg", "a", "a.flac", "a.webm"]))
@example(file=wav(b"\0" * 10, rate=0), filename="a.wav")
def test_transcriptions_decode_junk(engine, file: bytes, filename: str) -> None:
    """With a speech model present, the file reaches the decoder: junk is a 400, never a 500."""
    engine[1].server.app[REGISTRY].add("stt", FakeStt())
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", file, filename=filename, content_type="application/octet-stream")
    check(*post(engine, "/v1/audio/transcriptions", data=form))


@fuzz(80)
@given(IMAGE_BYTES)
@example(png_declaring(100_000, 100_000))
@example(png_declaring(0, 0))
def test_decode_image_rejects_junk(data: bytes) -> None:
    from engine.errors import APIError
    from engine.fusion import decode_image

    try:
        image = decode_image(data, EngineSettings(preset="none").limits, "image_url")
    except APIError as exc:
        assert exc.status in (400, 413) and str(exc)
    else:
        assert image.width * image.height > 0


@fuzz(80)
@given(AUDIO_DATA, st.sampled_from(["wav", "mp3", "ogg", "flac", "webm", "m4a", "opus"]))
def test_decode_clip_rejects_junk(data: str, fmt: str) -> None:
    from engine.errors import APIError
    from engine.fusion import decode_clip
    from engine.protocol.chat import AudioPart

    part = AudioPart.model_validate({"type": "input_audio", "input_audio": {"data": data or "x", "format": fmt}})
    try:
        decode_clip(part, EngineSettings(preset="none").limits, "input_audio")
    except APIError as exc:
        assert exc.status in (400, 413) and str(exc)
