"""Pure helpers of the fake engine: OpenAI-shaped bodies, stream deltas, embeddings and PNGs."""

from __future__ import annotations

import hashlib
import io
import math
import re
from typing import Any

from PIL import Image

EMBEDDING_DIM = 256
MAX_IMAGE_SIDE = 2048
_TOKEN_RE = re.compile(r"\s*\S+|\s+")
WORD_RE = re.compile(r"[a-z0-9']+")


def default_reply(request: dict[str, Any]) -> str:
    """An in-character-ish reply that quotes the last user text, so tests can assert on it."""
    for message in reversed(request.get("messages", [])):
        if message.get("role") == "user":
            return f"*nods slowly* You said: {message_text(message)}"
    return "*waits in silence*"


def message_text(message: dict[str, Any]) -> str:
    """The text parts of one chat message, joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return ""


def split_tokens(text: str) -> list[str]:
    """Word-sized stream deltas; joined they give back `text` exactly."""
    return _TOKEN_RE.findall(text)


def embed_text(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A unit vector from a hashed bag of words: texts sharing words point the same way."""
    vector = [0.0] * dim
    for word in WORD_RE.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dim
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:
        vector[0], norm = 1.0, 1.0  # empty text still gets a valid unit vector
    return [v / norm for v in vector]


def png_of(width: int, height: int, prompt: str) -> bytes:
    """A real PNG of the asked size, its colour derived from the prompt."""
    r, g, b = hashlib.sha256(prompt.encode()).digest()[:3]
    image = Image.new("RGB", (width, height), (r, g, b))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def media_report(messages: list[dict[str, Any]], transcript: str, caption: str) -> dict[str, Any]:
    """The engine's `masque` object for a request: one transcript per audio part, one caption per image."""
    transcripts, captions = [], []
    for index, message in enumerate(messages):
        parts = message.get("content") if isinstance(message.get("content"), list) else []
        for part in parts:
            if part.get("type") == "input_audio":
                transcripts.append({"message": index, "text": transcript})
            elif part.get("type") == "image_url":
                captions.append({"message": index, "text": caption})
    return {"fusion": "composed", "transcripts": transcripts, "captions": captions}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The one OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(body: dict, text: str) -> dict[str, int]:
    """A `usage` object: words of the prompt, stream deltas of the reply."""
    prompt = sum(len(message_text(m).split()) for m in body.get("messages", []))
    completion = len(split_tokens(text))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def parse_size(size: Any) -> tuple[int, int] | None:
    """(width, height) from "WxH" within MAX_IMAGE_SIDE, or None."""
    match = re.fullmatch(r"(\d+)x(\d+)", str(size))
    if not match:
        return None
    width, height = int(match[1]), int(match[2])
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        return None
    return width, height
