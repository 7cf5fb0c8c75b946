"""Chat completions on the composed path: the real SmolLM2-135M-Instruct (from its GGUF),
the real Whisper tiny.en for voice parts and a tiny random BLIP captioner for images, all
driven through the official openai client."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import jiwer
import numpy as np
import openai
from PIL import Image

from tests.engine.conftest import espeak_wav

MODEL = "masque-chat"
PIRATE = [
    {"role": "system", "content": "You are a pirate captain. Answer in one short sentence."},
    {"role": "user", "content": "Where is the treasure?"},
]


def image_data_url(width: int = 48, height: int = 40) -> str:
    pixels = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_text_completion_has_openai_shape_and_usage(openai_client: openai.OpenAI) -> None:
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=24, temperature=0
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.message.content.split()) >= 3  # a real model writes real words
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage.prompt_tokens > 20  # the system + user turns through the chat template
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["masque"] == {"fusion": "composed", "transcripts": [], "captions": []}


def test_max_tokens_ends_with_length(openai_client: openai.OpenAI) -> None:
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=3, temperature=0
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_greedy_is_deterministic_and_stream_matches(openai_client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": PIRATE, "max_tokens": 20, "temperature": 0}
    first = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    second = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == first
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert len(chunks) > 5  # token by token, not one blob


def test_stream_usage_chunk_and_masque(openai_client: openai.OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].model_extra["masque"]["fusion"] == "composed"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()


def test_seeded_sampling_repeats_and_n_choices_differ(openai_client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": PIRATE, "max_tokens": 16, "temperature": 1.2,
              "top_p": 0.95, "seed": 1234, "n": 3}
    first = openai_client.chat.completions.create(**kwargs)
    second = openai_client.chat.completions.create(**kwargs)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in second.choices]
    assert len(set(texts)) > 1  # each choice has its own seed
    # usage counts the prompt once and the completions of all three choices
    single = openai_client.chat.completions.create(**{**kwargs, "n": 1})
    assert single.choices[0].message.content == texts[0]  # choice 0 uses the request's seed
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    assert single.usage.completion_tokens < first.usage.completion_tokens <= 3 * 16


def test_stop_string_cuts_the_text(openai_client: openai.OpenAI) -> None:
    base = {"model": MODEL, "messages": PIRATE, "max_tokens": 24, "temperature": 0}
    full = openai_client.chat.completions.create(**base).choices[0].message.content
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[2]
    reply = openai_client.chat.completions.create(**base, stop=[stop, "@@never@@"])
    cut = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert stop not in cut
    assert full.startswith(cut)
    assert len(cut) < len(full)


async def test_async_client_concurrent_requests_share_the_batch(
    async_openai_client: openai.AsyncOpenAI, engine: object
) -> None:
    solo = await async_openai_client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=12, temperature=0
    )
    questions = ["Where is the treasure?", "Who are you?", "What ship is this?", "Any rum?"]
    replies = await asyncio.gather(*(
        async_openai_client.chat.completions.create(
            model=MODEL, max_tokens=12, temperature=0,
            messages=[PIRATE[0], {"role": "user", "content": q}],
        )
        for q in questions
    ))
    # batched greedy decoding gives the same text as decoding alone
    assert replies[0].choices[0].message.content == solo.choices[0].message.content
    assert all(r.choices[0].message.content for r in replies)
    assert engine.registry.get("chat").batcher.peak_batch >= 2  # they shared decode steps


async def test_async_streaming(async_openai_client: openai.AsyncOpenAI) -> None:
    stream = await async_openai_client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=10, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
    assert "".join(pieces).strip()


def test_image_part_is_captioned_into_the_turn(openai_client: openai.OpenAI) -> None:
    messages = [PIRATE[0], {"role": "user", "content": [
        {"type": "text", "text": "What do you see here?"},
        {"type": "image_url", "image_url": {"url": image_data_url()}},
    ]}]
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    masque = reply.model_extra["masque"]
    assert masque["fusion"] == "composed"
    assert len(masque["captions"]) == 1
    assert masque["captions"][0]["message"] == 1
    assert masque["captions"][0]["text"]
    plain = openai_client.chat.completions.create(
        model=MODEL, messages=[PIRATE[0], {"role": "user", "content": "What do you see here?"}],
        max_tokens=8, temperature=0,
    )
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens  # the caption went in


def test_voice_part_is_transcribed_into_the_turn(
    openai_client: openai.OpenAI, tmp_path: Path
) -> None:
    said = "the dragon guards the golden treasure in the mountain"
    audio = base64.b64encode(espeak_wav(said, tmp_path / "clip.wav")).decode()
    messages = [PIRATE[0], {"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
    ]}]
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    masque = reply.model_extra["masque"]
    assert [t["message"] for t in masque["transcripts"]] == [1]
    heard = masque["transcripts"][0]["text"].lower().strip(" .")
    assert jiwer.wer(said, heard) < 0.2
    assert reply.choices[0].message.content.strip()
