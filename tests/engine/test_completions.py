"""POST /v1/completions (raw text, no chat template) on the real SmolLM2-135M, through the
official openai client (``client.completions.create``) and raw requests shaped like
SillyTavern's Text Completion mode."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from engine.errors import APIError
from engine.routes.completions import encode
from tests.engine.conftest import RunningEngine, make_client, request
from tests.engine.test_server import AUTH, _wait_idle  # waits as the chat route's tests do

MODEL = "masque-chat"
STORY = "Once upon a time, in a small village by the sea, there lived"
DAYS = "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,"
GREEDY = {"model": MODEL, "temperature": 0}


def complete(client: openai.OpenAI, **kwargs: object) -> openai.types.Completion:
    return client.completions.create(**{**GREEDY, "prompt": STORY, "max_tokens": 20, **kwargs})


def streamed_text(client: openai.OpenAI, **kwargs: object) -> tuple[str, list]:
    chunks = list(client.completions.create(
        **{**GREEDY, "prompt": STORY, "max_tokens": 20, **kwargs}, stream=True))
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices), chunks


async def prompt_count(engine_url: str, prompt: str) -> list[int]:
    reply = await request("POST", f"{engine_url}/tokenize", body={"prompt": prompt})
    return reply.body["tokens"]


class TextOnlyBackend:
    """A backend that prepares raw text itself (as the omni backend's processor does)."""

    tokenizer = None

    def prepare_text(self, text: str) -> list[str]:
        return text.split()


def test_a_backend_with_prepare_text_prepares_the_prompt_itself() -> None:
    prompt = encode(TextOnlyBackend(), "three small words")
    assert prompt.prepared == ["three", "small", "words"] and prompt.text == "three small words"
    with pytest.raises(APIError) as caught:
        encode(TextOnlyBackend(), [1, 2, 3])
    assert caught.value.status == 400 and caught.value.param == "prompt"


async def test_text_completion_has_openai_shape_and_usage(
    openai_client: openai.OpenAI, engine_url: str
) -> None:
    reply = complete(openai_client)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.index == 0 and choice.logprobs is None
    assert len(choice.text.split()) >= 3  # a real model continues the story with real words
    assert not choice.text.startswith(STORY)  # no echo unless asked
    assert choice.finish_reason in {"stop", "length"}
    # the raw text, no chat template: exactly the tokens /tokenize counts for the prompt
    assert reply.usage.prompt_tokens == len(await prompt_count(engine_url, STORY))
    assert 0 < reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_max_tokens_defaults_to_16_and_ends_with_length(openai_client: openai.OpenAI) -> None:
    reply = openai_client.completions.create(model=MODEL, prompt=DAYS, temperature=0)
    assert reply.usage.completion_tokens == 16
    assert reply.choices[0].finish_reason == "length"
    short = complete(openai_client, prompt=DAYS, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_stream_matches_the_whole_text_and_ends_with_usage(openai_client: openai.OpenAI) -> None:
    whole = complete(openai_client).choices[0].text
    text, chunks = streamed_text(openai_client, stream_options={"include_usage": True})
    assert text == whole
    assert len(chunks) > 5  # token by token, not one blob
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    finishing = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason in {"stop", "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.prompt_tokens == complete(openai_client).usage.prompt_tokens


def test_echo_prepends_the_prompt(openai_client: openai.OpenAI) -> None:
    plain = complete(openai_client).choices[0].text
    echoed = complete(openai_client, echo=True)
    assert echoed.choices[0].text == STORY + plain
    text, _ = streamed_text(openai_client, echo=True)
    assert text == STORY + plain


async def test_token_id_prompts_complete_as_their_text(
    openai_client: openai.OpenAI, engine_url: str
) -> None:
    ids = await prompt_count(engine_url, STORY)
    as_text = complete(openai_client)
    as_ids = complete(openai_client, prompt=ids, echo=True)
    assert as_ids.choices[0].text == STORY + as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == len(ids)
    listed = complete(openai_client, prompt=[ids, ids[:5]])
    assert listed.choices[0].text == as_text.choices[0].text and len(listed.choices) == 2


def test_stop_string_cuts_the_text(openai_client: openai.OpenAI) -> None:
    full = complete(openai_client, max_tokens=24).choices[0].text
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[2]
    reply = complete(openai_client, max_tokens=24, stop=[stop, "@@never@@"])
    cut = reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"
    assert stop not in cut and full.startswith(cut) and len(cut) < len(full)
    streamed, _ = streamed_text(openai_client, max_tokens=24, stop=stop)
    assert streamed == cut


def test_n_and_a_list_of_prompts_number_choices_prompt_major(openai_client: openai.OpenAI) -> None:
    prompts = [STORY, DAYS]
    reply = complete(openai_client, prompt=prompts, n=2, echo=True, max_tokens=8)
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    starts = [next(p for p in prompts if c.text.startswith(p)) for c in reply.choices]
    assert starts == [STORY, STORY, DAYS, DAYS]
    alone = complete(openai_client, prompt=DAYS, echo=True, max_tokens=8)
    assert reply.choices[2].text == alone.choices[0].text  # batched greedy = alone
    assert reply.usage.prompt_tokens == (
        complete(openai_client, max_tokens=1).usage.prompt_tokens + alone.usage.prompt_tokens
    )
    _, chunks = streamed_text(openai_client, prompt=prompts, n=2, max_tokens=8)
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2, 3]


def test_seeded_sampling_repeats_and_choices_differ(openai_client: openai.OpenAI) -> None:
    kwargs = {"temperature": 1.2, "top_p": 0.95, "seed": 1234, "n": 3, "max_tokens": 16}
    first = [choice.text for choice in complete(openai_client, **kwargs).choices]
    assert first == [choice.text for choice in complete(openai_client, **kwargs).choices]
    assert len(set(first)) > 1  # each choice has its own seed
    other = [choice.text for choice in complete(openai_client, **{**kwargs, "seed": 99}).choices]
    assert other != first


def test_extra_body_samplers_reach_the_sampler(openai_client: openai.OpenAI) -> None:
    greedy = complete(openai_client, prompt=DAYS, max_tokens=24).choices[0].text
    sampled = {"temperature": 1.5, "seed": 3, "prompt": DAYS, "max_tokens": 24}
    assert complete(openai_client, **sampled).choices[0].text != greedy  # a real draw
    for extra in ({"top_k": 1}, {"min_p": 1}):  # only the top token survives: greedy
        assert complete(openai_client, **sampled, extra_body=extra).choices[0].text == greedy
    penalised = complete(openai_client, prompt=DAYS, max_tokens=24,
                         extra_body={"repetition_penalty": 1.3})
    assert penalised.choices[0].text != greedy


def test_an_over_long_prompt_is_context_length_exceeded(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        complete(openai_client, prompt="dragon " * 3000)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "maximum context length" in error["message"]


def test_a_wrong_model_is_404(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        complete(openai_client, model="gpt-3.5-turbo-instruct")
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0), ("temperature", 3),
    ("max_tokens", 0), ("n", 99), ("prompt", []), ("logprobs", 2), ("suffix", "The end."),
    ("best_of", 3),
])
async def test_a_bad_or_unsupported_param_is_400_naming_it(
    engine_url: str, field: str, value: object
) -> None:
    body = {"model": MODEL, "prompt": STORY, "max_tokens": 2, field: value}
    reply = await request("POST", f"{engine_url}/v1/completions", body=body)
    assert reply.status == 400, reply.body
    error = reply.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field and field in error["message"]


async def test_a_sillytavern_body_streams(engine_url: str) -> None:
    body = {  # the shape of SillyTavern's Text Completion request to a vLLM server
        "model": MODEL, "prompt": STORY, "max_tokens": 24, "max_new_tokens": 24,
        "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "repetition_penalty": 1.1, "frequency_penalty": 0, "presence_penalty": 0,
        "stop": ["\nUser:", "\nAssistant:", "</s>", "<|im_end|>", "\n\n\n", "\n***"],
        "stream": True, "truncation_length": 2048, "skip_special_tokens": True,
        "include_stop_str_in_output": False, "ignore_eos": False,
        "spaces_between_special_tokens": True, "n": 1, "seed": 5, "logit_bias": {},
        "add_bos_token": True, "ban_eos_token": False, "typical_p": 1, "min_tokens": 0,
    }
    events = []
    async with aiohttp.ClientSession() as session, session.post(
        f"{engine_url}/v1/completions", json=body
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert len(text.split()) >= 3
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


async def test_a_client_hanging_up_stops_generation(engine: RunningEngine) -> None:
    backend = engine.registry.get("chat")
    counter = engine.metrics.tokens.labels("chat")
    await _wait_idle(engine)
    body = {**GREEDY, "prompt": STORY, "max_tokens": 400, "stream": True,
            "extra": "ignored"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{engine.url}/v1/completions", json=body)
        assert resp.status == 200
        await resp.content.readline()  # the first chunk: generation is running
        await resp.content.readline()
        assert backend.queue_depth() == 1  # still generating when the client leaves
        resp.close()
    assert await _wait_idle(engine) < 5 and backend.queue_depth() == 0
    decoded = counter._value.get()
    await asyncio.sleep(0.5)
    assert counter._value.get() == decoded, "a sequence still decodes after its client left"


async def test_the_api_key_and_the_full_queue_apply_as_to_chat(strict_engine: RunningEngine) -> None:
    url, body = f"{strict_engine.url}/v1/completions", {"model": MODEL, "prompt": STORY}
    assert (await request("POST", url, body=body)).status == 401  # no key
    async with aiohttp.ClientSession(headers=AUTH) as session:
        resp = await session.post(url, json={**body, "max_tokens": 400, "stream": True})
        assert resp.status == 200
        await resp.content.readline()  # generating: the one-job queue is full
        refused = await request("POST", url, body=body, headers=AUTH)
        resp.close()
    assert refused.status == 503 and refused.body["error"]["code"] == "queue_full"
    await _wait_idle(strict_engine)
    again = await request("POST", url, body=body, headers=AUTH)
    assert again.status == 200 and again.body["choices"][0]["text"]  # the slot came back


def test_the_omni_backend_prepares_raw_text_itself(
    native_engine: RunningEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = native_engine.registry.get("chat")
    prepared: list[str] = []
    prepare_text = backend.prepare_text
    monkeypatch.setattr(backend, "prepare_text",
                        lambda text: (prepared.append(text), prepare_text(text))[1])
    client = make_client(native_engine.url)
    reply = client.completions.create(model="masque-omni", prompt=STORY, max_tokens=4,
                                      temperature=0, echo=True)
    assert prepared == [STORY]
    assert reply.usage.prompt_tokens == len(prepare_text(STORY))
    assert reply.choices[0].text.startswith(STORY)
    assert reply.choices[0].finish_reason in {"stop", "length"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="masque-omni", prompt=[1, 2, 3], max_tokens=4)
    assert caught.value.body["param"] == "prompt"
    client.close()
