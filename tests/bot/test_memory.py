"""Memory in layers, through the real pipeline and store (SQLite and PostgreSQL) and a fake engine over HTTP:
pinned facts, the author's note, recall of old turns, rolling summaries, and a worker that loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.builtin import builtin_personas
from bot.engine_client import EngineClient, EngineError
from bot.memory.worker import embedding_text
from bot.pipeline import StoryError, StoryPipeline, UserInput
from bot.settings import BotSettings
from bot.store import AuthorKind, NewTurn, Store
from bot.story.summary import SUMMARY_SYSTEM
from tests.bot.story_helpers import Collector, chats, next_id
from tests.fakes.fake_engine import FakeEngine

CHANNEL, GUILD = 311, 322
FACT = "My sister Mira hid the brass key under the lighthouse stairs."
QUESTION = "Where did Mira hide the brass key?"
FILLER = [
    "We walk along the pier and count the gulls.", "The tea in this inn tastes of smoke and pepper.",
    "I ask the fisherman about tomorrow's weather.", "Let us look at the old maps of the northern coast.",
    "A carriage rattles past; I step aside.", "I buy two apples from the market stall.",
    "The bell of the chapel rings nine times.", "I tell you about my journey over the mountains.",
]
DRAIN_S = 30.0


def summary_reply(body: dict[str, Any]) -> str:
    """Summaries: the fake folds the events into a short text; everything else gets a stock reply."""
    messages = body["messages"]
    if messages[0].get("content") == SUMMARY_SYSTEM:
        events = messages[1]["content"].split("What happened next:\n", 1)[1].split("\n\nWrite the", 1)[0]
        return "Earlier: " + " / ".join(line.split(": ", 1)[-1][:60] for line in events.splitlines()[:6])
    return "*She nods.* Go on."


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each memory test on SQLite (numpy recall) and on PostgreSQL (pgvector recall)."""
    return request.getfixturevalue("sqlite_store" if request.param == "sqlite" else "pg_store")


@pytest.fixture
async def sqlite_store(sqlite_url: str) -> AsyncIterator[Store]:
    store = Store(sqlite_url)
    await store.upgrade()
    await store.sync_builtin_personas(builtin_personas())
    yield store
    await store.close()


@pytest.fixture
async def pipeline(store: Store, fake_engine: FakeEngine) -> AsyncIterator[StoryPipeline]:
    fake_engine.reply = summary_reply
    settings = BotSettings(MASQUE_ENGINE_URL=fake_engine.url, MASQUE_ENGINE_RETRIES=0, MASQUE_ENGINE_TIMEOUT_S=5,
                           MASQUE_CONTEXT_WINDOW=1024, MASQUE_REPLY_MAX_TOKENS=64)
    engine = EngineClient.from_settings(settings)
    pipeline = StoryPipeline(store, engine, settings)
    pipeline.memory.worker.retry_base_s = 0.05
    yield pipeline
    await pipeline.close()
    await engine.close()


async def say(pipeline: StoryPipeline, text: str, name: str = "Ann") -> Collector:
    sink = Collector()
    await pipeline.reply(CHANNEL, GUILD, UserInput(text, author_id=7, author_name=name, message_id=next_id()), sink)
    return sink


async def drained(pipeline: StoryPipeline) -> None:
    async with asyncio.timeout(DRAIN_S):
        await pipeline.memory.worker.drain()


def prompt_text(body: dict[str, Any]) -> str:
    return "\n".join(str(m["content"]) for m in body["messages"])


def story_prompts(engine: FakeEngine) -> list[dict[str, Any]]:
    """Chat requests that were story replies (not summaries or scene prompts)."""
    return [b for b in chats(engine) if b["messages"][0].get("content") != SUMMARY_SYSTEM]


async def test_pinned_facts_are_in_every_prompt_until_removed(pipeline, fake_engine):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    fact = await pipeline.memory.pin(story, "Ann is allergic to cats.", 7)
    for line in FILLER[:3]:
        await say(pipeline, line)
    assert all("- Ann is allergic to cats." in prompt_text(b) for b in story_prompts(fake_engine))
    await pipeline.memory.unpin(story, fact.id)
    await say(pipeline, "And now?")
    assert "allergic" not in prompt_text(story_prompts(fake_engine)[-1])


async def test_author_note_goes_in_at_its_depth(pipeline, fake_engine):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    for line in FILLER[:4]:
        await say(pipeline, line)
    await pipeline.memory.set_note(story, "Thunder is coming.", 1)
    await say(pipeline, "What is that sound?")
    messages = story_prompts(fake_engine)[-1]["messages"]
    # depth 1: before the newest message, which is Ann's question.
    note_at = next(i for i, m in enumerate(messages) if "[Author's note: Thunder is coming.]" in str(m["content"]))
    assert "What is that sound?" in str(messages[-1]["content"])
    assert note_at == len(messages) - 2 or "Thunder is coming." in str(messages[-1]["content"]).split("Ann: What")[0]


