"""POST /tokenize and /detokenize: vLLM's token-counting endpoints, at the server root.

vLLM serves them beside /v1, not under it (vllm/entrypoints/serve/tokenize/api_router.py), so
we do the same. A chat (``messages``) goes through exactly the chat route's path: the same media
checks and fusion, the same ``backend.prepare`` and chat template, so with the default flags its
``count`` is the ``usage.prompt_tokens`` a chat completion of the same messages reports.

Image and audio parts are counted as the model will see them, which costs what the chat route
spends on them before generating: native fusion runs the omni processor (each image and clip
becomes its placeholder tokens; no encoder runs), composed fusion runs the captioner and the
speech-to-text model and counts the merged text. An estimate would undercount, and an
undercount is exactly what makes a prompt overflow the window.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from jinja2 import TemplateError

from engine.errors import invalid_request, read_json
from engine.protocol.tokenize import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
    detokenize_body,
    tokenize_body,
)
from engine.routes import REGISTRY, SETTINGS
from engine.routes.chat import check_model, fuse, prepare_prompt

routes = web.RouteTableDef()


def parse_request(data: dict[str, Any]) -> TokenizeRequest:
    """The chat form when ``messages`` is given, else the prompt form (as vLLM tells them apart)."""
    if "messages" in data:
        return TokenizeChatRequest.model_validate(data)
    if "prompt" in data:
        return TokenizeCompletionRequest.model_validate(data)
    raise invalid_request(
        "Give either `prompt` (text) or `messages` (a chat) to tokenize.", None,
        "missing_required_parameter",
    )


def prompt_ids(prompt: Any) -> list[int]:
    """Token ids of a backend's prepared prompt: a list already, or an omni processor output."""
    if isinstance(prompt, list):
        return prompt
    return [int(i) for i in prompt.inputs["input_ids"][0].tolist()]


def text_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of raw text."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def templated_ids(tokenizer: Any, body: TokenizeChatRequest, messages: list[dict]) -> list[int]:
    """Token ids of a text chat through the template with the client's own flags."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False,
        add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
        continue_final_message=body.continue_final_message,
    )
    return text_ids(tokenizer, text, body.add_special_tokens)


async def chat_ids(request: web.Request, backend: Any, body: TokenizeChatRequest) -> list[int]:
    """The chat's token ids: the chat route's own prompt with the default flags."""
    fused = await fuse(request, backend, body.messages)
    if body.uses_chat_defaults():
        return prompt_ids(await prepare_prompt(backend, fused))
    if fused.images or fused.audios:  # only the omni processor expands media placeholders
        raise invalid_request(
            "With images or audio, only the default add_generation_prompt, "
            "continue_final_message and add_special_tokens are supported.", "messages",
        )
    try:
        return await asyncio.to_thread(templated_ids, backend.tokenizer, body, fused.messages)
    except (TemplateError, ValueError) as exc:  # a refusing template, a final message to continue
        raise invalid_request(
            f"The model's chat template refused these messages: {exc}", "messages",
            "invalid_messages",
        ) from None


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    """Count and list the tokens of a prompt or a chat (vLLM's /tokenize)."""
    body = parse_request(await read_json(request))
    role = request.app[SETTINGS].chat
    check_model(body.model or role.served_name, role)
    backend = request.app[REGISTRY].get("chat")
    if isinstance(body, TokenizeChatRequest):
        ids = await chat_ids(request, backend, body)
    else:
        ids = await asyncio.to_thread(
            text_ids, backend.tokenizer, body.prompt, body.add_special_tokens
        )
    strs = backend.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return web.json_response(tokenize_body(ids, backend.context_tokens, strs))


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    """Turn token ids back into text (vLLM's /detokenize)."""
    body = DetokenizeRequest.model_validate(await read_json(request))
    role = request.app[SETTINGS].chat
    check_model(body.model or role.served_name, role)
    tokenizer = request.app[REGISTRY].get("chat").tokenizer
    vocab = len(tokenizer)
    unknown = [token for token in body.tokens if token >= vocab]
    if unknown:
        raise invalid_request(
            f"Token id {unknown[0]} is outside this model's vocabulary of {vocab}.", "tokens",
            "invalid_value",
        )
    text = await asyncio.to_thread(tokenizer.decode, body.tokens)
    return web.json_response(detokenize_body(text))
