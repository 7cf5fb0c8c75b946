"""The fake Discord misbehaving on purpose: 429 storms with Discord's real shapes.

`FakeDiscord.limits` is a `RateLimiter`. A test says "the next N requests matching route R get 429
with retry_after X" (`limits.storm(...)`, per route or global) and afterwards asks
`limits.early_requests(calls)` whether the client came back inside a window it was told to wait.

The 429 looks like Discord's (docs: Topics > Rate Limits, "Exceeding A Rate Limit"): JSON body
`{"message": "You are being rate limited.", "retry_after": <float s>, "global": <bool>}` (plus
`code` 0 on a global one), headers `Retry-After` (whole seconds, rounded up), `X-RateLimit-Scope`
(user, global or shared), `X-RateLimit-Global: true` on a global one, and on a per-route one the
bucket headers `X-RateLimit-Limit/Remaining/Reset/Reset-After/Bucket`. Every 429 carries
`Via: 1.1 google` like Discord's (Cloudflare's) do: discord.py takes a 429 without it for a
Cloudflare ban and gives up instead of waiting.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tests.fakes.fake_discord import RestCall

# Routes a test can storm: (method, path pattern); the pattern's first group is the route's
# top-level resource (Discord's "major parameter"), which keys its bucket.
WEBHOOK_EXECUTE = ("POST", r"/webhooks/(\d+)/[^/]+")
WEBHOOK_MESSAGE_EDIT = ("PATCH", r"/webhooks/(\d+)/[^/]+/messages/\d+")
CHANNEL_MESSAGE_CREATE = ("POST", r"/channels/(\d+)/messages")
CHANNEL_MESSAGE_EDIT = ("PATCH", r"/channels/(\d+)/messages/\d+")
RATE_LIMITED = "You are being rate limited."
BUCKET_LIMIT = 5  # what X-RateLimit-Limit says (Discord's message routes: 5 per 5 s)


@dataclass
class Storm:
    """The next `count` requests matching (`method`, `pattern`) get a 429 telling to wait `retry_after`."""

    method: str
    pattern: str
    count: int
    retry_after: float
    is_global: bool = False
    scope: str = "user"  # X-RateLimit-Scope: user, global or shared
    answered: int = 0  # 429s given so far

    def matches(self, call: RestCall) -> re.Match[str] | None:
        return re.fullmatch(self.pattern, call.path) if call.method == self.method else None

    @property
    def bucket(self) -> str:
        """A bucket hash the way Discord shows one (opaque, stable per route)."""
        return hashlib.sha1(f"{self.method} {self.pattern}".encode()).hexdigest()[:16]


@dataclass
class Throttle:
    """One 429 given: to which caller (`who`) for which bucket (`key`), when, and for how long."""

    call: RestCall
    key: str
    who: str
    is_global: bool
    retry_after: float
    at: float  # perf_counter when the 429 was answered

    @property
    def until(self) -> float:
        return self.at + self.retry_after

    def covers(self, call: RestCall, key: str | None, who: str) -> bool:
        """Whether `call` came inside this 429's window and should have waited for it."""
        if call is self.call or not self.at <= call.at < self.until:
            return False
        return who == self.who if self.is_global else key == self.key


@dataclass
class RateLimiter:
    """The storms a test set up, and the 429s given for them."""

    storms: list[Storm] = field(default_factory=list)
    throttles: list[Throttle] = field(default_factory=list)

    def storm(self, route: tuple[str, str], count: int, retry_after: float, *, is_global: bool = False,
              scope: str | None = None) -> Storm:
        """The next `count` requests on `route` (e.g. WEBHOOK_EXECUTE) get 429 with `retry_after` seconds."""
        storm = Storm(route[0], route[1], count, retry_after, is_global,
                      scope or ("global" if is_global else "user"))
        self.storms.append(storm)
        return storm

    def check(self, call: RestCall) -> web.Response | None:
        """A 429 for `call` when a storm still has one to give; None lets it through."""
        for storm in self.storms:
            if storm.answered < storm.count and storm.matches(call):
                storm.answered += 1
                self.throttles.append(Throttle(call, self._key(call) or "", _who(call), storm.is_global,
                                               storm.retry_after, time.perf_counter()))
                return _too_many(storm)
        return None

    def early_requests(self, calls: list[RestCall]) -> list[tuple[RestCall, Throttle]]:
        """Requests that came inside the window of a 429 they were bound by (same bucket, or same
        caller for a global one): each is a client that did not honour retry_after."""
        return [(call, throttle) for call in calls for throttle in self.throttles
                if throttle.covers(call, self._key(call), _who(call))]

    def _key(self, call: RestCall) -> str | None:
        """The call's bucket: the storm route it falls under and its top-level resource."""
        for storm in self.storms:
            if (match := storm.matches(call)) is not None:
                return f"{storm.bucket}:{match.group(1) if match.groups() else ''}"
        return None


def _who(call: RestCall) -> str:
    """Whose global limit a request counts against: the bot's token, else (webhook by token) the webhook."""
    if call.authed:
        return "bot"
    parts = call.path.split("/")
    return f"webhook:{parts[2]}" if len(parts) > 2 and parts[1] == "webhooks" else "ip"


def _too_many(storm: Storm) -> web.Response:
    body: dict[str, object] = {"message": RATE_LIMITED, "retry_after": storm.retry_after, "global": storm.is_global}
    headers = {"Retry-After": str(math.ceil(storm.retry_after)), "X-RateLimit-Scope": storm.scope,
               "Via": "1.1 google"}
    if storm.is_global:
        body["code"] = 0
        headers["X-RateLimit-Global"] = "true"
    else:
        headers.update({"X-RateLimit-Limit": str(BUCKET_LIMIT), "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset": f"{time.time() + storm.retry_after:.3f}",
                        "X-RateLimit-Reset-After": f"{storm.retry_after:.3f}", "X-RateLimit-Bucket": storm.bucket})
    return web.Response(status=429, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)
