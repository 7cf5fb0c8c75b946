"""The bot's /metrics (off unless MASQUE_METRICS_PORT is set) and its one log line per turn, with the real
bot in SimCord and the fake engine: turns, latency, queue depth, engine errors by kind, and no message text
or secret in the log."""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from bot.metrics import BotMetrics, serve_metrics
from bot.settings import BotSettings
from tests.bot.simcord_kit import make_bot, start_story, world

DISCORD_TOKEN = "MTA-discord-token-never-logged.Gx7a2b.secretsecretsecret"
ENGINE_KEY = "sk-engine-key-never-logged-0123456789"
FIRST, SECOND = "Is the ferry running tonight, Wren?", "And who keeps the lighthouse lamp?"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_ports() -> set[int]:
    """The TCP ports this process listens on (its own sockets, from /proc: other processes do not count)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics: {(sample name, sorted labels): value}."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def turn_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bot.turns"]


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))


@pytest.fixture
def metered(bot_settings: BotSettings) -> BotSettings:
    return bot_settings.model_copy(update={"metrics_port": free_port()})


skip_without_proc = pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")


@skip_without_proc
async def test_two_messages_are_counted_timed_and_logged_once_each(metered, store, fake_engine, caplog):
    caplog.set_level(logging.INFO)
    fake_engine.reply = "The ferry waits for no one. *Wren smiles.*"
    bot = make_bot(metered, store)
    async with world(bot) as w:
        assert metered.metrics_port in listening_ports()
        await start_story(w)
        await w.player.send(w.channel, FIRST)
        await w.player.send(w.channel, SECOND)
        assert len(w.persona_messages()) == 3  # the greeting and two replies
        metrics = await scrape(metered.metrics_port)

    assert sample(metrics, "masque_bot_turns_total", kind="reply") == 2
    assert sample(metrics, "masque_bot_turns_total", kind="greeting") == 1
    assert sample(metrics, "masque_bot_reply_seconds_count", kind="reply") == 2
    assert 0 < sample(metrics, "masque_bot_reply_seconds_sum", kind="reply") < 60
    assert sample(metrics, "masque_bot_first_text_seconds_count", kind="reply") == 2
    assert sample(metrics, "masque_bot_engine_call_seconds_count", route="chat_stream") == 2
    # Both messages answered: no channel has a series left, and the total is back to 0.
    assert not [key for key in metrics if key[0] == "masque_bot_queue_depth"]
    assert sample(metrics, "masque_bot_queue_depth_all") == 0
    assert sample(metrics, "masque_bot_voice_sessions") == 0
    assert sample(metrics, "masque_bot_shard_latency_seconds", shard="0") == 0.0  # SimCord's gateway: 0 s
    assert not [key for key in metrics if key[0] == "masque_bot_engine_errors_total"]

    story = await store.active_story(w.channel.id)
    turns = await store.recent_turns(story.id)
    lines = turn_lines(caplog)
    replies = [fields(line) for line in lines if fields(line)["kind"] == "reply"]
    assert len(lines) == 3 and len(replies) == 2, lines
    for line, persona_turn in zip(replies, [turns[2], turns[4]], strict=True):
        assert line["guild"] == str(w.guild.id) and line["channel"] == str(w.channel.id)
        assert line["story"] == str(story.id) and line["turn"] == str(persona_turn.id)
        assert line["persona"] == str(story.persona_id) and line["user"] == str(w.player.id)
        assert line["outcome"] == "ok" and line["engine"] == metered.engine_chat_model
        assert int(line["tokens_in"]) > 0 and int(line["tokens_out"]) > 0 and int(line["latency_ms"]) >= 0
    everything = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    for text in (FIRST, SECOND, "The ferry waits", "Wren smiles"):
        assert text not in everything  # no story text at INFO, in any logger

    await bot.close()
    assert metered.metrics_port not in listening_ports()  # stopped with the bot


async def test_an_engine_error_is_counted_by_kind_and_logged(metered, store, fake_engine, caplog):
    caplog.set_level(logging.INFO)
    bot = make_bot(metered, store)
    async with world(bot) as w:
        await start_story(w)
        fake_engine.error_status = 503
        await fake_engine.set_mode("error", paths=["/v1/chat/completions"])
        await w.player.send(w.channel, FIRST)
        assert "not reachable" in w.channel.last_message.content
        metrics = await scrape(metered.metrics_port)
        await fake_engine.set_mode("ok")
    await bot.close()

    assert sample(metrics, "masque_bot_engine_errors_total", kind="overloaded", route="chat_stream") == 1
    assert sample(metrics, "masque_bot_turn_errors_total", kind="reply", error="overloaded") == 1
    assert sample(metrics, "masque_bot_turns_total", kind="reply") is None  # no reply was made
    assert sample(metrics, "masque_bot_queue_depth_all") == 0
    failed = [fields(line) for line in turn_lines(caplog) if "kind=reply" in line]
    assert len(failed) == 1 and failed[0]["outcome"] == "error:overloaded", failed
    assert failed[0]["channel"] == str(w.channel.id) and failed[0]["turn"] == "-"  # no persona turn made


async def test_buttons_count_as_their_own_kinds(metered, store, fake_engine, caplog):
    caplog.set_level(logging.INFO)
    fake_engine.reply = "The lamp burns all night."
    bot = make_bot(metered, store)
    async with world(bot) as w:
        await start_story(w)
        await w.player.send(w.channel, SECOND)
        await w.player.click(w.channel.history()[-1], label="Regenerate")
        await w.player.click(w.channel.history()[-1], label="Continue")
        metrics = await scrape(metered.metrics_port)
    await bot.close()

    for kind in ("reply", "regenerate", "continue"):
        assert sample(metrics, "masque_bot_turns_total", kind=kind) == 1, kind
        assert sample(metrics, "masque_bot_reply_seconds_count", kind=kind) == 1, kind
    story = await store.active_story(w.channel.id)
    persona_turn = (await store.recent_turns(story.id))[-1]
    lines = {fields(line)["kind"]: fields(line) for line in turn_lines(caplog)}
    assert lines["regenerate"]["turn"] == lines["continue"]["turn"] == str(persona_turn.id)
    assert lines["continue"]["channel"] == str(w.channel.id) and lines["continue"]["outcome"] == "ok"


@skip_without_proc
async def test_without_a_port_nothing_listens(bot_settings, store, fake_engine):
    assert bot_settings.metrics_port == 0
    before = listening_ports()
    bot = make_bot(bot_settings, store)
    async with world(bot) as w:
        await start_story(w)
        assert bot.metrics_server is None
        assert listening_ports() == before
    await bot.close()


async def test_secrets_never_reach_the_log_during_a_turn(bot_settings, store, fake_engine, caplog):
    caplog.set_level(logging.DEBUG)  # every level, every logger
    fake_engine.api_key = ENGINE_KEY  # the fake refuses requests without it: the key is really used
    fake_engine.reply = "The lamp is mine to keep."
    secrets = {"discord_token": SecretStr(DISCORD_TOKEN), "engine_api_key": SecretStr(ENGINE_KEY)}
    settings = bot_settings.model_copy(update={**secrets, "metrics_port": free_port()})
    bot = make_bot(settings, store)
    async with world(bot) as w:
        await start_story(w)
        await w.player.send(w.channel, SECOND)
        assert w.persona_messages()[-1].content == "The lamp is mine to keep."
    await bot.close()

    assert len([line for line in turn_lines(caplog) if "kind=reply " in line]) == 1
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # the capture did see DEBUG records
    logged = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
    assert DISCORD_TOKEN not in logged and ENGINE_KEY not in logged
    assert DISCORD_TOKEN[:20] not in logged and ENGINE_KEY[:20] not in logged


def test_queue_depth_series_come_and_go_voice_sessions_count_once_and_a_shard_without_latency_is_left_out():
    metrics = BotMetrics()
    metrics.queue_depth(11, 2)
    metrics.queue_depth(12, 1)
    metrics.voice_session(5, True)
    metrics.voice_session(5, True)
    metrics.watch_shards(SimpleNamespace(latencies=[(0, 0.042), (1, float("nan"))]))
    text = metrics.render().decode()
    assert 'masque_bot_queue_depth{channel="11"} 2.0' in text and "masque_bot_queue_depth_all 3.0" in text
    assert "masque_bot_voice_sessions 1.0" in text
    assert 'masque_bot_shard_latency_seconds{shard="0"} 0.042' in text and 'shard="1"' not in text
    metrics.queue_depth(11, 0)
    metrics.voice_session(5, False)
    text = metrics.render().decode()
    assert 'channel="11"' not in text and "masque_bot_queue_depth_all 1.0" in text
    assert "masque_bot_voice_sessions 0.0" in text


async def test_a_taken_port_leaves_the_bot_running_without_metrics(bot_settings, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = bot_settings.model_copy(update={"metrics_port": taken.getsockname()[1]})
        assert await serve_metrics(BotMetrics(), settings) is None
    assert "MASQUE_METRICS_PORT" in caplog.text
