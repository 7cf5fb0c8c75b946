"""A small OpenAI-shaped engine over real HTTP for the pipeline, client, art and console tests.

Real aiohttp server on a free loopback port: streamed and whole chat replies
(with our `masque` extras when `masque=True`), transcriptions, PNG images,
deterministic embeddings, /health. Records every request it got; modes make
it slow, broken (500) or answer garbage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

EMBED_DIM = 16


def embedding_for(text: str) -> list[float]:
    """A unit vector from the text's words: texts sharing words are close, as with real embeddings."""
    vector = [0.0] * EMBED_DIM
    for word in text.lower().replace(",", " ").split():
        digest = hashlib.sha256(word.encode()).digest()
        vector[digest[0] % EMBED_DIM] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def png_bytes(color: tuple[int, int, int] = (200, 80, 40), size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class FakeEngine:
    """Configure `reply`, `mode` ("ok", "down"=500, "garbage", "slow"), `delay_s`, `masque` between calls."""

    reply: str = "The rain does not stop. *She taps the desk.* Tell me more."
    mode: str = "ok"
    delay_s: float = 0.0
    masque: bool = True
    transcript: str = "hello from a voice note"
    scene_prompt: str = "a rainy office at night, a detective in a fedora"
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)  # queued replies used before `reply`

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/images/generations", self.images)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    def chats(self) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path == "chat"]

    async def _gate(self) -> web.Response | None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode == "down":
            return web.json_response({"error": {"message": "engine broke", "type": "server_error"}}, status=500)
        if self.mode == "garbage":
            return web.Response(text="<html>not json at all", content_type="application/json")
        if self.mode == "html":
            return web.Response(text="<html>502 bad gateway</html>", content_type="text/html")
        return None

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=500 if self.mode == "down" else 200)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("chat", body))
        if (failure := await self._gate()) is not None:
            return failure
        is_scene = "image generator" in str(body["messages"][0].get("content", ""))
        text = self.scene_prompt if is_scene else (self.replies.pop(0) if self.replies else self.reply)
        extras = self._extras(body["messages"])
        if body.get("stream"):
            return await self._stream(request, text, extras)
        payload = _completion(text)
        if extras is not None:
            payload["masque"] = extras
        return web.json_response(payload)

    def _extras(self, messages: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not self.masque:
            return None
        transcripts, captions = [], []
        for index, message in enumerate(messages):
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "input_audio":
                    transcripts.append({"message": index, "text": self.transcript})
                if part.get("type") == "image_url":
                    captions.append({"message": index, "text": "a grey cat"})
        return {"fusion": "composed", "transcripts": transcripts, "captions": captions}

    async def _stream(self, request: web.Request, text: str, extras: dict[str, Any] | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = text.split(" ")
        for i, word in enumerate(words):
            chunk = _chunk(word if i == 0 else " " + word)
            if i == len(words) - 1 and extras is not None:
                chunk["masque"] = extras
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def transcriptions(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append(("transcription", {"model": form.get("model"), "bytes": len(form["file"].file.read())}))
        return await self._gate() or web.json_response({"text": self.transcript})

    async def images(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("image", body))
        png = base64.b64encode(png_bytes()).decode()
        return await self._gate() or web.json_response({"created": 0, "data": [{"b64_json": png}]})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("embedding", body))
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": embedding_for(t)} for i, t in enumerate(texts)]
        return await self._gate() or web.json_response(
            {"object": "list", "data": data, "model": "fake", "usage": {"prompt_tokens": 0, "total_tokens": 0}})


def _completion(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


def _chunk(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


async def serve(engine: FakeEngine) -> tuple[web.AppRunner, str]:
    """Start `engine` on a free loopback port; returns the runner and its /v1 base URL."""
    runner = web.AppRunner(engine.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"


@contextlib.asynccontextmanager
async def running(engine: FakeEngine | None = None) -> AsyncIterator[tuple[FakeEngine, str]]:
    """A started fake engine and its base URL, stopped afterwards."""
    engine = engine or FakeEngine()
    runner, url = await serve(engine)
    try:
        yield engine, url
    finally:
        await runner.cleanup()


def main() -> None:
    """`python -m tests.bot.c1_engine --port P`: serve a fake engine (for child-process tests)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reply", default=FakeEngine.reply)
    args = parser.parse_args()
    web.run_app(FakeEngine(reply=args.reply).app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