async def test_a_fact_told_at_turn_1_is_in_the_prompt_at_turn_80(pipeline, fake_engine, store):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await say(pipeline, FACT)
    for turn in range(78):
        await say(pipeline, f"{FILLER[turn % len(FILLER)]} (day {turn})")
        if turn % 10 == 0:
            await drained(pipeline)
    await drained(pipeline)
    await say(pipeline, QUESTION)
    last = story_prompts(fake_engine)[-1]
    history = "\n".join(str(m["content"]) for m in last["messages"][1:])
    recalled = history.split("[Earlier in the story:")[1].split("]")[0] if "[Earlier in the story:" in history else ""
    assert FACT not in history.replace(recalled, "")  # not in the window itself
    assert "lighthouse" in prompt_text(last)  # recalled (or summarised) from turn 1
    # recall sits two messages from the end, not in the system text (which stays the same per turn)
    assert "Earlier in the story" not in str(last["messages"][0]["content"])
    assert await store.latest_summary(story.id) is not None  # old turns were summarised in the background
    assert "The story so far: Earlier:" in prompt_text(last)
    assert all(sum(len(str(m["content"])) for m in b["messages"]) // 3 < 1024 for b in story_prompts(fake_engine))


async def test_memory_work_never_runs_inside_a_reply_and_retries_after_failures(pipeline, fake_engine, store):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await fake_engine.set_mode("error", times=3, paths=("/v1/embeddings",))
    for line in FILLER * 2:
        await say(pipeline, line)
    await drained(pipeline)
    turns = await store.recent_turns(story.id)
    assert await store.turns_to_embed(story.id, 100) == []  # every turn embedded in the end
    assert len(turns) == 1 + 2 * len(FILLER) * 2
    embeds = fake_engine.requests_to("/v1/embeddings")
    replies = fake_engine.requests_to("/v1/chat/completions")
    for reply in replies:  # no embedding request overlapped a reply being generated
        assert not any(e.started < reply.finished and e.finished > reply.started for e in embeds
                       if len((e.json or {}).get("input", [])) > 1)


async def test_rewinding_past_a_summary_drops_it_and_edits_drop_stale_embeddings(pipeline, store):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    for line in FILLER:
        await say(pipeline, line)
    await drained(pipeline)
    turns = await store.recent_turns(story.id)
    await store.add_summary(story.id, turns[-3].position, "They walked.")
    await store.edit_turn(turns[1].id, "I changed my mind.")
    assert [t.id for t in await store.turns_to_embed(story.id, 10)] == [turns[1].id]
    await pipeline.rewind(CHANNEL, 4)
    assert await store.latest_summary(story.id) is None


async def test_pins_that_would_not_fit_the_prompt_are_refused_so_every_pin_is_in_it(pipeline, fake_engine):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    pinned = []
    with pytest.raises(StoryError, match="remove or shorten one"):
        for n in range(50):
            fact = f"Fact {n}: the {n}th lantern on the quay is painted a different shade of harbour green."
            await pipeline.memory.pin(story, fact, 7)
            pinned.append(fact)
    assert 3 < len(pinned) < 50
    await say(pipeline, "What do you remember?")
    prompt = prompt_text(story_prompts(fake_engine)[-1])
    assert all(fact in prompt for fact in pinned)


async def test_a_summary_call_in_flight_gives_way_to_a_reply_and_is_made_again(pipeline, fake_engine, store):
    slow = {"summaries": 0}

    async def reply(body: dict[str, Any]) -> str:
        if body["messages"][0].get("content") == SUMMARY_SYSTEM:
            slow["summaries"] += 1
            await asyncio.sleep(1.0 if slow["summaries"] == 1 else 0.0)
        return summary_reply(body)

    fake_engine.reply = reply
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    for line in FILLER * 6:  # long enough for turns to leave the 1024-token window
        await say(pipeline, line)
        if slow["summaries"]:
            break
    async with asyncio.timeout(DRAIN_S):
        while slow["summaries"] == 0:
            await say(pipeline, "And then?")
            await asyncio.sleep(0.05)
    await say(pipeline, "A reply while the summary is being written.")  # interrupts the slow call
    await drained(pipeline)
    assert slow["summaries"] >= 2  # the interrupted summary was asked again
    assert await store.latest_summary(story.id) is not None



async def test_the_worker_stores_offered_vectors_with_its_own_and_keeps_them_when_the_engine_fails(
        pipeline, fake_engine, store):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await drained(pipeline)
    worker, dim = pipeline.memory.worker, len((await pipeline.engine.embed(["x"]))[0])
    await worker.run_once(story.id)  # the greeting
    user = await store.add_turn(story.id, NewTurn(AuthorKind.USER, FILLER[0]))
    reply = await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, FILLER[1]))
    worker.offer_vector(story.id, user.id, user.position, [0.25] * dim)  # the user turn's recall query
    since = len(fake_engine.requests_to("/v1/embeddings"))
    await worker.run_once(story.id)
    assert [r.json["input"] for r in fake_engine.requests_to("/v1/embeddings")[since:]] == [
        [embedding_text(reply)]]  # the user turn's vector came offered: not made again
    assert await store.turns_to_embed(story.id, 100) == []
    user = await store.add_turn(story.id, NewTurn(AuthorKind.USER, FILLER[2]))
    reply = await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, FILLER[3]))
    worker.offer_vector(story.id, user.id, user.position, [0.25] * dim)
    await fake_engine.set_mode("error", times=1, paths=("/v1/embeddings",))
    with pytest.raises(EngineError):
        await worker.run_once(story.id)
    assert [t.id for t in await store.turns_to_embed(story.id, 100)] == [reply.id]  # the offered one is kept


async def test_the_new_turns_of_several_stories_are_embedded_in_one_call(pipeline, fake_engine, store):
    first, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    second, _, _ = await pipeline.start_story(CHANNEL + 1, GUILD, "Wren Halloway", "Bo")
    await drained(pipeline)
    turns = [await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, line))
             for story, line in ((first, FILLER[0]), (second, FILLER[1]))]
    since = len(fake_engine.requests_to("/v1/embeddings"))
    pipeline.memory.worker.notify(first.id, None)  # both due at once, as after a busy minute
    pipeline.memory.worker.notify(second.id, None)
    await drained(pipeline)
    calls = [r.json["input"] for r in fake_engine.requests_to("/v1/embeddings")[since:]]
    assert len(calls) == 1 and set(calls[0]) >= {embedding_text(t) for t in turns}
    assert await store.turns_to_embed_in([first.id, second.id], 100) == []
