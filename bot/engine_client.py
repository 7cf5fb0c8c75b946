"""The only place the bot calls a model: any OpenAI-compatible engine over HTTP.

Uses the official `openai` AsyncOpenAI client, one per base URL. Several URLs
are used in turn (round robin); one that fails to connect, times out or
answers 5xx/429 is skipped for `engine_unhealthy_s` seconds and the call moves
on to the next. Failures surface as three exception types the callers show to
users: EngineUnavailable, EngineTimeout, EngineBadResponse.

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
import openai

from bot.story.generation import EXTRA_PARAMS

log = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_TIMEOUT_S = 5.0
# The voice asked for when a persona has none: OpenAI's first voice name, which our engine speaks with its
# default voice and most OpenAI-compatible speech servers accept.
DEFAULT_SPEECH_VOICE = "alloy"
COUNT_TIMEOUT_S = 10.0  # counting tokens is quick; a server that stalls on it is estimated instead


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
    client: openai.AsyncOpenAI
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
        timeout = openai.Timeout(timeout_s, connect=connect_timeout_s)
        self._endpoints = [
            _Endpoint(url, openai.AsyncOpenAI(base_url=url, api_key=api_key or "not-needed",
                                              timeout=timeout, max_retries=retries))
            for url in urls
        ]
        self._next = 0
        self._image_timeout = openai.Timeout(image_timeout_s or timeout_s, connect=connect_timeout_s)
        self._unhealthy_s = unhealthy_s
        self._api_key = api_key
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
        for endpoint in self._endpoints:
            await endpoint.client.close()

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
            except openai.OpenAIError as exc:
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
        endpoint, stream = opened
        shaped = 0  # chunks that look like chat chunks; a stream of none is not OpenAI-shaped
        try:
            async for chunk in stream:
                shaped += 1 if isinstance(chunk, dict) and isinstance(chunk.get("choices"), list) else 0
                event = _chunk_event(chunk)
                if event.extras is not None:
                    endpoint.speaks_masque = True
                if event.text or event.extras is not None:
                    yield event
        except openai.OpenAIError as exc:
            raise _map_error("chat", exc) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineBadResponse(f"chat: the engine streamed something that is not a chunk ({exc})") from exc
        finally:
            await stream.close()
        if not shaped:
            raise EngineBadResponse("chat: the engine's stream carried no chat chunks")

    async def _open_stream(self, endpoint: _Endpoint, messages: list[dict[str, Any]], params: dict[str, Any]):
        if endpoint.refuses_extras:
            params = _without_extras(params)
        try:
            return await self._post_stream(endpoint, messages, params)
        except openai.BadRequestError as exc:
            if endpoint.refuses_extras or not _refused_extras(exc, params):
                raise
            # OpenAI itself answers "Unrecognized request argument supplied: top_k": send only its own
            # samplers to this server from now on.
            log.info("engine %s refuses the sampler extras (%s); sending OpenAI's samplers only",
                     endpoint.base_url, _short(exc, 120))
            endpoint.refuses_extras = True
            return await self._post_stream(endpoint, messages, _without_extras(params))

    async def _post_stream(self, endpoint: _Endpoint, messages: list[dict[str, Any]], params: dict[str, Any]):
        # The low-level call with plain JSON both ways: the typed `chat.completions.create` walks
        # every message through its TypedDict transform and builds a pydantic model per chunk,
        # which cost more of the bot's CPU per reply than everything else it does. The client's
        # retries, timeouts and error types are the same.
        stream = await endpoint.client.post(
            "/chat/completions", body={"model": self.models.chat, "messages": messages, "stream": True, **params},
            cast_to=object, stream=True, stream_cls=openai.AsyncStream[object])
        content_type = stream.response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            await stream.close()
            raise EngineBadResponse(f"chat: the engine answered {content_type or 'no content type'}, "
                                    "not an event stream")
        return endpoint, stream

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """One whole reply (used for scene-art prompts and other short calls)."""
        async def call(endpoint: _Endpoint) -> ChatResult:
            completion = await endpoint.client.chat.completions.create(
                model=self.models.chat, messages=messages, **params)
            extras = (completion.model_extra or {}).get("masque")
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
            listing = await endpoint.client.get("/models", cast_to=object)
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
            listing = await endpoint.client.get("/models", cast_to=object)
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
                answer = await endpoint.client.post(
                    f"{server_root(endpoint.base_url)}/tokenize", cast_to=object,
                    body={"model": self.models.chat, "messages": messages, "add_generation_prompt": True},
                    options={"timeout": COUNT_TIMEOUT_S})
            except openai.NotFoundError:
                endpoint.can_tokenize = False
                return None
            except (openai.BadRequestError, openai.UnprocessableEntityError):
                return None  # e.g. content parts this server cannot tokenize: estimate instead
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
        async def call(endpoint: _Endpoint) -> str:
            result = await endpoint.client.audio.transcriptions.create(
                model=self.models.transcription, file=(filename, data, content_type or None))
            text = getattr(result, "text", None)
            if not isinstance(text, str):
                raise EngineBadResponse("the transcription has no text")
            return text.strip()
        return await self._call("transcription", call)

    async def speech(self, text: str, *, voice: str = "", response_format: str = "wav",
                     speed: float = 1.0) -> bytes:
        """Text to speech through /v1/audio/speech; an empty `voice` asks for the server's default."""
        async def call(endpoint: _Endpoint) -> bytes:
            result = await endpoint.client.audio.speech.create(
                model=self.models.speech, input=text, voice=voice or DEFAULT_SPEECH_VOICE,
                response_format=response_format, speed=speed)
            data = result.content
            if not data:
                raise EngineBadResponse("the speech response is empty")
            return data
        return await self._call("speech", call)

    async def voices(self) -> list[str]:
        """Voice ids from GET /v1/audio/voices (our engine's listing); [] where a server has none."""
        async def call(endpoint: _Endpoint) -> list[str]:
            listing = await endpoint.client.get("/audio/voices", cast_to=object)
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
        extra: dict[str, Any] = {"safe": safe}
        if size:
            extra["size"] = size
        if negative_prompt:
            extra["negative_prompt"] = negative_prompt
        if seed is not None:
            extra["seed"] = seed
        if steps is not None:
            extra["steps"] = steps

        async def call(endpoint: _Endpoint) -> bytes:
            result = await endpoint.client.images.generate(
                model=self.models.image, prompt=prompt, n=1, response_format="b64_json", extra_body=extra,
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
        async def call(endpoint: _Endpoint) -> list[list[float]]:
            result = await endpoint.client.embeddings.create(
                model=self.models.embedding, input=texts, encoding_format="float")
            items = getattr(result, "data", None)
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


def _map_error(what: str, exc: openai.OpenAIError) -> EngineError:
    """Translate an openai error into ours (the message never includes the API key)."""
    if isinstance(exc, openai.APITimeoutError):
        return EngineTimeout(f"{what}: the engine timed out")
    if isinstance(exc, openai.APIConnectionError):
        return EngineUnavailable(f"{what}: cannot connect to the engine ({exc.__class__.__name__})")
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 503 and _error_code(exc) == "role_disabled":  # up, but not for this
            return EngineFeatureOff(f"{what}: {_short(exc)}", what)
        if exc.status_code >= 500 or exc.status_code == 429:
            busy = exc.status_code in (429, 503)
            return _kinded(EngineUnavailable(f"{what}: the engine answered {exc.status_code}: {_short(exc)}"),
                           "overloaded" if busy else "server_error")
        message = f"{what}: the engine refused the request ({exc.status_code}): {_short(exc)}"
        if exc.status_code in (400, 413, 422) and _is_length_error(exc):
            found = _PROMPT_COUNT.search(str(exc.message))
            count = next((int(g) for g in found.groups() if g), None) if found else None
            return EngineContextLength(message, count)
        return _kinded(EngineBadResponse(message), "refused")
    return EngineBadResponse(f"{what}: unusable engine response ({exc.__class__.__name__}: {exc})")


def _kinded(error: EngineError, kind: str) -> EngineError:
    error.kind = kind
    return error


def _without_extras(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in EXTRA_PARAMS}


def _refused_extras(exc: openai.APIStatusError, params: dict[str, Any]) -> bool:
    """True when a 400 names one of the sampler extras we sent."""
    text = f"{exc.message} {exc.body}".lower()
    return any(name in params and name in text for name in EXTRA_PARAMS)


def _error_code(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("code") or getattr(exc, "code", "") or "")


def _is_length_error(exc: openai.APIStatusError) -> bool:
    text = f"{exc.message} {_error_code(exc)}".lower()
    return any(phrase in text for phrase in _LENGTH_PHRASES)


def _short(exc: openai.APIStatusError, limit: int = 300) -> str:
    return str(exc.message)[:limit]


def _first(obj: Any, name: str) -> Any:
    """`obj.<name>[0]`, or EngineBadResponse when that is not a non-empty list."""
    items = getattr(obj, name, None)
    if not isinstance(items, list) or not items:
        raise EngineBadResponse(f"the engine's answer has no {name!r} list")
    return items[0]


def _field(obj: Any, *path: str, kind: type) -> Any:
    """Follow attribute `path` from `obj`; the end must be `kind` or None, else EngineBadResponse."""
    for name in path:
        obj = getattr(obj, name, None)
    if obj is not None and not isinstance(obj, kind):
        raise EngineBadResponse(f"the engine's {'.'.join(path)} is not a {kind.__name__}")
    return obj
