"""Chat completions on the native path: a tiny random Qwen2.5-Omni thinker, built from a
config and loaded through from_pretrained, takes text, image and audio parts itself."""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
import openai
import pytest
from PIL import Image

from tests.engine.conftest import RunningEngine, make_client

MODEL = "masque-omni"
SAMPLE_RATE = 16000


def png_url(seed: int, size: int = 64) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def tone_wav(seconds: float = 2.0, hz: float = 440.0) -> str:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    samples = (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def omni_client(native_engine: RunningEngine) -> openai.OpenAI:
    return make_client(native_engine.url)


def multimodal_messages(image_seed: int = 0) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url(image_seed)}},
        {"type": "input_audio", "input_audio": {"data": tone_wav(), "format": "wav"}},
        {"type": "text", "text": "What do you see and hear?"},
    ]}]


def test_native_fusion_reads_image_and_audio(omni_client: openai.OpenAI) -> None:
    reply = omni_client.chat.completions.create(
        model=MODEL, messages=multimodal_messages(), max_tokens=10, temperature=0
    )
    assert reply.model_extra["masque"] == {"fusion": "native", "transcripts": [], "captions": []}
    assert reply.usage.completion_tokens > 0
    text_only = omni_client.chat.completions.create(
        model=MODEL, max_tokens=10, temperature=0,
        messages=[{"role": "user", "content": "What do you see and hear?"}],
    )
    # the image and audio placeholders expanded into many encoder tokens
    assert reply.usage.prompt_tokens > text_only.usage.prompt_tokens + 20


def test_native_output_depends_on_the_image(omni_client: openai.OpenAI) -> None:
    def reply_text(seed: int) -> str:
        reply = omni_client.chat.completions.create(
            model=MODEL, messages=multimodal_messages(seed), max_tokens=12, temperature=0
        )
        return reply.choices[0].message.content

    assert reply_text(0) == reply_text(0)  # greedy is deterministic
    assert len({reply_text(seed) for seed in (0, 1, 2)}) > 1  # the vision encoder is in the loop


def test_native_streaming(omni_client: openai.OpenAI) -> None:
    stream = omni_client.chat.completions.create(
        model=MODEL, messages=multimodal_messages(), max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["masque"]["fusion"] == "native"
    assert chunks[-1].usage.completion_tokens == 8
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"


def test_native_unknown_model_is_404(omni_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        omni_client.chat.completions.create(
            model="masque-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
