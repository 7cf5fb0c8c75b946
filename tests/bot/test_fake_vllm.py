"""The fake vLLM itself, checked with the official `openai` client so the bot's window tests can
trust it: vLLM's model card, /tokenize, its tokenizer's counts and its context-length errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes.fake_engine import FailureMode
from tests.fakes.fake_vllm import DEFAULT_MODEL, FakeTokenizer, FakeVLLM

STORY = [
    {"role": "system", "content": "You are Wren, a lantern-keeper who speaks in riddles."},
    {"role": "user", "content": "Who goes there, in the fog?"},
]
ENGLISH = ("Once upon a time, in a quiet village by the sea, there lived an old fisherman "
           "who told stories to anyone who would listen.")


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVLLM]:
    async with FakeVLLM() as server:
        yield server


@pytest.fixture
async def client(vllm: FakeVLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=vllm.url, api_key="k", max_retries=0, timeout=5) as c:
        yield c


async def tokenize(client: openai.AsyncOpenAI, server: FakeVLLM, body: dict[str, Any],
                   path: str = "/tokenize") -> Any:
    """POST at the server root, as the bot does (vLLM serves /tokenize beside /v1)."""
    return await client.post(f"{server.base}{path}", cast_to=object, body=body)


async def test_models_list_is_vllms_model_card(client: openai.AsyncOpenAI) -> None:
    models = (await client.models.list()).data
    assert [m.id for m in models] == [DEFAULT_MODEL]
    card = models[0]
    assert (card.object, card.owned_by) == ("model", "vllm")
    extra = card.model_extra
    assert extra["max_model_len"] == 2048
    assert extra["root"] == DEFAULT_MODEL and extra["parent"] is None
    assert extra["permission"][0]["object"] == "model_permission"


async def test_tokenize_chat_and_prompt_shapes(client: openai.AsyncOpenAI, vllm: FakeVLLM) -> None:
    answer = await tokenize(client, vllm, {"model": DEFAULT_MODEL, "messages": STORY,
                                           "add_generation_prompt": True})
    assert set(answer) == {"count", "max_model_len", "tokens", "token_strs"}
    assert answer["count"] == len(answer["tokens"]) == vllm.count(STORY)
    assert answer["max_model_len"] == 2048 and answer["token_strs"] is None
    spelled = await tokenize(client, vllm, {"messages": STORY, "return_token_strs": True})
    assert "".join(spelled["token_strs"]) == FakeTokenizer.render(STORY)
    assert spelled["tokens"] == answer["tokens"]
    prompt = await tokenize(client, vllm, {"model": DEFAULT_MODEL, "prompt": "Hello, Wren."})
    assert prompt["tokens"][0] == 1  # BOS: add_special_tokens defaults to true for a prompt
    bare = await tokenize(client, vllm, {"prompt": "Hello, Wren.", "add_special_tokens": False})
    assert bare["count"] == prompt["count"] - 1
    detok = await tokenize(client, vllm, {"tokens": bare["tokens"]}, path="/detokenize")
    assert detok == {"prompt": "Hello, Wren."}


async def test_tokenize_refusals(client: openai.AsyncOpenAI, vllm: FakeVLLM) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await tokenize(client, vllm, {"model": DEFAULT_MODEL})
    assert caught.value.body["type"] == "BadRequestError" and caught.value.body["code"] == 400
    with pytest.raises(openai.BadRequestError):
        await tokenize(client, vllm, {"messages": STORY, "add_generation_prompt": True,
                                      "continue_final_message": True})
    with pytest.raises(openai.NotFoundError) as missing:
        await tokenize(client, vllm, {"model": "gpt-9", "prompt": "hi"})
    assert missing.value.body == {"message": "The model `gpt-9` does not exist.",
                                  "type": "NotFoundError", "param": "model", "code": 404}


async def test_a_server_without_tokenize_is_404() -> None:
    async with FakeVLLM(tokenize=False) as server, openai.AsyncOpenAI(
        base_url=server.url, api_key="k", max_retries=0, timeout=5
    ) as c:
        with pytest.raises(openai.NotFoundError) as caught:
            await tokenize(c, server, {"prompt": "hi"})
        assert caught.value.body == {"detail": "Not Found"}  # FastAPI's own 404
        server.tokenize = True  # switchable at run time
        assert (await tokenize(c, server, {"prompt": "hi"}))["count"] == 2


def test_the_tokenizer_is_not_four_characters_a_token() -> None:
    tokenizer = FakeTokenizer()
    words = len(ENGLISH.split())
    assert 1.1 < len(tokenizer.pieces(ENGLISH)) / words < 1.6  # ~1.3 tokens a word
    code = "def f(x): return {k: v**2 for k, v in x.items()}"
    assert len(code) / len(tokenizer.pieces(code)) < 2.5  # code costs far more
    assert len(tokenizer.pieces("龍が空を飛ぶ")) == 6  # one a character
    assert "".join(tokenizer.pieces(ENGLISH)) == ENGLISH
    # the template: <|im_start|> role \n <|im_end|> \n per message, <|im_start|> assistant \n after
    empty = FakeVLLM(max_model_len=64)
    assert empty.count([{"role": "user", "content": ""}], add_generation_prompt=False) == 5
    assert empty.count([{"role": "user", "content": ""}]) == 5 + 4
    assert FakeTokenizer(chars_per_token=2.0).encode("abcdefgh")[1] == ["ab", "cd", "ef", "gh"]


async def test_chat_usage_is_the_counted_prompt(client: openai.AsyncOpenAI, vllm: FakeVLLM) -> None:
    vllm.reply = "The lantern flickers, and Wren smiles."
    reply = await client.chat.completions.create(model=DEFAULT_MODEL, messages=STORY)
    assert reply.choices[0].message.content == vllm.reply
    assert reply.usage.prompt_tokens == vllm.count(STORY) == vllm.prompt_tokens()[0]
    assert reply.usage.completion_tokens == len(vllm.tokenizer.pieces(vllm.reply))
    assert "masque" not in reply.model_extra
    assert vllm.chat_calls[0].record.json["messages"] == STORY and vllm.over_window() == []


async def test_chat_over_the_window_gets_vllms_error() -> None:
    async with FakeVLLM(max_model_len=64) as server, openai.AsyncOpenAI(
        base_url=server.url, api_key="k", max_retries=0, timeout=5
    ) as c:
        prompt = server.count(STORY)
        room = 64 - prompt
        ok = await c.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=room)
        assert ok.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError) as too_many:
            await c.chat.completions.create(model=DEFAULT_MODEL, messages=STORY, max_tokens=room + 1)
        assert too_many.value.body == {
            "message": f"'max_tokens' or 'max_completion_tokens' is too large: {room + 1}. "
                       f"This model's maximum context length is 64 tokens and your request has "
                       f"{prompt} input tokens ({room + 1} > 64 - {prompt}).",
            "type": "BadRequestError", "param": "max_tokens", "code": 400}
        long = [{"role": "user", "content": "treasure " * 80}]
        with pytest.raises(openai.BadRequestError) as too_long:
            await c.chat.completions.create(model=DEFAULT_MODEL, messages=long)
        counted = server.count(long)
        assert too_long.value.body["message"] == (
            f"This model's maximum context length is 64 tokens. However, your request has "
            f"{counted} input tokens. Please reduce the length of the input messages.")
        assert too_long.value.body["param"] == "input_tokens"
        assert [call.prompt_tokens for call in server.over_window()] == [prompt, counted]
        assert all(call.refused for call in server.over_window())
        assert server.chat_calls[0].fits and server.chat_calls[0].refused is None


async def test_legacy_error_style() -> None:
    async with FakeVLLM(max_model_len=64, error_style="legacy") as server, aiohttp.ClientSession() as s:
        prompt = server.count(STORY)
        body = {"model": DEFAULT_MODEL, "messages": STORY, "max_tokens": 100}
        async with s.post(f"{server.url}/chat/completions", json=body) as resp:
            assert resp.status == 400
            assert await resp.json() == {
                "object": "error", "type": "BadRequestError", "param": None, "code": 400,
                "message": f"This model's maximum context length is 64 tokens. However, you "
                           f"requested {prompt + 100} tokens ({prompt} in the messages, 100 in the "
                           "completion). Please reduce the length of the messages or completion."}


async def test_default_max_tokens_is_the_rest_of_the_window() -> None:
    async with FakeVLLM(max_model_len=64, reply="word " * 200) as server, openai.AsyncOpenAI(
        base_url=server.url, api_key="k", max_retries=0, timeout=5
    ) as c:
        reply = await c.chat.completions.create(model=DEFAULT_MODEL, messages=STORY)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 64 - server.count(STORY)
        assert reply.usage.total_tokens == 64


async def test_streaming_sends_a_token_a_chunk(client: openai.AsyncOpenAI, vllm: FakeVLLM) -> None:
    vllm.reply = "Only the one who asks."
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=STORY, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert pieces == vllm.tokenizer.pieces(vllm.reply)
    assert usage.prompt_tokens == vllm.count(STORY)
    assert usage.completion_tokens == len(pieces)


async def test_unknown_model_and_health(client: openai.AsyncOpenAI, vllm: FakeVLLM) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-9", messages=STORY)
    assert caught.value.body["type"] == "NotFoundError"
    assert vllm.chat_calls == []  # refused before counting, as vLLM checks the model first
    async with aiohttp.ClientSession() as session, session.get(f"{vllm.base}/health") as resp:
        assert resp.status == 200 and await resp.read() == b""


async def test_failure_modes_still_apply(client: openai.AsyncOpenAI, vllm: FakeVLLM) -> None:
    await vllm.set_mode(FailureMode.ERROR, times=1, paths=("/tokenize",))
    with pytest.raises(openai.InternalServerError):
        await tokenize(client, vllm, {"prompt": "hi"})
    assert (await tokenize(client, vllm, {"prompt": "hi"}))["count"] == 2
    assert [json.dumps(r.json) for r in vllm.requests_to("/tokenize")][-1] == '{"prompt": "hi"}'
