"""POST /v1/chat/completions: OpenAI chat, streaming or not, on either fusion path."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp_sse import sse_response
from jinja2 import TemplateError

from engine.batching import Delta, SequenceHandle
from engine.errors import APIError, invalid_request, not_found, read_json
from engine.fusion import compose, native_messages, native_report, parse_media
from engine.protocol.chat import (
    ChatCompletionRequest,
    ChatMessage,
    SamplingRequest,
    chunk_body,
    chunk_choice,
    completion_body,
    new_completion_id,
    usage_body,
)
from engine.routes import METRICS, REGISTRY, SETTINGS
from engine.sampling import SamplingParams
from engine.settings import ChatSettings

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults
DEFAULT_TOP_P = 1.0
SSE_PING_SECONDS = 15


class Job:
    """One accepted request (a chat, or text completions): its prompt size, the running
    sequences and the masque report."""

    def __init__(self, served: str, prompt_tokens: int, masque: dict[str, Any],
                 id_prefix: str = "chatcmpl") -> None:
        self.id = new_completion_id(id_prefix)
        self.served = served
        self.prompt_tokens = prompt_tokens
        self.masque = masque
        self.handles: list[SequenceHandle] = []
        self.started = time.perf_counter()

    def cancel(self) -> None:
        """Stop every sequence (client gone, or the request failed)."""
        for handle in self.handles:
            handle.cancel()


def check_model(name: str, role: ChatSettings) -> None:
    """404 unless ``name`` is the served name (or the configured model reference)."""
    if name not in {role.served_name, role.model}:
        raise not_found(
            f"The model {name!r} does not exist; this server serves {role.served_name!r}.",
            "model", "model_not_found",
        )


def token_budget(
    asked: int | None, default: int, role: ChatSettings, prompt: int, ctx: int,
    param: str = "messages",
) -> int:
    """The completion's max_tokens (``default`` when the client asked for none, shortened to
    fit), or a 400 when the prompt (``param``) or the ask does not fit.

    Both messages say "maximum context length", as vLLM's and OpenAI's do, so a client that
    recognises their wording (or the ``context_length_exceeded`` code) recognises ours.
    """
    room = ctx - prompt
    if room <= 0:
        verb = "are" if param == "messages" else "is"
        raise invalid_request(
            f"The {param} {verb} {prompt} tokens; this model's maximum context length is "
            f"{ctx} tokens.",
            param, "context_length_exceeded",
        )
    if asked is None:
        return min(default, room)
    if asked > role.max_new_tokens or asked > room:
        raise invalid_request(
            f"max_tokens is {asked}, but at most {min(role.max_new_tokens, room)} fit "
            f"({prompt} prompt tokens, maximum context length {ctx}, "
            f"limit {role.max_new_tokens}).",
            "max_tokens", "context_length_exceeded",
        )
    return asked


def _given(value: Any, default: Any) -> Any:
    """``value`` unless the client left it out or sent null."""
    return default if value is None else value


def sampling(body: SamplingRequest, max_tokens: int, choice: int) -> SamplingParams:
    """Sampling settings of choice ``choice`` (seeds differ per choice, so n>1 differs).

    A sampler the request does not name gets its neutral value (SamplingParams' default).
    """
    neutral = SamplingParams(max_tokens)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_given(body.temperature, DEFAULT_TEMPERATURE),
        top_p=_given(body.top_p, DEFAULT_TOP_P),
        top_k=max(_given(body.top_k, neutral.top_k), 0),  # vLLM's -1 means off, as 0 does
        min_p=_given(body.min_p, neutral.min_p),
        repetition_penalty=_given(body.repetition_penalty, neutral.repetition_penalty),
        frequency_penalty=_given(body.frequency_penalty, neutral.frequency_penalty),
        presence_penalty=_given(body.presence_penalty, neutral.presence_penalty),
        stop=body.stop_strings(),
        seed=None if body.seed is None else body.seed + choice,
    )


@dataclass
class FusedChat:
    """The messages as the chat template will see them, the media for the model's own encoders
    (native fusion only) and the masque report."""

    messages: list[dict[str, Any]]
    images: list[Any]
    audios: list[Any]
    masque: dict[str, Any]


async def fuse(request: web.Request, backend: Any, messages: list[ChatMessage]) -> FusedChat:
    """Check and decode the media, then fuse them the backend's way (see engine.fusion)."""
    registry, settings = request.app[REGISTRY], request.app[SETTINGS]
    parsed = await parse_media(messages, settings.limits)
    if backend.fusion == "native":
        return FusedChat(
            native_messages(parsed), [item.value for item in parsed.images],
            [item.value for item in parsed.audios], native_report(),
        )
    composed, masque = await compose(parsed, registry)
    return FusedChat(composed, [], [], masque)


async def prepare_prompt(backend: Any, fused: FusedChat) -> Any:
    """The backend's prompt for the fused chat (``len()`` is its token count)."""
    try:
        return await asyncio.to_thread(backend.prepare, fused.messages, fused.images, fused.audios)
    except TemplateError as exc:  # e.g. a template that insists on alternating roles
        raise invalid_request(
            f"The model's chat template refused these messages: {exc}", "messages",
            "invalid_messages",
        ) from None


def check_request(body: SamplingRequest, role: ChatSettings) -> None:
    """The checks every generating request passes first: a served model, an allowed n."""
    check_model(body.model, role)
    if body.n > role.max_n:
        raise invalid_request(f"n is {body.n}; this server allows at most {role.max_n}.", "n")


def launch(request: web.Request, backend: Any, job: Job,
           runs: list[tuple[Any, SamplingParams]]) -> Job:
    """Submit one sequence per ``(prompt, params)``; all or none (a full queue stops the rest)."""
    try:
        for prompt, params in runs:
            job.handles.append(backend.submit(prompt, params))
    except APIError:
        job.cancel()
        raise
    request.app[METRICS].prompt_tokens.labels("chat").inc(job.prompt_tokens)
    return job


async def start_job(request: web.Request, body: ChatCompletionRequest) -> Job:
    """Validate, fuse the media, tokenize and start the sequences."""
    registry, settings = request.app[REGISTRY], request.app[SETTINGS]
    role = settings.chat
    check_request(body, role)
    backend = registry.get("chat")
    fused = await fuse(request, backend, body.messages)
    prompt = await prepare_prompt(backend, fused)
    max_tokens = token_budget(body.requested_max_tokens(), role.default_max_tokens, role,
                              len(prompt), backend.context_tokens)
    job = Job(role.served_name, len(prompt), fused.masque)
    runs = [(prompt, sampling(body, max_tokens, choice)) for choice in range(body.n)]
    return launch(request, backend, job, runs)


def _failed(delta: Delta) -> APIError:
    message = f"Generation failed: {delta.error}"
    return APIError(500, message, "server_error", None, "generation_error")


async def collect(job: Job, index: int, handle: SequenceHandle, metrics: Any) -> Delta:
    """Read one sequence to its end; the returned delta holds the whole text."""
    pieces: list[str] = []
    last = Delta("", 0, "stop")
    async for delta in handle:
        if not pieces and index == 0:
            metrics.ttft.labels("chat").observe(time.perf_counter() - job.started)
        pieces.append(delta.text)
        last = delta
    if last.finish_reason == "error":
        raise _failed(last)
    return Delta("".join(pieces), last.tokens, last.finish_reason or "stop")


async def collect_all(request: web.Request, job: Job) -> list[Delta]:
    """Every sequence's whole text, in the job's order."""
    metrics = request.app[METRICS]
    try:
        return list(await asyncio.gather(
            *(collect(job, i, h, metrics) for i, h in enumerate(job.handles))
        ))
    finally:
        job.cancel()  # no-op for finished sequences; stops the rest if the client left


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Create a chat completion (OpenAI API), streamed as SSE when ``stream`` is true."""
    body = ChatCompletionRequest.model_validate(await read_json(request))
    job = await start_job(request, body)
    if body.stream:
        return await stream_job(request, job, ChatChunks(job), body.include_usage())
    results = await collect_all(request, job)
    choices = [(result.text, result.finish_reason) for result in results]
    usage = usage_body(job.prompt_tokens, sum(result.tokens for result in results))
    return web.json_response(completion_body(job.id, job.served, choices, usage, job.masque))


class Chunks(Protocol):
    """How one route spells the chunks of its stream."""

    def opening(self) -> list[dict[str, Any]]:
        """Chunks sent before any text."""

    def text(self, index: int, text: str) -> dict[str, Any]:
        """A chunk carrying new text of choice ``index``."""

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        """The chunk that ends choice ``index``."""

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        """The closing usage chunk (``stream_options.include_usage``)."""


class ChatChunks:
    """``chat.completion.chunk`` objects: a role delta first, then content deltas."""

    def __init__(self, job: Job) -> None:
        self.job, self.created = job, int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return chunk_body(self.job.id, self.job.served, self.created, choices, **extra)

    def opening(self) -> list[dict[str, Any]]:
        role_delta = {"role": "assistant", "content": ""}
        choices = [chunk_choice(i, role_delta) for i in range(len(self.job.handles))]
        return [self._chunk(choices, masque=self.job.masque)]

    def text(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk([chunk_choice(index, {"content": text})])

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk([chunk_choice(index, {}, reason)])

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._chunk([], usage=usage, masque=self.job.masque)


async def _pump(index: int, handle: SequenceHandle, out: asyncio.Queue) -> None:
    async for delta in handle:
        await out.put((index, delta))


async def stream_job(
    request: web.Request, job: Job, chunks: Chunks, include_usage: bool
) -> web.StreamResponse:
    """Send the job's deltas as SSE chunks spelled by ``chunks``, then ``data: [DONE]``.

    A client that hangs up stops every sequence of the job.
    """
    metrics = request.app[METRICS]
    merged: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(i, h, merged)) for i, h in enumerate(job.handles)]
    tokens = [0] * len(job.handles)
    sse: web.StreamResponse = web.StreamResponse()  # replaced once the stream opens
    try:
        async with sse_response(
            request, sep="\n", ping_interval=SSE_PING_SECONDS, allow_all_methods=True
        ) as sse:

            async def send(payload: dict[str, Any]) -> None:
                await sse.send(json.dumps(payload, ensure_ascii=False))

            for chunk in chunks.opening():
                await send(chunk)
            first, open_choices = True, len(job.handles)
            while open_choices:
                index, delta = await merged.get()
                if first and delta.text:
                    metrics.ttft.labels("chat").observe(time.perf_counter() - job.started)
                    first = False
                tokens[index] = delta.tokens
                if delta.finish_reason == "error":
                    await send(_failed(delta).body())
                    break
                if delta.text:
                    await send(chunks.text(index, delta.text))
                if delta.finish_reason is not None:
                    open_choices -= 1
                    await send(chunks.finish(index, delta.finish_reason))
            if include_usage:
                await send(chunks.usage(usage_body(job.prompt_tokens, sum(tokens))))
            await sse.send("[DONE]")
    except ConnectionResetError:  # the client hung up between two chunks
        log.info("Client left during a stream; stopping generation of %s", job.id)
    except asyncio.CancelledError:  # the client hung up and aiohttp cancelled this handler
        log.info("Client left during a stream; stopping generation of %s", job.id)
        raise
    finally:
        job.cancel()
        for pump in pumps:
            pump.cancel()
    return sse
