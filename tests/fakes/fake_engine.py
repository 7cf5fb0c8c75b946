"""A fake OpenAI-compatible engine: an aiohttp server on a free loopback port.

It answers the routes the bot uses, shaped exactly like OpenAI (and our engine) answer them:
/v1/chat/completions (plain and `stream: true` SSE), /v1/images/generations (a real PNG of the
asked size), /v1/embeddings (deterministic hashed bag of words, so similar prompts are close),
/v1/audio/transcriptions, /v1/audio/speech (espeak-ng speech as WAV), /v1/audio/voices, /v1/models
and /health. It adds our engine's top-level `masque` object
(fusion report, transcripts, captions) unless told to act like vLLM/OpenAI (`masque=False`).

Failure modes (`await engine.set_mode(...)`) let tests see how the bot copes with an engine that
is down (connection refused), slow (never answers within the client's timeout), stalls mid-stream,
returns garbage or the wrong shape, or answers 500 with an OpenAI error body.

Every request is recorded (`engine.requests`) with its timing, so tests can assert on what the bot
sent and benchmarks can subtract the engine's own time.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from tests.fakes.openai_shapes import (
    MAX_IMAGE_SIDE,
    WORD_RE,
    default_reply,
    embed_text,
    error_body,
    media_report,
    parse_size,
    png_of,
    split_tokens,
    usage,
)

HOST = "127.0.0.1"
DEFAULT_MODEL = "fake-masque"
DEFAULT_IMAGE_SIZE = "1024x1024"
SLOW_SECONDS = 3600.0  # "slow" means: longer than any client timeout a test would set
DEFAULT_TRANSCRIPT = "I heard you loud and clear."
DEFAULT_CAPTION = "a picture of a lantern on a wooden table"

FAKE_VOICES = ("joe", "amy")
RECORD = web.RequestKey("record", "RecordedRequest")
FAILURE = web.RequestKey("failure", "FailureMode")

Reply = str | Callable[[dict[str, Any]], str | Awaitable[str]]


# Sampler fields vLLM, llama.cpp's server and our engine take that OpenAI's API refuses.
NOT_OPENAI_PARAMS = ("top_k", "min_p", "repetition_penalty")


class FailureMode(StrEnum):
    """How the fake misbehaves (OK = it does not)."""

    OK = "ok"
    DOWN = "down"  # nothing listens: connection refused
    SLOW = "slow"  # accepts the request, never answers
    STALL = "stall"  # streams the first chunk, then nothing (non-stream: like SLOW)
    GARBAGE = "garbage"  # 200 with a body that is not JSON
    WRONG_SHAPE = "wrong_shape"  # 200 with JSON that is not what the route returns
    ERROR = "error"  # `error_status` (500) with an OpenAI error body


@dataclass
class RecordedRequest:
    """One request the fake got, with when its handling started and ended (perf_counter)."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    form: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    finished: float | None = None

    @property
    def engine_seconds(self) -> float:
        """Time the fake spent on this request (latency, token delays, writing)."""
        return (self.finished or self.started) - self.started


def _bad_request(message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, "invalid_request_error", None, param), status=400)


