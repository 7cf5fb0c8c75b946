"""The optional llama.cpp chat backend on the same packaged GGUF (skipped without
llama-cpp-python, which compiles for about 11 minutes and is not a required dependency)."""

from __future__ import annotations

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
