"""The CTranslate2 int8 chat backend (``chat.backend = "ct2"``) on the real SmolLM2, through the
official openai client: streaming, stops, samplers (its own and those it hands to the
transformers batcher), seeds, n > 1, batching, hang-ups, and the cached, verified conversion."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from engine.backends import ct2, llm
from tests.engine.conftest import RunningEngine, offline_settings, start_engine, stop_engine

MODEL = "masque-chat"
PIRATE = [
    {"role": "system", "content": "You are a pirate captain. Answer in one short sentence."},
    {"role": "user", "content": "Where is the treasure?"},
]
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


@pytest.fixture(scope="module")
def ct2_engine() -> Iterator[RunningEngine]:
    settings = offline_settings(
        chat={"backend": "ct2"}, caption={"model": ""}, stt={"model": ""}, tts={"model": ""},
        images={"model": ""}, embeddings={"model": ""},
    )
    running = start_engine(settings)
    yield running
    stop_engine(running)


@pytest.fixture(scope="module")
def client(ct2_engine: RunningEngine) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{ct2_engine.url}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    yield client
    client.close()


@pytest.fixture
async def aclient(ct2_engine: RunningEngine) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=f"{ct2_engine.url}/v1", api_key="unused",
                                max_retries=0, timeout=120)
    yield client
    await client.close()


def backend(engine: RunningEngine) -> ct2.CT2Backend:
    return engine.registry.get("chat")


def greedy(client: openai.OpenAI, **kwargs: object) -> str:
    body = {"model": MODEL, "messages": PIRATE, "max_tokens": 20, "temperature": 0, **kwargs}
    return client.chat.completions.create(**body).choices[0].message.content


def test_stream_and_not_give_the_same_greedy_text(
    client: openai.OpenAI, ct2_engine: RunningEngine
) -> None:
    calls = backend(ct2_engine).calls
    text = greedy(client)
    assert len(text.split()) >= 3
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=20, temperature=0, stream=True))
    assert len(chunks) > 5  # token by token
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert backend(ct2_engine).calls >= calls + 2  # both ran on CTranslate2


def test_max_tokens_and_stop_strings(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    full = greedy(client, max_tokens=24)
    stop = " " + full.split()[2]
    reply = client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=24, temperature=0, stop=[stop, "@@never@@"])
    cut = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert stop not in cut and full.startswith(cut) and len(cut) < len(full)


def test_every_sampler_is_accepted_and_honoured(
    client: openai.OpenAI, ct2_engine: RunningEngine
) -> None:
    chat = backend(ct2_engine)
    fast = client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=8, temperature=0.8, top_p=0.9,
        extra_body={"top_k": 20})
    assert fast.choices[0].message.content
    calls = chat.calls
    for extra in ({"min_p": 0.1}, {"frequency_penalty": 0.5}, {"presence_penalty": 0.5}):
        reply = client.chat.completions.create(
            model=MODEL, messages=PIRATE, max_tokens=8, temperature=0.8,
            **({"extra_body": extra} if "min_p" in extra else extra))
        assert reply.choices[0].message.content
    assert chat.calls == calls  # min-p and the penalties went to the transformers batcher
    assert chat.batched.batcher.peak_batch >= 1
    # a seed sends greedy to the batcher too, so the penalty is the only difference
    plain = greedy(client, max_tokens=40, messages=STORY, seed=0)
    assert greedy(client, max_tokens=40, messages=STORY, seed=0, frequency_penalty=1.5) != plain
    assert greedy(client, max_tokens=40, messages=STORY, seed=0, presence_penalty=1.5) != plain


def test_seeds_reproduce_and_n_choices(client: openai.OpenAI) -> None:
    seeded = {"model": MODEL, "messages": PIRATE, "max_tokens": 16, "temperature": 1.2,
              "seed": 1234, "n": 3}
    first = client.chat.completions.create(**seeded)
    second = client.chat.completions.create(**seeded)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1
    unseeded = client.chat.completions.create(
        model=MODEL, messages=PIRATE, max_tokens=12, temperature=1.0, n=3)
    assert [c.index for c in unseeded.choices] == [0, 1, 2]
    assert all(c.message.content for c in unseeded.choices)


async def test_greedy_batch_of_8_equals_batch_of_1(
    aclient: openai.AsyncOpenAI, ct2_engine: RunningEngine
) -> None:
    async def ask() -> str:
        reply = await aclient.chat.completions.create(
            model=MODEL, messages=PIRATE, max_tokens=24, temperature=0)
        return reply.choices[0].message.content

    alone = await ask()
    together = await asyncio.gather(*(ask() for _ in range(8)))
    assert together == [alone] * 8
    assert backend(ct2_engine).peak_batch >= 2  # they shared generate_batch calls


async def test_greedy_prompts_of_different_lengths_keep_their_lone_text(
    aclient: openai.AsyncOpenAI,
) -> None:
    async def ask(question: str) -> str:
        reply = await aclient.chat.completions.create(
            model=MODEL, max_tokens=16, temperature=0,
            messages=[PIRATE[0], {"role": "user", "content": question}])
        return reply.choices[0].message.content

    questions = ["Where is the treasure?", "Who are you?", "What ship is this?", "Any rum?"]
    alone = [await ask(q) for q in questions]
    assert list(await asyncio.gather(*(ask(q) for q in questions))) == alone


async def test_a_client_hanging_up_cancels_only_its_row(
    aclient: openai.AsyncOpenAI, ct2_engine: RunningEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = backend(ct2_engine)
    calls: list[list[ct2._Row]] = []
    generate = chat._generate
    monkeypatch.setattr(chat, "_generate", lambda rows: (calls.append(rows), generate(rows)))
    monkeypatch.setattr(ct2, "GATHER_SECONDS", 0.5)  # both requests in one call, even on a busy CPU
    monkeypatch.setattr(ct2, "GATHER_MAX_SECONDS", 1.0)

    async def open_stream() -> openai.AsyncStream:
        return await aclient.chat.completions.create(
            model=MODEL, messages=STORY, max_tokens=120, temperature=0, stream=True)

    leaving, staying = await asyncio.gather(open_stream(), open_stream())
    async for chunk in leaving:  # until its row has produced text: it is running
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await leaving.close()
    chunks = [chunk async for chunk in staying]
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    rows = [row for call in calls for row in call]
    assert [len(call) for call in calls] == [2]  # one call held both streams
    lengths = sorted(len(row.generated) for row in rows)
    assert lengths[0] < lengths[1]  # the row of the client that left stopped early
    assert all(row.done and row.released for row in rows)
    assert chat.queue_depth() == 0


def test_conversion_is_cached_and_verified(ct2_engine: RunningEngine, tmp_path: Path) -> None:
    settings = ct2_engine.registry.settings
    checkpoint = llm.locate_checkpoint(
        settings.chat.model_copy(update={"model": str(_gguf(settings))}), settings.cache_dir)
    folder = ct2.convert_checkpoint(checkpoint, settings.cache_dir)
    marker = folder / ct2.DONE_MARKER
    stamp = marker.stat().st_mtime_ns, (folder / ct2.WEIGHTS).stat().st_mtime_ns
    assert ct2.convert_checkpoint(checkpoint, settings.cache_dir) == folder  # no second conversion
    assert (marker.stat().st_mtime_ns, (folder / ct2.WEIGHTS).stat().st_mtime_ns) == stamp
    assert json.loads(marker.read_text())["source_sha256"] == ct2.source_digest(checkpoint)
    tampered = tmp_path / "ct2" / folder.name
    shutil.copytree(folder, tampered)
    with (tampered / ct2.WEIGHTS).open("ab") as weights:
        weights.write(b"\0")
    with pytest.raises(ValueError, match="digests"):
        ct2.convert_checkpoint(checkpoint, tmp_path)


def _gguf(settings: object) -> Path:
    from engine.registry import resolve_model

    return Path(resolve_model(settings.chat.model, settings.cache_dir))
