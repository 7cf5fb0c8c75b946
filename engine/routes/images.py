"""POST /v1/images/generations: OpenAI's request, ``b64_json`` PNGs back."""

from __future__ import annotations

import base64
import io
import time

from aiohttp import web

from engine.backends.images import ContentBlocked, GeneratedImages
from engine.errors import invalid_request, read_json
from engine.protocol.images import ImageData, ImageExtras, ImageRequest, ImagesResponse, parse_size
from engine.routes import REGISTRY, SETTINGS
from engine.routes.served import check_model
from engine.settings import EngineSettings, ImageSettings

routes = web.RouteTableDef()

SIDE_MULTIPLE = 8  # latent diffusion VAEs downsample by 8
MIN_SIDE = 8


def _size(body: ImageRequest, role: ImageSettings, settings: EngineSettings,
          native: int) -> tuple[int, int]:
    """Width and height from ``size`` (or the default), or a 400 saying what is allowed.
    ``native`` is the loaded model's own resolution, behind "auto" and the default limit."""
    asked = body.size if body.size not in (None, "", "auto") else role.default_size
    if asked == "auto":
        asked = f"{native}x{native}"
    try:
        width, height = parse_size(asked)
    except ValueError as exc:
        raise invalid_request(str(exc), "size", "invalid_size") from None
    max_side = role.max_side or 2 * native
    for side in (width, height):
        if side < MIN_SIDE or side > max_side or side % SIDE_MULTIPLE:
            raise invalid_request(
                f"size {asked!r}: each side must be a multiple of {SIDE_MULTIPLE} between "
                f"{MIN_SIDE} and {max_side}.", "size", "invalid_size",
            )
    if width * height > settings.limits.max_image_pixels:
        raise invalid_request(
            f"size {asked!r} is more than {settings.limits.max_image_pixels} pixels.",
            "size", "invalid_size",
        )
    return width, height


def _check(body: ImageRequest, role: ImageSettings) -> int:
    """Validate the fields that depend on this server's limits; return the step count."""
    if body.model is not None:
        check_model(body.model, role, "images")
    if body.response_format == "url":
        raise invalid_request("This server returns images inline only: use "
                              "response_format 'b64_json'.", "response_format", "unsupported_value")
    if body.n > role.max_n:
        raise invalid_request(f"n is {body.n}; this server paints at most {role.max_n} images "
                              "per request.", "n", "invalid_value")
    steps = body.steps or role.default_steps
    if steps > role.max_steps:
        raise invalid_request(f"steps is {steps}; the limit is {role.max_steps}.", "steps",
                              "invalid_value")
    return steps


def _png_b64(image: object) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@routes.post("/v1/images/generations")
async def generations(request: web.Request) -> web.Response:
    """Paint ``n`` images for ``prompt`` (extensions: negative_prompt, seed, steps, safety)."""
    settings: EngineSettings = request.app[SETTINGS]
    role = settings.images
    body = ImageRequest.model_validate(await read_json(request))
    steps = _check(body, role)
    registry = request.app[REGISTRY]
    backend = registry.get("images")
    width, height = _size(body, role, settings, backend.native_size)
    safety = role.safety_default if body.safety is None else body.safety

    def work() -> tuple[GeneratedImages, list[str]]:
        result = backend.generate(
            body.prompt, width, height, n=body.n, negative_prompt=body.negative_prompt,
            seed=body.seed, steps=steps, safety=safety,
        )
        return result, [_png_b64(image) for image in result.images]

    try:
        result, encoded = await registry.queue("images").run(work)
    except ContentBlocked as exc:
        raise invalid_request(str(exc), "prompt", "content_policy_violation") from None
    response = ImagesResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=b64) for b64 in encoded],
        size=f"{width}x{height}",
        masque=ImageExtras(seeds=result.seeds, steps=result.steps, safety=safety),
    )
    return web.json_response(response.model_dump())
