"""POST /v1/embeddings: OpenAI's request and response shapes."""

from __future__ import annotations

import base64

import numpy as np
from aiohttp import web

from engine.backends.embeddings import InputTooLong
from engine.errors import invalid_request, read_json
from engine.protocol.embeddings import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from engine.routes import REGISTRY, SETTINGS
from engine.routes.served import check_model

routes = web.RouteTableDef()


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """Floats, or OpenAI's base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """Embed one string or a list of strings; vectors are unit length."""
    settings = request.app[SETTINGS]
    role = settings.embeddings
    body = EmbeddingRequest.model_validate(await read_json(request))
    check_model(body.model, role, "embeddings")
    texts = body.texts()
    if len(texts) > role.max_inputs:
        raise invalid_request(f"input has {len(texts)} items; the limit is {role.max_inputs}.",
                              "input", "too_many_inputs")
    registry = request.app[REGISTRY]
    backend = registry.get("embeddings")
    if body.dimensions is not None and body.dimensions != backend.dimensions:
        raise invalid_request(
            f"This model gives {backend.dimensions}-dimensional vectors and cannot shorten "
            "them; leave dimensions out.", "dimensions", "unsupported_value",
        )
    try:
        vectors, used = await registry.queue("embeddings").run(backend.embed_with_usage, texts)
    except InputTooLong as exc:
        raise invalid_request(str(exc), "input", "context_length_exceeded") from None
    response = EmbeddingResponse(
        data=[
            EmbeddingData(index=i, embedding=_encode(vector, body.encoding_format))
            for i, vector in enumerate(vectors)
        ],
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=used, total_tokens=used),
    )
    return web.json_response(response.model_dump())
