"""The aiohttp application: middlewares, the model registry and the route tables."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from engine.errors import Handler, error_middleware, too_large, unauthorized
from engine.metrics import Metrics, metrics_middleware
from engine.registry import Registry
from engine.routes import METRICS, REGISTRY, SETTINGS
from engine.settings import EngineSettings

__all__ = ["METRICS", "REGISTRY", "SETTINGS", "create_app"]

log = logging.getLogger(__name__)

ROUTE_MODULES = ("chat", "completions", "models", "tokenize", "audio", "images", "embeddings")
OPEN_PATHS = frozenset({"/health"})  # reachable without the key (load balancers, k8s probes)
LOADER: web.AppKey[asyncio.Task[None]] = web.AppKey("loader")


def auth_middleware(settings: EngineSettings) -> web.middleware:
    """Require ``Authorization: Bearer <key>`` on every path but /health, when a key is set."""
    expected = settings.api_key.get_secret_value().encode() if settings.api_key else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            given = token.strip().encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
                raise unauthorized()
        return await handler(request)

    return middleware


def size_middleware(max_bytes: int) -> web.middleware:
    """Refuse a declared body over the limit before reading it (aiohttp's own
    ``client_max_size`` catches bodies sent without a Content-Length)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > max_bytes:
            raise too_large(f"The request body is larger than {max_bytes} bytes.")
        return await handler(request)

    return middleware


def _mount_routes(app: web.Application) -> None:
    for name in ROUTE_MODULES:
        try:
            module = importlib.import_module(f"engine.routes.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"engine.routes.{name}":
                raise  # a missing dependency inside the module is a real error
            log.warning("Route module engine.routes.%s is not installed; skipping it", name)
            continue
        app.router.add_routes(module.routes)


async def _models(app: web.Application) -> AsyncIterator[None]:
    """Load the models in the background (so /health answers 'loading' meanwhile)."""
    registry = app[REGISTRY]
    app[LOADER] = asyncio.create_task(registry.load_all())
    yield
    app[LOADER].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await app[LOADER]
    await asyncio.to_thread(registry.close)


def create_app(settings: EngineSettings, registry: Registry | None = None) -> web.Application:
    """Build the engine application; models load when it starts."""
    if not settings.is_loopback() and settings.api_key is None:
        raise ValueError(
            f"Refusing to listen on {settings.host} without an API key: "
            "set MASQUE_ENGINE_API_KEY (or bind to 127.0.0.1)."
        )
    metrics = Metrics()
    registry = registry or Registry(settings, metrics)
    app = web.Application(
        client_max_size=settings.limits.max_request_bytes,
        middlewares=[
            metrics_middleware(metrics),
            error_middleware,
            auth_middleware(settings),
            size_middleware(settings.limits.max_request_bytes),
        ],
    )
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[METRICS] = metrics
    _mount_routes(app)
    app.cleanup_ctx.append(_models)
    return app
