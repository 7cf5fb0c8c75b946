"""The optional llama.cpp chat backend on the same packaged GGUF (skipped without
llama-cpp-python, which compiles for about 11 minutes and is not a required dependency)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from tests.engine.conftest import RunningEngine, make_client, offline_settings, start_engine, stop_engine

pytest.importorskip("llama_cpp")

MESSAGES = [{"role": "system", "content": "You are a pirate. Answer in one sentence."},
            {"role": "user", "content": "Where is the treasure?"}]


@pytest.fixture(scope="module")
def llamacpp_engine() -> Iterator[RunningEngine]:
    settings = offline_settings(
        chat={"backend": "llamacpp"}, caption={"model": ""}, stt={"model": ""},
        tts={"model": ""}, images={"model": ""}, embeddings={"model": ""},
    )
    running = start_engine(settings)
    yield running
    stop_engine(running)


def test_llamacpp_chat_and_stream(llamacpp_engine: RunningEngine,
                                  openai_client: openai.OpenAI) -> None:
    client = make_client(llamacpp_engine.url)
    reply = client.chat.completions.create(model="masque-chat", messages=MESSAGES,
                                           max_tokens=16, temperature=0)
    text = reply.choices[0].message.content
    assert len(text.split()) >= 3
    assert reply.model_extra["masque"]["fusion"] == "composed"
    # the same tokenizer and chat template as the transformers backend: same prompt size
    reference = openai_client.chat.completions.create(model="masque-chat", messages=MESSAGES,
                                                      max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens == reference.usage.prompt_tokens
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="masque-chat", messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
    ) if chunk.choices)
    assert streamed == text  # greedy: the same text either way
    cut = client.chat.completions.create(model="masque-chat", messages=MESSAGES, max_tokens=3,
                                         temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


@pytest.fixture(scope="module")
def hybrid_engine() -> Iterator[RunningEngine]:
    settings = offline_settings(
        chat={"backend": "hybrid"}, caption={"model": ""}, stt={"model": ""},
        tts={"model": ""}, images={"model": ""}, embeddings={"model": ""},
    )
    running = start_engine(settings)
    yield running
    stop_engine(running)


async def test_hybrid_routes_lone_requests_to_llamacpp_and_crowds_to_the_batch(
    hybrid_engine: RunningEngine,
) -> None:
    backend = hybrid_engine.registry.get("chat")
    client = openai.AsyncOpenAI(base_url=f"{hybrid_engine.url}/v1", api_key="unused",
                                max_retries=0)
    try:
        alone = await client.chat.completions.create(model="masque-chat", messages=MESSAGES,
                                                     max_tokens=8, temperature=0)
        assert alone.choices[0].message.content.strip()
        assert backend.batched.batcher.peak_batch == 0  # the lone request ran on llama.cpp
        crowd = await asyncio.gather(*(
            client.chat.completions.create(model="masque-chat", messages=MESSAGES,
                                           max_tokens=24, temperature=0)
            for _ in range(4)
        ))
        assert all(reply.choices[0].message.content.strip() for reply in crowd)
        assert backend.batched.batcher.peak_batch >= 2  # the others shared the batch
        assert backend.queue_depth() == 0
    finally:
        await client.close()
