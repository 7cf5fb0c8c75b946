"""GET /v1/models, /health and /metrics."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from engine.errors import not_found
from engine.metrics import CONTENT_TYPE
from engine.registry import DEGRADED, OK
from engine.routes import METRICS, REGISTRY, SETTINGS
from engine.settings import ROLES, EngineSettings

routes = web.RouteTableDef()
OWNER = "masque"
# Started once per process; OpenAI's `created` is a Unix time.
CREATED = int(time.time())


def served_models(
    settings: EngineSettings, loaded: set[str], chat_context: int | None = None
) -> list[dict[str, Any]]:
    """The model objects of every loaded role (chat by its served name, others by theirs).

    The chat model carries ``max_model_len``, its context window (prompt + completion), at the
    top level of the object where vLLM reports it, so clients size their prompts to fit.
    """
    models = []
    for role in ROLES:
        if role not in loaded:
            continue
        role_settings = settings.role(role)
        names = getattr(role_settings, "served_names", None) or [
            getattr(role_settings, "served_name", role)
        ]
        for name in names:
            model: dict[str, Any] = {"id": name, "object": "model", "created": CREATED,
                                     "owned_by": OWNER}
            if role == "chat" and chat_context is not None:
                model["max_model_len"] = chat_context
            model["masque"] = {"role": role}
            models.append(model)
    return models


def _models(request: web.Request) -> list[dict[str, Any]]:
    registry = request.app[REGISTRY]
    loaded = {role for role in ROLES if registry.has(role)}
    context = registry.get("chat").context_tokens if "chat" in loaded else None
    return served_models(request.app[SETTINGS], loaded, context)


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """The models this server answers to (OpenAI list shape)."""
    return web.json_response({"object": "list", "data": _models(request)})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    """One model object, or 404."""
    name = request.match_info["model"]
    for model in _models(request):
        if model["id"] == name:
            return web.json_response(model)
    raise not_found(f"The model {name!r} does not exist.", "model", "model_not_found")


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 once every configured model has loaded (or "degraded", when allowed), else 503 "loading" or
    "failed"; says each role's state, and which failed with what error."""
    body = request.app[REGISTRY].status()
    return web.json_response(body, status=200 if body["status"] in (OK, DEGRADED) else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    payload = request.app[METRICS].render(request.app[REGISTRY])
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE})
