"""vLLM's token-counting surface on our engine: ``max_model_len`` in /v1/models, POST /tokenize
and /detokenize at the server root, counting exactly what the chat route counts."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.engine.conftest import Reply, RunningEngine, make_client, request
from tests.engine.test_chat_errors import assert_error, png_bytes
from tests.engine.test_chat_native import multimodal_messages

MODEL = "masque-chat"
STORY = [
    {"role": "system", "content": "You are Wren, a lantern-keeper who speaks in short riddles."},
    {"role": "user", "content": "Who goes there, in the fog?"},
    {"role": "assistant", "content": "*raises the lantern* Only the one who asks."},
    {"role": "user", "content": [{"type": "text", "text": "Then tell me:"},
                                 {"type": "text", "text": "what burns without fire?"}]},
]


async def tokenize(url: str, body: Any = None, raw: bytes | None = None,
                   path: str = "/tokenize") -> Reply:
    return await request("POST", f"{url}{path}", body=body, data=raw)


def prompt_tokens(client: openai.OpenAI, model: str, messages: list[dict]) -> int:
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=1,
                                           temperature=0)
    return reply.usage.prompt_tokens


def test_models_report_the_context_window(openai_client: openai.OpenAI,
                                          engine: RunningEngine) -> None:
    context = engine.registry.get("chat").context_tokens
    listed = {model.id: model.model_extra for model in openai_client.models.list().data}
    assert listed[MODEL]["max_model_len"] == context
    assert "max_model_len" not in listed["whisper-1"]  # only the chat model has a window
    assert openai_client.models.retrieve(MODEL).model_extra["max_model_len"] == context


async def test_chat_count_is_the_chat_routes_prompt(engine_url: str, engine: RunningEngine,
                                                    openai_client: openai.OpenAI) -> None:
    reply = await tokenize(engine_url, {"model": MODEL, "messages": STORY})
    assert reply.status == 200, reply.body
    assert set(reply.body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert reply.body["count"] == len(reply.body["tokens"]) == prompt_tokens(
        openai_client, MODEL, STORY)
    assert reply.body["max_model_len"] == engine.registry.get("chat").context_tokens
    assert reply.body["token_strs"] is None


async def test_chat_flags_change_the_count(engine_url: str) -> None:
    async def count(**flags: Any) -> int:
        reply = await tokenize(engine_url, {"model": MODEL, "messages": STORY, **flags})
        assert reply.status == 200, reply.body
        return reply.body["count"]

    full = await count()
    assert await count(add_generation_prompt=False) < full
    assert await count(add_generation_prompt=True) == full
    assert await count(add_generation_prompt=False, continue_final_message=True) < full
    both = await tokenize(engine_url, {"model": MODEL, "messages": STORY,
                                       "add_generation_prompt": True,
                                       "continue_final_message": True})
    assert_error(both, 400)


async def test_prompt_form_and_token_strings(engine_url: str, engine: RunningEngine) -> None:
    tokenizer = engine.registry.get("chat").tokenizer
    text = "The lantern flickers; Wren smiles."
    reply = await tokenize(engine_url, {"prompt": text, "return_token_strs": True})  # model optional
    assert reply.status == 200, reply.body
    assert reply.body["tokens"] == tokenizer(text, add_special_tokens=True)["input_ids"]
    assert reply.body["count"] == len(reply.body["tokens"])
    assert reply.body["token_strs"] == tokenizer.convert_ids_to_tokens(reply.body["tokens"])
    plain = await tokenize(engine_url, {"model": MODEL, "prompt": text, "add_special_tokens": False})
    assert plain.body["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]


async def test_detokenize_round_trip(engine_url: str) -> None:
    text = "What burns without fire?"
    ids = (await tokenize(engine_url, {"model": MODEL, "prompt": text,
                                       "add_special_tokens": False})).body["tokens"]
    reply = await tokenize(engine_url, {"model": MODEL, "tokens": ids}, path="/detokenize")
    assert reply.status == 200, reply.body
    assert reply.body == {"prompt": text}
    assert_error(await tokenize(engine_url, {"tokens": [10**9]}, path="/detokenize"), 400,
                 "tokens")
    assert_error(await tokenize(engine_url, {"tokens": [-1]}, path="/detokenize"), 400)


@pytest.mark.parametrize(("body", "raw", "param", "code"), [
    (None, b"{broken", None, "invalid_json"),
    (None, b"", None, "empty_body"),
    (None, b"[1, 2]", None, "invalid_json"),
    ({"model": MODEL}, None, None, "missing_required_parameter"),
    ({"model": MODEL, "messages": []}, None, "messages", "invalid_value"),
    ({"model": MODEL, "messages": [{"content": "hi"}]}, None, "messages.0.role", None),
    ({"model": MODEL, "prompt": 42}, None, "prompt", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video_url"}]}]},
     None, None, None),
])
async def test_bad_bodies_are_400_in_the_openai_shape(engine_url: str, body: Any, raw: Any,
                                                      param: str | None, code: str | None) -> None:
    error = assert_error(await tokenize(engine_url, body, raw), 400, param, code)
    assert error["type"] == "invalid_request_error"


async def test_unknown_model_is_404(engine_url: str) -> None:
    for path, body in (("/tokenize", {"model": "gpt-9", "prompt": "hi"}),
                       ("/tokenize", {"model": "gpt-9", "messages": STORY}),
                       ("/detokenize", {"model": "gpt-9", "tokens": [1]})):
        assert_error(await tokenize(engine_url, body, path=path), 404, "model", "model_not_found")


async def test_served_at_the_root_only_as_vllm_does(engine_url: str) -> None:
    assert_error(await tokenize(engine_url, {"prompt": "hi"}, path="/v1/tokenize"), 404)
    assert_error(await request("GET", f"{engine_url}/tokenize"), 405)


async def test_composed_media_count_as_the_chat_sees_them(engine_url: str,
                                                          openai_client: openai.OpenAI) -> None:
    import base64

    url = "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Look at this:"},
        {"type": "image_url", "image_url": {"url": url}},
    ]}]
    reply = await tokenize(engine_url, {"model": MODEL, "messages": messages})
    assert reply.status == 200, reply.body
    # the caption is merged into the text, so the image costs more than the text alone
    text_only = await tokenize(engine_url, {"model": MODEL, "messages": [
        {"role": "user", "content": "Look at this:"}]})
    assert reply.body["count"] > text_only.body["count"]
    assert reply.body["count"] == prompt_tokens(openai_client, MODEL, messages)
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}
    assert_error(await tokenize(engine_url, {"model": MODEL, "messages": [
        {"role": "user", "content": [bad]}]}), 400, "messages[0].content[0]", "invalid_base64")


async def test_native_media_count_as_the_chat_sees_them(native_engine: RunningEngine) -> None:
    messages = multimodal_messages()
    reply = await tokenize(native_engine.url, {"model": "masque-omni", "messages": messages})
    assert reply.status == 200, reply.body
    client = make_client(native_engine.url)
    try:
        assert reply.body["count"] == prompt_tokens(client, "masque-omni", messages)
    finally:
        client.close()
    refused = await tokenize(native_engine.url, {"model": "masque-omni", "messages": messages,
                                                 "add_generation_prompt": False})
    assert_error(refused, 400, "messages")


async def test_length_errors_say_maximum_context_length(engine_url: str,
                                                        engine_settings: Any) -> None:
    user = [{"role": "user", "content": "Hello there."}]
    huge = [{"role": "user", "content": "treasure " * (engine_settings.chat.max_context_tokens + 10)}]
    asked = engine_settings.chat.max_new_tokens + 1
    for body in ({"model": MODEL, "messages": user, "max_tokens": asked},
                 {"model": MODEL, "messages": huge}):
        reply = await request("POST", f"{engine_url}/v1/chat/completions", body=body)
        error = assert_error(reply, 400, code="context_length_exceeded")
        assert "maximum context length" in error["message"]
