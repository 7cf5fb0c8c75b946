"""A fake vLLM server: FakeEngine's plumbing with vLLM's context window, tokenizer and errors.

What differs from `FakeEngine` is what vLLM does differently, so the bot's tests can check that a
prompt always fits a server that counts tokens its own way:

- `/v1/models` lists the model as vLLM's `ModelCard` does, with `max_model_len` (its window);
- `POST /tokenize` and `/detokenize` at the server root, in vLLM's shapes (off with
  `tokenize=False`: a server without them answers 404 as FastAPI does);
- a tokenizer that is deterministic and NOT four characters a token: words are cut into pieces of
  at most six letters (a leading space rides on the piece), every digit run of up to three, every
  other character and every whitespace run is a token; English comes to ~1.3 tokens a word, code
  and unusual text to far more. A ChatML template (`<|im_start|>role\\n...<|im_end|>\\n`, then the
  generation prompt `<|im_start|>assistant\\n`) adds its overhead to every message;
- `/v1/chat/completions` counts the prompt that way and refuses, with vLLM's status, body and
  wording, a prompt that does not fit `max_model_len` with its `max_tokens` (by default the rest
  of the window, as vLLM's is). Every chat request is kept in `chat_calls` with its counted
  prompt, so a test can assert that none went over the window.

Streaming, failure modes and request records are FakeEngine's (`set_mode`, `requests`).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from tests.fakes.fake_engine import RECORD, FakeEngine, RecordedRequest, Reply
from tests.fakes.openai_shapes import default_reply, media_report

DEFAULT_MODEL = "masque-chat"  # what the bot asks for by default
DEFAULT_MAX_MODEL_LEN = 2048
BOS, IM_START, IM_END, MEDIA = "<s>", "<|im_start|>", "<|im_end|>", "<|media|>"
SPECIAL_IDS = {BOS: 1, IM_START: 2, IM_END: 3, MEDIA: 4}
MEDIA_PART_TOKENS = 64  # an image or audio part stands for this many placeholder tokens
FIRST_ID, VOCAB_SIZE = 100, 50_000
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_IDS) + ")")
_PIECE_RE = re.compile(r"\s?[A-Za-z]{1,6}|\s?\d{1,3}|\s?[^\sA-Za-z\d]|\s+")

ErrorStyle = Literal["current", "legacy"]


class FakeTokenizer:
    """Deterministic pieces and ids, and the ChatML template, as the fake vLLM counts them."""

    def __init__(self, chars_per_token: float | None = None) -> None:
        # None: the word-piece rules above; a number: plain text cut every `chars_per_token`
        # characters, for a test that wants a known ratio.
        self.chars_per_token = chars_per_token
        self.vocab: dict[int, str] = {i: s for s, i in SPECIAL_IDS.items()}

    def pieces(self, text: str) -> list[str]:
        """The token strings of `text` (special tokens are one piece each); joined, `text`."""
        out: list[str] = []
        for segment in _SPECIAL_RE.split(text):
            if segment in SPECIAL_IDS:
                out.append(segment)
            elif segment:
                out.extend(self._plain(segment))
        return out

    def _plain(self, text: str) -> list[str]:
        if self.chars_per_token is None:
            return _PIECE_RE.findall(text)
        count = math.ceil(len(text) / self.chars_per_token)
        cuts = [round(k * self.chars_per_token) for k in range(count)] + [len(text)]
        return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]

    def token_id(self, piece: str) -> int:
        if piece in SPECIAL_IDS:
            return SPECIAL_IDS[piece]
        digest = hashlib.blake2b(piece.encode(), digest_size=4).digest()
        ident = FIRST_ID + int.from_bytes(digest, "little") % VOCAB_SIZE
        self.vocab.setdefault(ident, piece)
        return ident

    def encode(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[str]]:
        """(ids, token strings) of `text`, with BOS in front when `add_special_tokens`."""
        strs = ([BOS] if add_special_tokens else []) + self.pieces(text)
        return [self.token_id(s) for s in strs], strs

    def decode(self, ids: list[int]) -> str | None:
        """The text of `ids`, or None when one was never produced by this tokenizer."""
        if any(i not in self.vocab for i in ids):
            return None
        return "".join(self.vocab[i] for i in ids)

    @staticmethod
    def render(messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str:
        """The ChatML prompt of `messages` (text parts joined by newlines, media as placeholders)."""
        out = []
        for index, message in enumerate(messages):
            closing = not (continue_final_message and index == len(messages) - 1)
            body = f"{IM_START}{message.get('role', 'user')}\n{_content(message.get('content'))}"
            out.append(body + (f"{IM_END}\n" if closing else ""))
        if add_generation_prompt and not continue_final_message:
            out.append(f"{IM_START}assistant\n")
        return "".join(out)


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind in ("image_url", "input_audio"):
            texts.append(MEDIA * MEDIA_PART_TOKENS)
    return "\n".join(texts)


@dataclass
class ChatCall:
    """One chat request as the fake vLLM counted it."""

    record: RecordedRequest
    prompt_tokens: int
    max_tokens: int | None  # what the client asked (max_completion_tokens or max_tokens)
    max_model_len: int
    refused: str | None = None  # the error message, when it did not fit

    @property
    def fits(self) -> bool:
        """True when the prompt and the asked completion fit the window (vLLM's own rule)."""
        return self.prompt_tokens < self.max_model_len and (
            self.max_tokens is None or self.prompt_tokens + self.max_tokens <= self.max_model_len
        )


def context_error(prompt: int, max_tokens: int | None, window: int,
                  style: ErrorStyle) -> tuple[str, str | None] | None:
    """vLLM's (message, param) for a request that does not fit, or None when it fits.

    "current" is vLLM's `OpenAIServing._validate_input` (vllm/entrypoints/openai/engine/serving.py,
    v0.10 onwards). "legacy" is v0.9 and before (serving_engine.py): "However, you requested
    2348 tokens (2048 in the messages, 300 in the completion). Please reduce the length of the
    messages or completion." The newest renderer (vllm/renderers/params.py) words it "However,
    you requested 300 output tokens and your prompt contains at least 2049 input tokens, for a
    total of at least 2349 tokens. ..."; all say "This model's maximum context length is".
    """
    head = f"This model's maximum context length is {window} tokens."
    if style == "legacy":
        if max_tokens is None:
            if prompt < window:
                return None
            return (f"{head} However, you requested {prompt} tokens in the messages, "
                    "Please reduce the length of the messages."), None
        if prompt + max_tokens <= window:
            return None
        return (f"{head} However, you requested {prompt + max_tokens} tokens ({prompt} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion."), None
    if prompt >= window:
        return (f"{head} However, your request has {prompt} input tokens. Please reduce the "
                "length of the input messages."), "input_tokens"
    if max_tokens is not None and prompt + max_tokens > window:
        return ("'max_tokens' or 'max_completion_tokens' is too large: "
                f"{max_tokens}. This model's maximum context length is {window} tokens and "
                f"your request has {prompt} input tokens ({max_tokens} > {window} - {prompt})."
                ), "max_tokens"
    return None


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    return value if isinstance(value, bool) else default


class FakeVLLM(FakeEngine):
    """A vLLM-shaped server for tests. `await start()`, use `.url` (the /v1 base), `await stop()`."""

    def __init__(
        self,
        *,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        tokenize: bool = True,
        masque: bool = False,
        reply: Reply = default_reply,
        token_delay: float = 0.0,
        chars_per_token: float | None = None,
        model: str = DEFAULT_MODEL,
        root: str | None = None,
        error_style: ErrorStyle = "current",
        **engine: Any,
    ) -> None:
        super().__init__(reply=reply, token_delay=token_delay, masque=masque, model=model, **engine)
        self.max_model_len = max_model_len
        self.tokenize = tokenize  # may be switched at any time
        self.tokenizer = FakeTokenizer(chars_per_token)
        self.root = root or model
        self.error_style: ErrorStyle = error_style
        self.created = int(time.time())
        self.chat_calls: list[ChatCall] = []

    # -- what tests read --------------------------------------------------------------------

    def count(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> int:
        """The prompt tokens this server counts for `messages` (what /tokenize answers)."""
        return len(self.tokenizer.encode(self.tokenizer.render(messages, add_generation_prompt))[0])

    def prompt_tokens(self) -> list[int]:
        """The counted prompt of every chat request so far, oldest first."""
        return [call.prompt_tokens for call in self.chat_calls]

    def over_window(self) -> list[ChatCall]:
        """The chat requests that did not fit the window (each was refused with a 400)."""
        return [call for call in self.chat_calls if not call.fits]

    # -- vLLM's shapes ----------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)

    def _error(self, message: str, status: int = 400, type_: str = "BadRequestError",
               param: str | None = None) -> web.Response:
        if self.error_style == "legacy":  # vLLM <= 0.9: a flat body
            body: dict[str, Any] = {"object": "error", "message": message, "type": type_,
                                    "param": param, "code": status}
        else:  # vllm/entrypoints/openai/engine/protocol.py ErrorResponse(error=ErrorInfo(...))
            body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
        return web.json_response(body, status=status)

    def _unknown_model(self, body: dict[str, Any]) -> web.Response | None:
        model = body.get("model")
        if model is None or model == self.model:
            return None
        return self._error(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")

    def model_card(self) -> dict[str, Any]:
        """vLLM's ModelCard of the served model."""
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
            "created": self.created, "allow_create_engine": False, "allow_sampling": True,
            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
            "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False,
        }
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": self.root, "parent": None, "max_model_len": self.max_model_len,
                "permission": [permission]}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self.model_card()]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)  # vLLM's /health: 200 and an empty body

    def _usage(self, body: dict, text: str) -> dict[str, int]:
        prompt = len(self._chat_tokens(body)[0])
        completion = len(self.tokenizer.pieces(text))
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _chat_tokens(self, body: dict[str, Any]) -> tuple[list[int], list[str]]:
        """(ids, strings) of a chat body's prompt, with the body's template flags (vLLM's)."""
        text = self.tokenizer.render(
            body.get("messages") or [], _flag(body, "add_generation_prompt", True),
            _flag(body, "continue_final_message", False),
        )
        return self.tokenizer.encode(text, _flag(body, "add_special_tokens", False))

    # -- routes -----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await self._json(request)
        if isinstance(body, web.Response):  # FakeEngine's 400 for JSON that is not an object
            return body
        return self._unknown_model(body) or body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not body.get("model"):  # vLLM defaults it; FakeEngine's replies echo it
            return self._error("The fake vLLM wants a `model` in every chat request.", param="model")
        if not isinstance(messages, list) or not messages:
            return self._error("messages: must be a non-empty list", param="messages")
        prompt = len(self._chat_tokens(body)[0])
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        call = ChatCall(request[RECORD], prompt, asked, self.max_model_len)
        self.chat_calls.append(call)
        refusal = context_error(prompt, asked, self.max_model_len, self.error_style)
        if refusal is not None:
            call.refused = refusal[0]
            return self._error(refusal[0], param=refusal[1])
        return await self._answer(request, body, asked or self.max_model_len - prompt)

    async def _answer(self, request: web.Request, body: dict, limit: int) -> web.StreamResponse:
        text = self.reply(body) if callable(self.reply) else self.reply
        if inspect.isawaitable(text):
            text = await text
        pieces = self.tokenizer.pieces(text)  # streamed a token a chunk, as vLLM does
        finish = "stop"
        if len(pieces) > limit:
            pieces, finish = pieces[:limit], "length"
        masque = media_report(body["messages"], self.transcript, self.caption) if self.masque else None
        if body.get("stream"):
            return await self._chat_stream(request, body, pieces, finish, masque)
        await asyncio.sleep(self.latency + self.token_delay * len(pieces))
        return web.json_response(self._completion(body, "".join(pieces), finish, masque))

    async def _tokenize(self, request: web.Request) -> web.Response:
        if not self.tokenize:
            return web.json_response({"detail": "Not Found"}, status=404)  # FastAPI's 404
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if isinstance(body.get("messages"), list) and body["messages"]:
            if body.get("continue_final_message") and body.get("add_generation_prompt"):
                return self._error("Cannot set both `continue_final_message` and "
                                   "`add_generation_prompt` to True.")
            ids, strs = self._chat_tokens(body)
        elif isinstance(body.get("prompt"), str):
            ids, strs = self.tokenizer.encode(body["prompt"], _flag(body, "add_special_tokens", True))
        else:
            return self._error("Give either a `prompt` string or a non-empty `messages` list.")
        return web.json_response({"count": len(ids), "max_model_len": self.max_model_len,
                                  "tokens": ids, "token_strs": strs if body.get("return_token_strs") else None})

    async def _detokenize(self, request: web.Request) -> web.Response:
        if not self.tokenize:
            return web.json_response({"detail": "Not Found"}, status=404)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return self._error("tokens: must be a list of integers", param="tokens")
        text = self.tokenizer.decode(tokens)
        if text is None:
            return self._error("tokens: an id is not in this model's vocabulary", param="tokens")
        return web.json_response({"prompt": text})
