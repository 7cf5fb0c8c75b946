"""The prompt always fits: long stories against a vLLM-shaped server (with and without /tokenize),
a server that refuses for length anyway, and our own engine's shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.builtin import builtin_personas
from bot.engine_client import EngineClient
from bot.pipeline import StoryPipeline, UserInput
from bot.settings import BotSettings
from bot.store import Store
from bot.story.summary import SUMMARY_SYSTEM
from tests.bot.story_helpers import Collector, next_id
from tests.fakes.fake_vllm import FakeVLLM

CHANNEL, GUILD = 411, 422
TURNS = 100
LINES = [
    "I lean over the map and trace the river with my finger, muttering the names of the villages.",
    "The captain said the bridge at Orrin's Ford washed out last spring; we will have to swim, or pay.",
    "*I shake the rain off my coat.* Tell me everything you know about the lighthouse keeper.",
    "Numbers on the ledger: 1183, 2291, 40417 — whoever wrote them pressed hard enough to tear the page.",
]


def is_summary(body: dict) -> bool:
    return body["messages"][0].get("content") == SUMMARY_SYSTEM


def settings_for(url: str, **extra: object) -> BotSettings:
    return BotSettings(MASQUE_ENGINE_URL=url, MASQUE_ENGINE_RETRIES=0, MASQUE_ENGINE_TIMEOUT_S=10,
                       MASQUE_ENGINE_CHAT_MODEL="masque-chat", **extra)


@pytest.fixture
async def sqlite_store(tmp_path) -> AsyncIterator[Store]:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'fit.db'}")
    await store.upgrade()
    await store.sync_builtin_personas(builtin_personas())
    yield store
    await store.close()


async def play(store: Store, server: FakeVLLM, turns: int = TURNS, **settings: object) -> StoryPipeline:
    config = settings_for(server.url, **settings)
    engine = EngineClient.from_settings(config)
    pipeline = StoryPipeline(store, engine, config)
    try:
        await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
        for turn in range(turns):
            sink = Collector()
            text = f"{LINES[turn % len(LINES)]} (turn {turn})"
            await pipeline.reply(CHANNEL, GUILD, UserInput(text, 7, "Ann", next_id()), sink)
            assert sink.finished, f"turn {turn} was not answered"
    finally:
        await pipeline.close()
        await engine.close()
    return pipeline


async def test_a_100_turn_story_fits_a_vllm_window_with_tokenize(sqlite_store):
    async with FakeVLLM(max_model_len=2048, reply="*She nods slowly.* The river remembers.") as server:
        pipeline = await play(sqlite_store, server)
        assert server.over_window() == []
        assert len([c for c in server.chat_calls if c.refused is None and not is_summary(c.record.json)]) == TURNS
        # the window is used, not wasted: within one turn (~50 tokens here) of the 1,500 a tight fit
        # reaches, which the history grid may leave out for the server's prefix cache (bot/story/prompt.py)
        assert max(server.prompt_tokens()) > 1450
        assert pipeline.fitter.counter.calibrated  # it learned the server's ratio from /tokenize
        assert server.requests_to("/tokenize")


async def test_a_100_turn_story_fits_a_vllm_window_without_tokenize(sqlite_store):
    async with FakeVLLM(max_model_len=2048, tokenize=False, reply="*She nods.* Go on.") as server:
        await play(sqlite_store, server)
        assert server.over_window() == []
        assert all(c.refused is None for c in server.chat_calls)


async def test_a_server_that_counts_far_more_than_the_estimate_is_retried_shorter(sqlite_store):
    # 2 characters a token, no /tokenize, no max_model_len the bot believes: the first long prompt is refused
    # with vLLM's wording; the bot shrinks the history and retries once, and the user never sees the error.
    async with FakeVLLM(max_model_len=2048, tokenize=False, chars_per_token=1.5, reply="Mm.") as server:
        await play(sqlite_store, server, turns=40, MASQUE_CONTEXT_WINDOW=4096)
        refused = [c for c in server.chat_calls if c.refused]
        assert refused and "maximum context length" in refused[0].refused
        assert len(refused) <= 2  # the refusal's own count taught the bot the server's ratio
        answered = [c for c in server.chat_calls if c.refused is None and not is_summary(c.record.json)]
        assert len(answered) == 40


async def test_a_number_budget_caps_the_prompt_below_the_window(sqlite_store):
    async with FakeVLLM(max_model_len=4096, reply="Mm.") as server:
        await play(sqlite_store, server, turns=30, MASQUE_PROMPT_TOKEN_BUDGET=600)
        # the story's prompts (the background summary's own prompt has its own budget, and may run or not)
        story = [c.prompt_tokens for c in server.chat_calls if not is_summary(c.record.json)]
        assert len(story) == 30 and max(story) <= 600 + 64  # the budget, and the learned ratio's slack


async def test_context_window_and_token_counts_from_the_server(sqlite_store):
    async with FakeVLLM(max_model_len=3000) as server:
        engine = EngineClient.from_settings(settings_for(server.url))
        try:
            assert await engine.context_window() == 3000
            messages = [{"role": "user", "content": "hello there, friend"}]
            assert await engine.count_tokens(messages) == server.count(messages)
            assert engine.counts_tokens() is True
        finally:
            await engine.close()
    async with FakeVLLM(max_model_len=3000, tokenize=False) as server:
        engine = EngineClient.from_settings(settings_for(server.url))
        try:
            assert await engine.count_tokens([{"role": "user", "content": "hi"}]) is None
            assert engine.counts_tokens() is False
        finally:
            await engine.close()
