"""The wire under the engine client (bot/engine_client.py): server-sent events, error bodies, retry waits
and proxies, as the openai client handled them, over plain aiohttp. Nothing here knows what a chat is."""

from __future__ import annotations

import codecs
import json
import math
import random
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import orjson

# Retries wait as the openai client did: 0.5 s doubling up to 8 s, less up to a quarter (jitter), or what
# the server asks in Retry-After / retry-after-ms when that is short (a longer ask gets the backoff).
RETRY_BASE_S, RETRY_MAX_S, RETRY_AFTER_CAP_S = 0.5, 8.0, 20.0


def loads(data: bytes | str) -> Any:
    """The JSON of an engine's answer or streamed chunk: orjson, several times faster than json on an
    embedding's floats; what it refuses, json reads (NaN, Infinity, integers past 64 bits) or refuses
    with its own errors (JSONDecodeError, UnicodeDecodeError), as before."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def env_proxy(url: str) -> str | None:
    """The proxy HTTP_PROXY/HTTPS_PROXY/NO_PROXY name for `url`, looked up once (aiohttp's `trust_env`
    would look it up, and .netrc too, in a thread on every request)."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class SSEParser:
    """Server-sent events from bytes that arrive in any pieces: the `data` of each whole event.

    The parts of the SSE spec a chat stream uses: lines end with LF, CRLF or CR; `data:` lines (one space
    after the colon dropped) join with "\\n" into one event, which a blank line ends; lines starting with
    ":" are comments; other fields (event, id, retry) are ignored; an event with no data is none.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()  # a character may be split between pieces
        self._line = ""  # the unfinished last line
        self._data: list[str] = []

    def feed(self, piece: bytes) -> list[str]:
        """The events that `piece` completes, in order."""
        text = self._line + self._decoder.decode(piece)
        held = ""
        if text.endswith("\r"):  # maybe the first half of a CRLF: wait for the next piece
            text, held = text[:-1], "\r"
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        *lines, self._line = text.split("\n")
        self._line += held
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events


class StatusError(Exception):
    """A 4xx/5xx answer, with the message and code of its error body (OpenAI's shape, vLLM's older flat
    one, FastAPI's `detail`, or plain text)."""

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str]):
        self.status, self.headers = status, headers
        self.text = body.decode("utf-8", "replace")
        try:
            parsed = json.loads(self.text)
        except ValueError:
            parsed = None
        message, code = error_fields(parsed) if isinstance(parsed, dict) else ("", "")
        self.message = message or self.text.strip() or f"HTTP {status}"
        self.code = code
        super().__init__(f"{status}: {self.message}")

    @property
    def retryable(self) -> bool:
        """Worth another try, by the openai client's rules: what `x-should-retry` says, else 408, 409,
        429 and 5xx (but not our engine's 503 `role_disabled`: that model is off, not busy)."""
        should = self.headers.get("x-should-retry")
        if should in ("true", "false"):
            return should == "true"
        if self.status == 503 and self.code == "role_disabled":
            return False
        return self.status in (408, 409, 429) or self.status >= 500


def error_fields(body: dict[str, Any]) -> tuple[str, str]:
    """(message, code) of an error body: `{"error": {"message", "code"}}`, `{"error": "..."}`, or both
    at the top level (vLLM before 0.10, FastAPI's `detail`)."""
    error = body.get("error")
    inner = error if isinstance(error, dict) else body
    message = inner.get("message") or inner.get("detail") or (error if isinstance(error, str) else "")
    return str(message or ""), str(inner.get("code") or "")


def retry_delay(tries: int, headers: Mapping[str, str]) -> float:
    """Seconds to wait before the retry after `tries` earlier retries: the server's retry-after-ms or
    Retry-After (seconds) when it asks for 0 to RETRY_AFTER_CAP_S, else the openai client's backoff."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            asked = float(headers.get(name, "")) / scale
        except ValueError:
            continue  # absent, or an HTTP date: the backoff will do
        if math.isfinite(asked) and 0 < asked <= RETRY_AFTER_CAP_S:
            return asked
        break
    return min(RETRY_BASE_S * 2.0 ** min(tries, 32), RETRY_MAX_S) * (1 - 0.25 * random.random())
