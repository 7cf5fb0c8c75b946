"""The only place the bot calls a model: any OpenAI-compatible engine over HTTP.

Plain JSON over one shared aiohttp session (the official `openai` client cost the bot more CPU per
reply than everything else it does). Several URLs are used in turn (round robin); one that fails to
connect, times out or answers 5xx/429 is skipped for `engine_unhealthy_s` seconds and the call moves
on to the next. Each URL gets the `retries` the openai client would have made (connection errors,
timeouts, 408/409/429/5xx, with Retry-After). Failures surface as the EngineError types the callers
show to users: EngineUnavailable, EngineTimeout, EngineBadResponse and its kinds.

Our own engine adds a top-level `masque` object to chat responses
(fusion path, transcripts of audio parts, captions of image parts); in a
stream it may ride on any chunk. The client remembers per URL whether it has
seen one, so callers know whether to send audio natively or transcribe first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp

from bot.engine_http import SSEParser, StatusError, env_proxy, error_fields, loads, retry_delay
from bot.story.generation import EXTRA_PARAMS

log = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_TIMEOUT_S = 5.0
# The voice asked for when a persona has none: OpenAI's first voice name, which our engine speaks with its
# default voice and most OpenAI-compatible speech servers accept.
DEFAULT_SPEECH_VOICE = "alloy"
COUNT_TIMEOUT_S = 10.0  # counting tokens is quick; a server that stalls on it is estimated instead
DONE_DRAIN_S = 0.1  # how long a stream waits after `data: [DONE]` for its body's end
MAX_CONNECTIONS = 1000  # the openai client's pool size; aiohttp's default (100) would queue busy bots


class EngineError(Exception):
    """Base of every engine failure. `turn_id` names the user turn that was kept, when there is one."""

    user_message = "The story engine failed."
    turn_id: int | None = None
    kind = "error"  # how metrics and the turn log count it (bot/metrics.py)


class EngineUnavailable(EngineError):
    """No engine URL answered (down, refused, overloaded)."""

    user_message = "The story engine is not reachable right now. Try again in a minute."
    kind = "down"  # or "overloaded" (429, 503), "server_error" (another 5xx): see `_map_error`


class EngineTimeout(EngineError):
    """The engine took longer than the timeout."""

    user_message = "The story engine took too long to answer. Try again, or ask an admin to check it."
    kind = "timeout"


class EngineBadResponse(EngineError):
    """The engine answered, but not with something usable (garbage, an empty reply, a 4xx)."""

    user_message = "The story engine sent back something unusable. Try regenerating."
    kind = "bad_response"  # or "refused" (a 4xx): see `_map_error`


class EngineContextLength(EngineBadResponse):
    """The engine refused a prompt as too long for its context (our wording or vLLM's).

    The bot shrinks the prompt and retries; a user sees this only if that fails too.
    """

    user_message = ("The story engine's context is too small for this story's prompt. "
                    "Ask an admin to check MASQUE_CONTEXT_WINDOW and MASQUE_REPLY_MAX_TOKENS.")
    kind = "too_long"

    def __init__(self, message: str, prompt_tokens: int | None = None):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens  # what the server counted, when its message says


class EngineFeatureOff(EngineBadResponse):
    """The engine is up but serves no model for this kind of call (our engine's `role_disabled`)."""

    kind = "feature_off"

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what
        hint = _FEATURE_HINTS.get(what, "")
        self.user_message = f"The story engine has no {_FEATURE_NAMES.get(what, what)} model configured." + (
            f" {hint}" if hint else "")


_FEATURE_NAMES = {"images": "image", "speech": "text-to-speech", "transcription": "speech-to-text",
                  "embeddings": "embedding", "chat": "chat"}
_FEATURE_HINTS = {
    "images": "Scene art needs one: an admin sets MASQUE_ENGINE_IMAGES__MODEL (for example "
             "stabilityai/sdxl-turbo) or MASQUE_ENGINE_PRESET=gpu, or points MASQUE_ENGINE_URL at a server "
             "that makes images.",
}


class CallObserver(Protocol):
    """Told of every engine call as it ends (bot/metrics.py): route, seconds, the error when it failed."""

    def engine_call(self, route: str, seconds: float, error: BaseException | None) -> None: ...


@dataclass
class StreamEvent:
    """One piece of a streamed reply: a text delta and/or the engine's `masque` extras."""

    text: str = ""
    extras: dict[str, Any] | None = None


@dataclass
class ChatResult:
    """A whole (non-streamed) reply."""

    text: str
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineModels:
    """The model id sent for each kind of call (defaults: the names our engine serves)."""

    chat: str = "masque-chat"
    image: str = "masque-art"
    embedding: str = "masque-embed"
    transcription: str = "masque-whisper"
    speech: str = "masque-tts"


@dataclass
class _Endpoint:
    base_url: str
    proxy: str | None = None  # from the environment, as the openai client took it (`_env_proxy`)
    unhealthy_until: float = 0.0
    speaks_masque: bool | None = None  # None until a chat response tells us
    can_tokenize: bool | None = None  # None until /tokenize answered or 404'd
    refuses_extras: bool = False  # set when the server refused top_k/min_p/repetition_penalty (OpenAI does)


# Phrases a server uses when a prompt does not fit: ours, vLLM's ("This model's maximum context length
# is ..."), OpenAI's ("context_length_exceeded"), llama.cpp's ("exceeds the available context size").
_LENGTH_PHRASES = ("maximum context length", "context_length_exceeded", "context length", "context size",
                   "too many tokens", "prompt is too long")
# Where a length refusal says how many prompt tokens the server counted (vLLM's current and older
# wordings, ours, llama.cpp's "request (N tokens)").
_PROMPT_COUNT = re.compile(r"has (\d+) input tokens|\((\d+) in the messages|\((\d+) prompt tokens|"
                           r"messages are (\d+) tokens|request \((\d+) tokens\)")


def parse_urls(value: str) -> list[str]:
    """Split a comma-separated MASQUE_ENGINE_URL into clean base URLs."""
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


def server_root(base_url: str) -> str:
    """`http://h:p/v1` -> `http://h:p` (where /health and vLLM's /tokenize live)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def health_url(base_url: str) -> str:
    """`http://h:p/v1` -> `http://h:p/health` (the engine serves /health beside /v1)."""
    return f"{server_root(base_url)}/health"


class EngineClient:
    """Calls an OpenAI-compatible engine: chat (streamed or not), transcription, images, embeddings."""

    def __init__(self, urls: list[str], api_key: str | None = None, *, timeout_s: float = 120.0,
                 connect_timeout_s: float = 5.0, retries: int = 1, unhealthy_s: float = 30.0,
                 models: EngineModels | None = None, image_timeout_s: float | None = None):
        if not urls:
            raise ValueError("EngineClient needs at least one engine URL")
        self._endpoints = [_Endpoint(url, env_proxy(url)) for url in urls]
        self._next = 0
        # `timeout_s` bounds each wait for the next bytes (a stream may run longer), as the openai client's
        # read timeout did; no total.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
        self._image_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                                    sock_read=image_timeout_s or timeout_s)
        self._count_timeout = aiohttp.ClientTimeout(total=COUNT_TIMEOUT_S, sock_connect=connect_timeout_s)
        self._retries = retries
        self._unhealthy_s = unhealthy_s
        self._api_key = api_key
        self._http: aiohttp.ClientSession | None = None  # made in the running loop, on first use
        self.models = models or EngineModels()
        self.observer: CallObserver | None = None

    @classmethod
    def from_settings(cls, settings: Any, url: str | None = None) -> EngineClient:
        """Build from BotSettings; `url` overrides MASQUE_ENGINE_URL (a child engine's URL)."""
        key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
        models = EngineModels(settings.engine_chat_model, settings.engine_image_model,
                              settings.engine_embedding_model, settings.engine_transcription_model,
                              settings.engine_speech_model)
        return cls(parse_urls(url or settings.engine_url), key, timeout_s=settings.engine_timeout_s,
                   connect_timeout_s=settings.engine_connect_timeout_s, retries=settings.engine_retries,
                   unhealthy_s=settings.engine_unhealthy_s, models=models,
                   image_timeout_s=settings.engine_image_timeout_s)

    @property
    def urls(self) -> list[str]:
        return [e.base_url for e in self._endpoints]

    def speaks_masque(self) -> bool:
        """True when a healthy engine has shown our `masque` extras (it transcribes audio parts itself)."""
        return any(e.speaks_masque for e in self._endpoints if e.unhealthy_until <= time.monotonic())

    def counts_tokens(self) -> bool | None:
        """Whether a server counts tokens for us (`/tokenize`); None until one was asked."""
        known = [e.can_tokenize for e in self._endpoints if e.can_tokenize is not None]
        return any(known) if known else None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------ HTTP

    def _session(self) -> aiohttp.ClientSession:
        """The one session every call shares (its connections are kept alive between calls).

        Idle connections stay in the pool until the server closes them (servers time idle ones out
        themselves; aiohttp sees the close and never reuses such a connection): aiohttp's own
        keep-alive expiry arms a timer every time a connection is released, work that kept SimCord's
        simulated clock waiting 15 s at each step of the tests."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._api_key or 'not-needed'}"}, timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=None))
        return self._http

    async def _request(self, endpoint: _Endpoint, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """One try: the 2xx response, its body unread (the caller releases it), or StatusError.

        `path` is under the base URL (`/models`), or a whole URL (`/tokenize` sits beside /v1)."""
        url = path if "://" in path else endpoint.base_url + path
        response = await self._session().request(method, url, proxy=endpoint.proxy, **kwargs)
        if response.status >= 400:
            async with response:
                raise StatusError(response.status, await response.read(), response.headers)
        return response

    async def _read(self, endpoint: _Endpoint, method: str, path: str, **kwargs: Any) -> bytes:
        """The whole body of a 2xx answer, with retries."""
        async def attempt() -> bytes:
            async with await self._request(endpoint, method, path, **kwargs) as response:
                return await response.read()
        return await self._retrying(attempt)

    async def _json(self, endpoint: _Endpoint, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a 2xx answer, with retries (a body that is not JSON raises JSONDecodeError)."""
        return loads(await self._read(endpoint, method, path, **kwargs))

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt`, again up to `retries` times after a connection error, a timeout or an answer
        worth another try (`StatusError.retryable`), waiting as `retry_delay` says in between."""
        tries = 0
        while True:
            try:
                return await attempt()
            except (aiohttp.ClientError, TimeoutError, StatusError) as exc:
                status = exc if isinstance(exc, StatusError) else None
                if tries >= self._retries or (status is not None and not status.retryable):
                    raise
                delay = retry_delay(tries, status.headers if status is not None else {})
                log.debug("engine call failed (%s); retrying in %.2f s", exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                tries += 1

    # ------------------------------------------------------------ failover

    def _rotation(self) -> list[_Endpoint]:
        """Healthy endpoints starting at the next in turn; all of them when none is healthy."""
        start = self._next % len(self._endpoints)
        self._next += 1
        ordered = self._endpoints[start:] + self._endpoints[:start]
        now = time.monotonic()
        healthy = [e for e in ordered if e.unhealthy_until <= now]
        return healthy or ordered

    async def _call(self, what: str, fn: Callable[[_Endpoint], Awaitable[T]], *, observe: bool = True) -> T:
        """Run `fn` on endpoints in turn until one answers; map failures to EngineError types. The observer
        hears of the call (unless `observe` is False: chat_stream times the whole stream itself)."""
        if not observe:
            return await self._call_endpoints(what, fn)
        with self._observed(what):
            return await self._call_endpoints(what, fn)

    @contextlib.contextmanager
    def _observed(self, route: str) -> Iterator[None]:
        """Tell the observer how long the call took and how it failed; a cancelled call or a bug is not told."""
        started, error = time.perf_counter(), None
        try:
            yield
        except EngineError as exc:
            error = exc
            raise
        except (asyncio.CancelledError, Exception):
            started = None
            raise
        finally:
            if started is not None and self.observer is not None:
                self.observer.engine_call(route, time.perf_counter() - started, error)

    async def _call_endpoints(self, what: str, fn: Callable[[_Endpoint], Awaitable[T]]) -> T:
        last: EngineError | None = None
        for endpoint in self._rotation():
            try:
                return await fn(endpoint)
            except (EngineUnavailable, EngineTimeout) as exc:
                self._mark_down(endpoint, exc)
                last = exc
            except (StatusError, aiohttp.ClientError, TimeoutError) as exc:
                mapped = _map_error(what, exc)
                if isinstance(mapped, EngineBadResponse):
                    raise mapped from exc
                self._mark_down(endpoint, mapped)
                last = mapped
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                # The body was not the JSON object the API promises (an HTML error page, a proxy's text).
                raise EngineBadResponse(f"{what}: the engine's answer is not OpenAI-shaped JSON ({exc})") from exc
        assert last is not None
        raise last

    def _mark_down(self, endpoint: _Endpoint, exc: Exception) -> None:
        log.warning("engine %s failed (%s); skipping it for %.0f s", endpoint.base_url, exc, self._unhealthy_s)
        endpoint.unhealthy_until = time.monotonic() + self._unhealthy_s

    # ------------------------------------------------------------ chat

    async def chat_stream(self, messages: list[dict[str, Any]], **params: Any) -> AsyncIterator[StreamEvent]:
        """Stream a reply as StreamEvents. Fails over to another URL only before the first event."""
        with self._observed("chat_stream"):  # the whole stream (a caller closing it early ends it)
            async with contextlib.aclosing(self._chat_stream(messages, params)) as events:
                async for event in events:
                    yield event

    async def _chat_stream(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> AsyncIterator[StreamEvent]:
        opened = await self._call("chat", lambda e: self._open_stream(e, messages, params), observe=False)
        endpoint, response = opened
        shaped = 0  # chunks that look like chat chunks; a stream of none is not OpenAI-shaped
        try:
            async for chunk in _stream_chunks(response):
                shaped += 1 if isinstance(chunk, dict) and isinstance(chunk.get("choices"), list) else 0
                event = _chunk_event(chunk)
                if event.extras is not None:
                    endpoint.speaks_masque = True
                if event.text or event.extras is not None:
                    yield event
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _map_error("chat", exc) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineBadResponse(f"chat: the engine streamed something that is not a chunk ({exc})") from exc
        finally:
            response.release()
        if not shaped:
            raise EngineBadResponse("chat: the engine's stream carried no chat chunks")

    async def _open_stream(self, endpoint: _Endpoint, messages: list[dict[str, Any]],
                           params: dict[str, Any]) -> tuple[_Endpoint, aiohttp.ClientResponse]:
        if endpoint.refuses_extras:
            params = _without_extras(params)
        try:
            return await self._post_stream(endpoint, messages, params)
        except StatusError as exc:
            if exc.status != 400 or endpoint.refuses_extras or not _refused_extras(exc, params):
                raise
            # OpenAI itself answers "Unrecognized request argument supplied: top_k": send only its own
            # samplers to this server from now on.
            log.info("engine %s refuses the sampler extras (%s); sending OpenAI's samplers only",
                     endpoint.base_url, exc.message[:120])
            endpoint.refuses_extras = True
            return await self._post_stream(endpoint, messages, _without_extras(params))

    async def _post_stream(self, endpoint: _Endpoint, messages: list[dict[str, Any]],
                           params: dict[str, Any]) -> tuple[_Endpoint, aiohttp.ClientResponse]:
        body = {"model": self.models.chat, "messages": messages, "stream": True, **params}
        response = await self._retrying(lambda: self._request(endpoint, "POST", "/chat/completions", json=body))
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            response.close()
            raise EngineBadResponse(f"chat: the engine answered {content_type or 'no content type'}, "
                                    "not an event stream")
        return endpoint, response

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """One whole reply (used for scene-art prompts and other short calls)."""
        async def call(endpoint: _Endpoint) -> ChatResult:
            completion = await self._json(endpoint, "POST", "/chat/completions",
                                          json={"model": self.models.chat, "messages": messages, **params})
            extras = completion.get("masque") if isinstance(completion, dict) else None
            if isinstance(extras, dict):
                endpoint.speaks_masque = True
            text = _field(_first(completion, "choices"), "message", "content", kind=str) or ""
            return ChatResult(text, extras if isinstance(extras, dict) else {})
        return await self._call("chat", call)

    # ------------------------------------------------------------ context window and token counts

    async def context_window(self) -> int | None:
        """The chat model's context window as the server reports it (`max_model_len` in /v1/models,
        as vLLM and our engine do; `context_length`/`context_window` as some others do); None when
        no server says."""
        async def call(endpoint: _Endpoint) -> int | None:
            listing = await self._json(endpoint, "GET", "/models")
            models = listing.get("data") if isinstance(listing, dict) else None
            if not isinstance(models, list):
                return None
            ours = [m for m in models if isinstance(m, dict) and m.get("id") == self.models.chat]
            for model in ours or [m for m in models if isinstance(m, dict)]:
                for key in ("max_model_len", "context_length", "context_window"):
                    value = model.get(key)
                    if isinstance(value, int) and value > 0:
                        return value
            return None
        try:
            return await self._call("models", call)
        except EngineError:
            return None  # a server without /v1/models (or an odd one): the caller uses its setting

    async def makes_images(self) -> bool | None:
        """Whether the server serves the image model: our engine lists every loaded role in /v1/models
        (each with a `masque` role tag), so a missing one is off; None for servers that do not say."""
        async def call(endpoint: _Endpoint) -> bool | None:
            listing = await self._json(endpoint, "GET", "/models")
            models = listing.get("data") if isinstance(listing, dict) else None
            models = [m for m in models or [] if isinstance(m, dict)]
            if not any(isinstance(m.get("masque"), dict) for m in models):
                return None
            return any(m.get("id") == self.models.image for m in models)
        try:
            return await self._call("models", call)
        except EngineError:
            return None

    async def count_tokens(self, messages: list[dict[str, Any]]) -> int | None:
        """The prompt tokens `messages` make on the server, by vLLM's `POST /tokenize` (our engine
        serves it too); None when no server has it."""
        async def call(endpoint: _Endpoint) -> int | None:
            if endpoint.can_tokenize is False:
                return None
            try:
                answer = await self._json(
                    endpoint, "POST", f"{server_root(endpoint.base_url)}/tokenize", timeout=self._count_timeout,
                    json={"model": self.models.chat, "messages": messages, "add_generation_prompt": True})
            except StatusError as exc:
                if exc.status == 404:
                    endpoint.can_tokenize = False
                    return None
                if exc.status in (400, 422):
                    return None  # e.g. content parts this server cannot tokenize: estimate instead
                raise
            count = answer.get("count") if isinstance(answer, dict) else None
            endpoint.can_tokenize = isinstance(count, int)
            return count if isinstance(count, int) else None
        try:
            return await self._call("tokenize", call)
        except EngineError:
            return None  # the chat call that follows reports a down or broken engine properly

    # ------------------------------------------------------------ media

    async def transcribe(self, data: bytes, filename: str, content_type: str = "") -> str:
        """Speech to text through /v1/audio/transcriptions."""
        def form() -> aiohttp.FormData:  # a new one each try: older aiohttp sends a FormData only once
            fields = aiohttp.FormData()
            fields.add_field("model", self.models.transcription)
            fields.add_field("file", data, filename=filename, content_type=content_type or None)
            return fields

        async def call(endpoint: _Endpoint) -> str:
            async def attempt() -> bytes:
                async with await self._request(endpoint, "POST", "/audio/transcriptions", data=form()) as response:
                    return await response.read()
            result = loads(await self._retrying(attempt))
            text = result.get("text") if isinstance(result, dict) else None
            if not isinstance(text, str):
                raise EngineBadResponse("the transcription has no text")
            return text.strip()
        return await self._call("transcription", call)

    async def speech(self, text: str, *, voice: str = "", response_format: str = "wav",
                     speed: float = 1.0) -> bytes:
        """Text to speech through /v1/audio/speech; an empty `voice` asks for the server's default."""
        body = {"model": self.models.speech, "input": text, "voice": voice or DEFAULT_SPEECH_VOICE,
                "response_format": response_format, "speed": speed}

        async def call(endpoint: _Endpoint) -> bytes:
            data = await self._read(endpoint, "POST", "/audio/speech", json=body)
            if not data:
                raise EngineBadResponse("the speech response is empty")
            return data
        return await self._call("speech", call)

    async def voices(self) -> list[str]:
        """Voice ids from GET /v1/audio/voices (our engine's listing); [] where a server has none."""
        async def call(endpoint: _Endpoint) -> list[str]:
            listing = await self._json(endpoint, "GET", "/audio/voices")
            items = listing.get("data") if isinstance(listing, dict) else None
            return [str(v["id"]) for v in items or [] if isinstance(v, dict) and v.get("id")]
        try:
            return await self._call("voices", call)
        except EngineError:
            return []

    async def generate_image(self, prompt: str, *, negative_prompt: str = "", seed: int | None = None,
                             size: str = "", safe: bool = True, steps: int | None = None) -> bytes:
        """One image (PNG bytes) through /v1/images/generations; `safe` is the engine's safety switch.

        An empty `size` leaves the size to the engine's default.
        """
        body: dict[str, Any] = {"model": self.models.image, "prompt": prompt, "n": 1,
                                "response_format": "b64_json", "safe": safe}
        if size:
            body["size"] = size
        if negative_prompt:
            body["negative_prompt"] = negative_prompt
        if seed is not None:
            body["seed"] = seed
        if steps is not None:
            body["steps"] = steps

        async def call(endpoint: _Endpoint) -> bytes:
            result = await self._json(endpoint, "POST", "/images/generations", json=body,
                                      timeout=self._image_timeout)
            data = _field(_first(result, "data"), "b64_json", kind=str)
            if not data:
                raise EngineBadResponse("the image response has no b64_json data")
            try:
                return base64.b64decode(data, validate=True)
            except ValueError as exc:
                raise EngineBadResponse("the image is not valid base64") from exc
        return await self._call("images", call)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Embeddings through /v1/embeddings, in the order of `texts`."""
        body = {"model": self.models.embedding, "input": texts, "encoding_format": "float"}

        async def call(endpoint: _Endpoint) -> list[list[float]]:
            result = await self._json(endpoint, "POST", "/embeddings", json=body)
            items = result.get("data") if isinstance(result, dict) else None
            if not isinstance(items, list):
                raise EngineBadResponse("the embeddings response has no data list")
            ordered = sorted(items, key=lambda d: _field(d, "index", kind=int) or 0)
            vectors = [_field(d, "embedding", kind=list) for d in ordered]
            if len(vectors) != len(texts) or not all(isinstance(v, list) and v for v in vectors):
                raise EngineBadResponse("the embeddings response does not match the input")
            return vectors
        return await self._call("embeddings", call)

    # ------------------------------------------------------------ health

    async def health(self) -> dict[str, bool]:
        """Ask each URL's /health; True where it answered 200."""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        out: dict[str, bool] = {}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            for endpoint in self._endpoints:
                out[endpoint.base_url] = (await probe_health(session, endpoint.base_url)).ready
                if out[endpoint.base_url]:
                    endpoint.unhealthy_until = 0.0
        return out


@dataclass(frozen=True)
class Health:
    """What a server's /health said: ready (a 200), and from our engine which models load or failed."""

    ready: bool
    loading: list[str] = field(default_factory=list)  # "the chat model (its name)"
    failed: dict[str, str] = field(default_factory=dict)  # role -> why it did not load


async def probe_health(session: aiohttp.ClientSession, base_url: str) -> Health:
    """GET the /health beside `base_url`. Any 200 is ready (vLLM answers one with an empty body); our
    engine's JSON also names each role's state. Unreachable or unreadable: not ready."""
    try:
        async with session.get(health_url(base_url)) as response:
            ready, text = response.status == 200, await response.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return Health(False)
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    roles = body.get("roles") if isinstance(body, dict) else None
    states = {role: entry for role, entry in (roles or {}).items() if isinstance(entry, dict)}
    loading = [f"the {role} model ({entry.get('model', '?')})" for role, entry in states.items()
               if entry.get("state") == "loading"]
    failed = {role: str(entry.get("error") or "no reason given") for role, entry in states.items()
              if entry.get("state") == "failed"}
    return Health(ready, loading, failed)


async def _stream_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """The JSON chunks of a chat stream until `data: [DONE]` or the end of the body. An `{"error": ...}`
    chunk (vLLM sends one when generation fails mid-stream) is EngineBadResponse, as the openai client
    made it."""
    parser = SSEParser()
    async for piece in response.content.iter_any():
        for data in parser.feed(piece):
            if data.startswith("[DONE]"):
                # The body's end follows at once: read it, so that the connection is kept for the next call
                # (one released mid-body is closed).
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    async with asyncio.timeout(DONE_DRAIN_S):
                        await response.content.read()
                return
            chunk = loads(data)
            if isinstance(chunk, dict) and chunk.get("error"):
                message, _ = error_fields(chunk)
                raise EngineBadResponse(f"chat: the engine failed mid-stream: {message or 'no reason given'}")
            yield chunk


def _chunk_event(chunk: Any) -> StreamEvent:
    """The text and masque extras of one streamed chunk (plain JSON); anything else carries neither."""
    if not isinstance(chunk, dict):
        return StreamEvent("", None)
    extras = chunk.get("masque")
    choices = chunk.get("choices")
    delta = choices[0].get("delta") if isinstance(choices, list) and choices and isinstance(choices[0], dict) \
        else None
    text = delta.get("content") if isinstance(delta, dict) else None
    if text is not None and not isinstance(text, str):
        raise EngineBadResponse("the engine's delta.content is not a str")
    return StreamEvent(text or "", extras if isinstance(extras, dict) else None)


def _map_error(what: str, exc: Exception) -> EngineError:
    """Translate a transport error or a 4xx/5xx into ours (the message never includes the API key)."""
    if isinstance(exc, TimeoutError):  # before ClientError: aiohttp's timeouts are both
        return EngineTimeout(f"{what}: the engine timed out")
    if isinstance(exc, aiohttp.ClientError):
        return EngineUnavailable(f"{what}: cannot connect to the engine ({exc.__class__.__name__})")
    if not isinstance(exc, StatusError):
        return EngineBadResponse(f"{what}: unusable engine response ({exc.__class__.__name__}: {exc})")
    status = exc.status
    if status == 503 and exc.code == "role_disabled":  # up, but not for this
        return EngineFeatureOff(f"{what}: {_short(exc)}", what)
    if status >= 500 or status == 429:
        busy = status in (429, 503)
        return _kinded(EngineUnavailable(f"{what}: the engine answered {status}: {_short(exc)}"),
                       "overloaded" if busy else "server_error")
    message = f"{what}: the engine refused the request ({status}): {_short(exc)}"
    if status in (400, 413, 422) and _is_length_error(exc):
        found = _PROMPT_COUNT.search(exc.message)
        count = next((int(g) for g in found.groups() if g), None) if found else None
        return EngineContextLength(message, count)
    return _kinded(EngineBadResponse(message), "refused")


def _kinded(error: EngineError, kind: str) -> EngineError:
    error.kind = kind
    return error


def _without_extras(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in EXTRA_PARAMS}


def _refused_extras(exc: StatusError, params: dict[str, Any]) -> bool:
    """True when a 400 names one of the sampler extras we sent."""
    text = f"{exc.message} {exc.text}".lower()
    return any(name in params and name in text for name in EXTRA_PARAMS)


def _is_length_error(exc: StatusError) -> bool:
    text = f"{exc.message} {exc.code}".lower()
    return any(phrase in text for phrase in _LENGTH_PHRASES)


def _short(exc: StatusError, limit: int = 300) -> str:
    return exc.message[:limit]


def _first(obj: Any, name: str) -> Any:
    """`obj[name][0]`, or EngineBadResponse when that is not a non-empty list."""
    items = obj.get(name) if isinstance(obj, dict) else None
    if not isinstance(items, list) or not items:
        raise EngineBadResponse(f"the engine's answer has no {name!r} list")
    return items[0]


def _field(obj: Any, *path: str, kind: type) -> Any:
    """Follow keys `path` from `obj`; the end must be `kind` or None, else EngineBadResponse."""
    for name in path:
        obj = obj.get(name) if isinstance(obj, dict) else None
    if obj is not None and not isinstance(obj, kind):
        raise EngineBadResponse(f"the engine's {'.'.join(path)} is not a {kind.__name__}")
    return obj
