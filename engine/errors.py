"""One error shape for the whole engine: the OpenAI error body.

Routes and backends raise :class:`APIError` (usually through the helpers below); the
:func:`error_middleware` turns it, aiohttp's own HTTP errors and anything unexpected into
``{"error": {"message", "type", "param", "code"}}`` with the right status. A 500 never
carries a traceback to the client; the traceback goes to the log instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# OpenAI's error "type" values.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
OVERLOADED = "overloaded_error"


class APIError(Exception):
    """An error the client should see, rendered as the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients expect."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        """This error as an aiohttp JSON response."""
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request is malformed or a value is out of range."""
    return APIError(400, message, INVALID_REQUEST, param, code)


def unauthorized(message: str = "Missing or invalid API key.") -> APIError:
    """401: the bearer key is missing or wrong."""
    return APIError(
        401, message, AUTHENTICATION, None, "invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """404: unknown model or path."""
    return APIError(404, message, NOT_FOUND, param, code)


def too_large(message: str, param: str | None = None, code: str = "too_large") -> APIError:
    """413: the request (or a part of it) is bigger than the configured limit."""
    return APIError(413, message, INVALID_REQUEST, param, code)


def overloaded(retry_after: float, message: str = "The server is busy; retry later.") -> APIError:
    """503 with Retry-After: the bounded queue is full."""
    seconds = max(1, int(round(retry_after)))
    return APIError(
        503, message, OVERLOADED, None, "queue_full", headers={"Retry-After": str(seconds)}
    )


def unavailable(message: str, code: str = "model_not_loaded") -> APIError:
    """503: the role is disabled or its model has not finished loading.

    A disabled role will not come back by waiting: no Retry-After, and ``x-should-retry: false`` (the
    official OpenAI clients honour it) so a client fails at once instead of retrying.
    """
    headers = {"x-should-retry": "false"} if code == "role_disabled" else {"Retry-After": "5"}
    return APIError(503, message, SERVER_ERROR, None, code, headers=headers)


def from_validation(error: ValidationError) -> APIError:
    """400 naming the first offending field of a pydantic ValidationError."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ()) if part != "__root__")
    what = first.get("msg", "invalid value")
    message = f"{loc}: {what}" if loc else what
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return invalid_request(message, param=loc or None, code=code)


async def read_json(request: web.Request) -> dict[str, Any]:
    """Parse the body as a JSON object or raise a 400 that says why."""
    raw = await request.read()
    if not raw:
        raise invalid_request(
            "The request body is empty; expected a JSON object.", code="empty_body"
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid_request(f"Malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid_request("The JSON body must be an object.", code="invalid_json")
    return data


def _http_error_to_api(exc: web.HTTPException) -> APIError:
    """Map aiohttp's own HTTP errors (404 route, 405, 413 body too large...) to our shape."""
    status = exc.status
    if status == 413:
        return too_large(exc.text or "Request body too large.")
    if status == 404:
        return not_found(f"No such endpoint: {exc.reason}", code="unknown_url")
    kind = INVALID_REQUEST if status < 500 else SERVER_ERROR
    return APIError(status, exc.reason or "HTTP error", kind, None, None)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure of ``handler`` as the OpenAI error body."""
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except ValidationError as exc:
        return from_validation(exc).response()
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and friends are not errors
            raise
        return _http_error_to_api(exc).response()
    except Exception:  # the last line of defence: log it, never leak it
        log.exception("Unhandled error on %s %s", request.method, request.path)
        error = APIError(500, "Internal server error.", SERVER_ERROR, None, "internal_error")
        return error.response()
