"""Fusion helpers: remote image URLs (only when allowed, within limits) and the composed
markers, without a model server."""

from __future__ import annotations

import io

import pytest
from aiohttp import web
from PIL import Image

from engine.errors import APIError
from engine.fusion import AUDIO_MARKER, IMAGE_MARKER, decode_image, image_bytes
from engine.protocol.chat import ImagePart
from engine.settings import LimitSettings


def png(size: tuple[int, int] = (20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def picture_server():  # noqa: ANN201 - yields a base URL
    async def picture(request: web.Request) -> web.Response:
        return web.Response(body=png(), content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", picture)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def part(url: str) -> ImagePart:
    return ImagePart(type="image_url", image_url={"url": url})


async def test_remote_urls_are_fetched_only_when_allowed(picture_server: str) -> None:
    url = f"{picture_server}/cat.png"
    with pytest.raises(APIError) as refused:
        await image_bytes(part(url), LimitSettings(), "p")
    assert refused.value.status == 400 and refused.value.code == "remote_url_disabled"
    allowed = LimitSettings(allow_remote_urls=True)
    image = decode_image(await image_bytes(part(url), allowed, "p"), allowed, "p")
    assert image.size == (20, 10) and image.mode == "RGB"
    with pytest.raises(APIError) as missing:
        await image_bytes(part(f"{picture_server}/nope.png"), allowed, "p")
    assert missing.value.status == 400 and "404" in missing.value.message


def test_image_limits() -> None:
    small = LimitSettings(max_image_bytes=1024, max_image_pixels=100)
    with pytest.raises(APIError) as too_many_pixels:
        decode_image(png((20, 10)), small, "p")
    assert too_many_pixels.value.status == 413
    with pytest.raises(APIError) as too_many_bytes:
        decode_image(png((20, 10)) + b"\0" * 2048, small, "p")
    assert too_many_bytes.value.status == 413
    noisy = io.BytesIO()
    Image.frombytes("L", (64, 64), bytes(range(256)) * 16).save(noisy, format="PNG")
    truncated = noisy.getvalue()[: len(noisy.getvalue()) // 2]
    with pytest.raises(APIError) as broken:
        decode_image(truncated, LimitSettings(), "p")
    assert broken.value.status == 400 and broken.value.code == "invalid_image"


def test_markers_are_clear() -> None:
    assert IMAGE_MARKER.format(text="a red square") == "[Image: a red square]"
    assert AUDIO_MARKER.format(text="hello").startswith("[Voice message")
