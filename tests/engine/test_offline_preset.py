"""The offline preset shows no output of random weights: no captioner, no scene art, and an image sent
to chat becomes an honest "[An image was shared: W×H]" that invents nothing."""

from __future__ import annotations

import base64
import io

from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from engine.app import create_app
from engine.fusion import UNSEEN_IMAGE_MARKER, compose, parse_media
from engine.protocol.chat import ChatMessage
from engine.registry import Registry
from engine.settings import GPU_PRESET, OFFLINE_PRESET, EngineSettings
from tests.engine.conftest import offline_settings

RANDOM_WEIGHT_MODELS = ("tiny:",)  # the tiny random models: tests only


def test_no_preset_uses_a_random_weight_model():
    for preset in (OFFLINE_PRESET, GPU_PRESET):
        for role, values in preset.items():
            assert not str(values.get("model", "")).startswith(RANDOM_WEIGHT_MODELS), role
    settings = EngineSettings(preset="offline")
    assert settings.caption.model == "" and settings.images.model == ""
    assert settings.chat.model and settings.stt.model and settings.tts.model and settings.embeddings.model


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def test_an_image_without_a_captioner_is_named_by_its_size_and_nothing_is_invented():
    settings = offline_settings()
    registry = Registry(settings)  # nothing loaded: the caption role is off, so it is never asked
    messages = [ChatMessage.model_validate({"role": "user", "content": [
        {"type": "text", "text": "Ann: look at this"},
        {"type": "image_url", "image_url": {"url": png_data_url(64, 48)}},
    ]})]
    composed, report = await compose(await parse_media(messages, settings.limits), registry)
    assert composed == [{"role": "user", "content": "Ann: look at this\n" +
                         UNSEEN_IMAGE_MARKER.format(width=64, height=48)}]
    assert report["captions"] == []  # no caption reaches the bot (it would be quoted as "seen")


async def test_the_offline_engine_refuses_scene_art_at_once():
    # the preset's image and caption roles, with the other roles off too (nothing to load)
    settings = offline_settings(chat={"model": ""}, stt={"model": ""}, tts={"model": ""},
                                embeddings={"model": ""})
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/v1/images/generations",
                                     json={"prompt": "a lighthouse", "model": "masque-art"})
        assert response.status == 503
        # it will not come back by waiting: clients are told not to retry
        assert response.headers["x-should-retry"] == "false" and "Retry-After" not in response.headers
        body = await response.json()
        assert body["error"]["code"] == "role_disabled" and "images" in body["error"]["message"]
