"""POST /v1/completions: OpenAI's text completions, as vLLM and llama.cpp's server answer them
(SillyTavern's Text Completion mode speaks this).

The prompt is raw text: no chat template, the tokenizer's special tokens added (vLLM's
``add_special_tokens=True``). Everything after the prompt is the chat route's: the same model
and ``n`` checks, samplers, token budget, queue (503 when full), SSE stream with pings, and
cancellation when the client hangs up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.errors import invalid_request, read_json
from engine.protocol.chat import usage_body
from engine.protocol.completions import CompletionRequest, text_choice, text_completion_body
from engine.routes import REGISTRY, SETTINGS
from engine.routes.chat import (
    Job,
    check_request,
    collect_all,
    launch,
    sampling,
    stream_job,
    token_budget,
)
from engine.routes.tokenize import text_ids

routes = web.RouteTableDef()

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for this endpoint


@dataclass
class TextPrompt:
    """One prompt as the backend takes it (``len()`` is its token count) and as text (for echo)."""

    prepared: Any
    text: str


def encode(backend: Any, prompt: str | list[int]) -> TextPrompt:
    """Tokenize one prompt, or check its token ids.

    A backend with its own ``prepare_text`` (the omni model's processor) prepares text itself;
    it takes no token ids.
    """
    prepare_text = getattr(backend, "prepare_text", None)
    if isinstance(prompt, str):
        if prepare_text is not None:
            return TextPrompt(prepare_text(prompt), prompt)
        return TextPrompt(text_ids(backend.tokenizer, prompt, add_special_tokens=True), prompt)
    if prepare_text is not None:
        raise invalid_request("This model takes prompts as text, not token ids.", "prompt")
    if max(prompt) >= len(backend.tokenizer):
        raise invalid_request(
            f"Token id {max(prompt)} is past this model's vocabulary ({len(backend.tokenizer)}).",
            "prompt", "invalid_value",
        )
    return TextPrompt(list(prompt), backend.tokenizer.decode(prompt))


def budgets(body: CompletionRequest, role: Any, prompts: list[TextPrompt], ctx: int) -> list[int]:
    """Each prompt's max_tokens; a 400 for an empty prompt or one that does not fit."""
    sizes = [len(prompt.prepared) for prompt in prompts]
    if 0 in sizes:
        raise invalid_request("The prompt is empty.", "prompt", "invalid_value")
    return [token_budget(body.max_tokens, DEFAULT_MAX_TOKENS, role, size, ctx, "prompt")
            for size in sizes]


async def start_completion(request: web.Request, body: CompletionRequest) -> tuple[Job, list[str]]:
    """Validate, tokenize and start ``n`` sequences per prompt (numbered prompt-major, as
    OpenAI's choices are). Returns the job and each choice's echo text ("" without ``echo``)."""
    role = request.app[SETTINGS].chat
    check_request(body, role)
    backend = request.app[REGISTRY].get("chat")
    prompts = await asyncio.to_thread(lambda: [encode(backend, p) for p in body.prompts()])
    limits = budgets(body, role, prompts, backend.context_tokens)
    job = Job(role.served_name, sum(len(p.prepared) for p in prompts), {}, id_prefix="cmpl")
    runs = [(prompt.prepared, sampling(body, limit, choice))
            for prompt, limit in zip(prompts, limits, strict=True) for choice in range(body.n)]
    echoes = [prompt.text if body.echo else "" for prompt in prompts for _ in range(body.n)]
    return launch(request, backend, job, runs), echoes


class TextChunks:
    """``text_completion`` chunks: the echoed prompt first (with ``echo``), then text."""

    def __init__(self, job: Job, echoes: list[str]) -> None:
        self.job, self.echoes, self.created = job, echoes, int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return text_completion_body(self.job.id, self.job.served, self.created, choices, **extra)

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk([text_choice(i, echo, None)])
                for i, echo in enumerate(self.echoes) if echo]

    def text(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk([text_choice(index, text, None)])

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk([text_choice(index, "", reason)])

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._chunk([], usage=usage)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    """Complete raw text prompts (OpenAI API), streamed as SSE when ``stream`` is true."""
    body = CompletionRequest.model_validate(await read_json(request))
    job, echoes = await start_completion(request, body)
    if body.stream:
        return await stream_job(request, job, TextChunks(job, echoes), body.include_usage())
    results = await collect_all(request, job)
    choices = [text_choice(i, echo + result.text, result.finish_reason)
               for i, (echo, result) in enumerate(zip(echoes, results, strict=True))]
    usage = usage_body(job.prompt_tokens, sum(result.tokens for result in results))
    created = int(time.time())
    return web.json_response(
        text_completion_body(job.id, job.served, created, choices, usage=usage)
    )