class FakeEngine:
    """An OpenAI-shaped engine for tests and benchmarks. `await start()`, use `.url`, `await stop()`."""

    def __init__(
        self,
        *,
        reply: Reply = default_reply,
        token_delay: float = 0.0,
        latency: float = 0.0,
        masque: bool = True,
        masque_chunk: str = "first",
        transcript: str = DEFAULT_TRANSCRIPT,
        caption: str = DEFAULT_CAPTION,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        error_status: int = 500,
        openai_params_only: bool = False,
        images: bool = True,
    ) -> None:
        self.reply = reply
        # Like api.openai.com: a body field OpenAI does not know (top_k, min_p, repetition_penalty) is a 400.
        self.openai_params_only = openai_params_only
        # False: like our engine with no image model (the offline preset): image requests get its 503
        # `role_disabled`, and /v1/models (role-tagged, as ours is) lists no image model.
        self.images = images
        self.token_delay = token_delay
        self.latency = latency
        self.masque = masque
        self.masque_chunk = masque_chunk  # "first" or "last": the engine may put it on any chunk
        self.transcript = transcript
        # Optional real speech-to-text for /v1/audio/transcriptions: file bytes -> text (run in a thread).
        self.transcriber: Callable[[bytes], str] | None = None
        self.speech_latency = 0.0
        self.speech_audio: bytes | None = None  # a fixed answer to /v1/audio/speech (a zero-cost speech server)
        self.caption = caption
        self.model = model
        self.api_key = api_key
        self.error_status = error_status
        self.requests: list[RecordedRequest] = []
        self.mode = FailureMode.OK
        self._fail_left: int | None = None
        self._fail_paths: tuple[str, ...] = ()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    # -- life cycle -------------------------------------------------------------------------

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT (the server root, where /health lives)."""
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL to give a client: http://127.0.0.1:PORT/v1."""
        return f"{self.base}/v1"

    async def start(self) -> str:
        """Listen on a free loopback port; returns `url`."""
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/images/generations", self._images)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_get("/v1/audio/voices", self._voices)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()
        return self.url

    def _add_routes(self, app: web.Application) -> None:
        """Where a subclass adds routes of its own (see `tests.fakes.fake_vllm`)."""

    async def stop(self) -> None:
        """Stop listening and end any request left hanging by SLOW/STALL."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, HOST, self.port)
        await self._site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def set_mode(self, mode: FailureMode | str, *, times: int | None = None,
                       paths: tuple[str, ...] = ()) -> None:
        """Misbehave from now on (or for the next `times` requests), on every route or only `paths`.

        DOWN closes the listening socket, so new connections are refused; OK listens again on the
        same port.
        """
        mode = FailureMode(mode)
        if mode is FailureMode.DOWN and times is not None:
            raise ValueError("DOWN lasts until set_mode('ok'): a closed socket counts no requests")
        was_down = self.mode is FailureMode.DOWN
        self.mode, self._fail_left, self._fail_paths = mode, times, paths
        if mode is FailureMode.DOWN and not was_down and self._site is not None:
            await self._site.stop()
            self._site = None
        elif mode is not FailureMode.DOWN and was_down and self._runner is not None:
            await self._listen()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests to one route, oldest first."""
        return [r for r in self.requests if r.path == path]

    # -- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        record = RecordedRequest(request.method, request.path, dict(request.headers), started=time.perf_counter())
        self.requests.append(record)
        request[RECORD] = record
        try:
            return await self._guarded(request, handler, record)
        finally:
            record.finished = time.perf_counter()

    async def _guarded(self, request: web.Request, handler: Callable, record: RecordedRequest) -> web.StreamResponse:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response(error_body("Incorrect API key provided.", "invalid_request_error",
                                                "invalid_api_key"), status=401)
        failure = self._failure_for(request.path)
        if failure is FailureMode.DOWN:
            # A keep-alive connection opened before going down: drop it like a dead process would.
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("fake engine is down")
        if failure is FailureMode.ERROR:
            return web.json_response(error_body("The fake engine failed on purpose.", "server_error"),
                                     status=self.error_status)
        request[FAILURE] = failure
        if failure is FailureMode.OK or await self._wants_stream(request):
            return await handler(request)  # streaming failures happen inside the stream
        if failure in (FailureMode.SLOW, FailureMode.STALL):
            await self._hang()
        if failure is FailureMode.GARBAGE:
            return web.Response(text="<html>502 bad gateway, not json {", content_type="application/json")
        return web.json_response({"unexpected": True, "choices": "none"})  # WRONG_SHAPE

    async def _wants_stream(self, request: web.Request) -> bool:
        if request.path != "/v1/chat/completions":
            return False
        body = await self._json(request)
        return isinstance(body, dict) and bool(body.get("stream"))

    def _failure_for(self, path: str) -> FailureMode:
        if self.mode is FailureMode.OK or (self._fail_paths and path not in self._fail_paths):
            return FailureMode.OK
        mode = self.mode
        if self._fail_left is not None:
            self._fail_left -= 1
            if self._fail_left <= 0:
                self.mode, self._fail_left = FailureMode.OK, None
        return mode

    async def _hang(self) -> None:
        try:
            await asyncio.wait_for(self._closing.wait(), SLOW_SECONDS)
        except TimeoutError:
            pass
        raise web.HTTPServiceUnavailable()

    async def _json(self, request: web.Request) -> dict[str, Any] | web.Response:
        record: RecordedRequest = request[RECORD]
        if record.json is not None:
            return record.json
        try:
            record.json = await request.json()
        except json.JSONDecodeError as exc:
            return _bad_request(f"We could not parse the JSON body of your request: {exc}")
        if not isinstance(record.json, dict):
            return _bad_request("The request body must be a JSON object.")
        return record.json

    # -- routes -----------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not body.get("model"):
            return _bad_request("you must provide a model parameter", "model")
        if not isinstance(messages, list) or not messages:
            return _bad_request("'messages' must be a non-empty array", "messages")
        unknown = [k for k in body if k in NOT_OPENAI_PARAMS] if self.openai_params_only else []
        if unknown:  # OpenAI's wording
            return _bad_request(f"Unrecognized request argument supplied: {unknown[0]}")
        text = self.reply(body) if callable(self.reply) else self.reply
        if inspect.isawaitable(text):
            text = await text
        tokens = split_tokens(text)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if limit and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        masque = media_report(messages, self.transcript, self.caption) if self.masque else None
        if body.get("stream"):
            return await self._chat_stream(request, body, tokens, finish, masque)
        await asyncio.sleep(self.latency + self.token_delay * len(tokens))
        return web.json_response(self._completion(body, "".join(tokens), finish, masque))

    def _completion(self, body: dict, text: str, finish: str, masque: dict | None) -> dict[str, Any]:
        completion = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": self._usage(body, text),
        }
        if masque is not None:
            completion["masque"] = masque
        return completion

    def _usage(self, body: dict, text: str) -> dict[str, int]:
        """The `usage` object of a reply to `body` (a subclass may count tokens its own way)."""
        return usage(body, text)

    async def _chat_stream(self, request: web.Request, body: dict, tokens: list[str], finish: str,
                           masque: dict | None) -> web.StreamResponse:
        failure = request[FAILURE]
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                               "model": body["model"], "system_fingerprint": None, "choices": [choice], **extra})

        if failure is FailureMode.SLOW:
            await self._hang()
        await asyncio.sleep(self.latency)
        first_extra = {"masque": masque} if masque is not None and self.masque_chunk == "first" else {}
        last_extra = {"masque": masque} if masque is not None and self.masque_chunk != "first" else {}
        async with sse_response(request, sep="\n", allow_all_methods=True) as sse:
            if failure is FailureMode.GARBAGE:
                await sse.send("{this is not json")
                return sse
            if failure is FailureMode.WRONG_SHAPE:
                await sse.send(json.dumps({"unexpected": True}))
                await sse.send("[DONE]")
                return sse
            await sse.send(chunk({"role": "assistant", "content": "", "refusal": None}, **first_extra))
            if failure is FailureMode.STALL:
                await self._hang()
            for token in tokens:
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                await sse.send(chunk({"content": token}))
            await sse.send(chunk({}, finish, **last_extra))
            if (body.get("stream_options") or {}).get("include_usage"):
                await sse.send(json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                           "model": body["model"], "choices": [],
                                           "usage": self._usage(body, "".join(tokens))}))
            await sse.send("[DONE]")
        return sse

    async def _images(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        if not self.images:
            return web.json_response(
                error_body("The images role is disabled on this server.", "server_error", code="role_disabled"),
                status=503, headers={"x-should-retry": "false"})
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return _bad_request("'prompt' must be a non-empty string", "prompt")
        size = parse_size(body.get("size") or DEFAULT_IMAGE_SIZE)
        if size is None:
            return _bad_request(f"Invalid size {body.get('size')!r}: use WIDTHxHEIGHT up to {MAX_IMAGE_SIDE}.",
                                "size")
        n = int(body.get("n") or 1)
        await asyncio.sleep(self.latency)
        data = [{"b64_json": base64.b64encode(png_of(*size, f"{prompt}#{i}")).decode(), "revised_prompt": prompt}
                for i in range(n)]
        return web.json_response({"created": int(time.time()), "data": data})

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            return _bad_request("'input' must be a string or a non-empty array of strings", "input")
        base64_wanted = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = embed_text(text)
            encoded: Any = vector
            if base64_wanted:  # what the official client asks for by default: little-endian float32
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        words = sum(len(WORD_RE.findall(t.lower())) for t in inputs)
        return web.json_response({"object": "list", "data": data, "model": body.get("model") or self.model,
                                  "usage": {"prompt_tokens": words, "total_tokens": words}})

    async def _transcriptions(self, request: web.Request) -> web.Response:
        record: RecordedRequest = request[RECORD]
        if not request.content_type.startswith("multipart/"):
            return _bad_request("The request must be multipart/form-data with a 'file' part.", "file")
        post = await request.post()
        for name, value in post.items():
            if isinstance(value, web.FileField):
                record.form[name] = {"filename": value.filename, "content_type": value.content_type,
                                     "data": value.file.read()}
            else:
                record.form[name] = value
        if not isinstance(record.form.get("file"), dict) or not record.form["file"]["data"]:
            return _bad_request("'file' is required and must not be empty", "file")
        await asyncio.sleep(self.latency)
        text = self.transcript
        if self.transcriber is not None:
            text = await asyncio.to_thread(self.transcriber, record.form["file"]["data"])
        if record.form.get("response_format") == "text":
            return web.Response(text=text)
        return web.json_response({"text": text})

    async def _speech(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        text, voice = body.get("input"), body.get("voice")
        if not isinstance(text, str) or not text.strip():
            return _bad_request("'input' is required and must not be empty", "input")
        if not isinstance(voice, str) or not voice:
            return _bad_request("'voice' is required", "voice")
        if body.get("response_format", "mp3") not in ("wav", "mp3", "opus"):
            return _bad_request("this fake speaks wav, mp3 or opus (all as WAV)", "response_format")
        await asyncio.sleep(self.speech_latency)
        audio = self.speech_audio or await asyncio.to_thread(espeak_wav, text)
        return web.Response(body=audio, content_type="audio/wav")

    async def _voices(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "default": FAKE_VOICES[0], "data": [
            {"id": v, "object": "voice", "language": "en_US"} for v in FAKE_VOICES]})

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": self.model, "object": "model", "created": 0, "owned_by": "masque"}]
        if not self.images:  # our engine's listing: every loaded role, tagged
            data[0]["masque"] = {"role": "chat"}
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "ready": True,
                                  "roles": {"chat": {"state": "ready", "model": self.model}}})


def espeak_wav(text: str) -> bytes:
    """Real speech for `text` from espeak-ng (22.05 kHz mono WAV)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian package espeak-ng)")
    return subprocess.run([exe, "--stdout", "-s", "170", text], check=True, capture_output=True,
                          timeout=30).stdout
