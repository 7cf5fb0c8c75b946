"""Bot benchmark (not a test): the bot's own cost per message, over the real network path.

Run from the repository root::

    .venv/bin/python bench/bot.py                          # 50 channels, 4 rounds, 250 ms engine
    .venv/bin/python bench/bot.py --channels 50 --rounds 4 --engine-delay 0.25 --scene-rounds 6
    .venv/bin/python bench/bot.py --database-url postgresql+asyncpg://USER:PASS@HOST/DB  # an empty database
    .venv/bin/python bench/bot.py --cast 4                 # each story a scene of 4 personas
    .venv/bin/python bench/bot.py --channels 20 --rounds 4 --compare-cast 4 --scene-rounds 0  # 1 vs 4, side by side
    .venv/bin/python bench/bot.py --loop asyncio            # the bot on asyncio's own loop instead of uvloop

The real MasqueBot (discord.py, the story pipeline, a real SQLite or PostgreSQL store) runs against the
local fake Discord (REST + gateway) and the fake engine, which run in a separate process (as if on
another machine): their CPU is neither counted as the bot's nor competes with it for the GIL. (Until
November 2026 they ran in a thread of the bot's process; under the GIL their work then queued ahead
of the bot's and inflated its latency, though not its CPU figure, which excluded their thread.)
Every round, one user message is dispatched in each channel at once (MESSAGE_CREATE through the
gateway); a reply is done when its last webhook edit (the one that puts the buttons on) has been
answered. It prints:

- the bot's added latency per message, p50/p99: dispatch -> final webhook edit, minus the time
  the engine spent on that message's chat request (target: p99 < 10 ms);
- messages handled per second in a round (bounded below by the engine's fixed delay);
- REST calls per reply (webhook post, final edit; typing when nothing shows within a second; more when
  the stream is long);
- the prompt size per speaker: tokens estimated as the characters of the request's messages / 4, the
  fake engine's usage.prompt_tokens (it counts words) and the system message's characters;
- with --scene-rounds, the scene-art reuse hit rate: the story moves between a few places, the
  fake engine describes each place with slightly varying details, and the bot reuses an earlier
  image when the prompt embeddings are within MASQUE_SCENE_REUSE_THRESHOLD.

With --cast N (1-4) each channel's story is a group scene: it starts with Wren Halloway, then Captain
Isolde Varga, Old Mossback and Maud (the fixture card tests/fixtures/cards/Maud.json, imported into
the guild) join as /story add does (bot.cast.Cast.add and greet, during set-up, not timed). Each
message addresses one member by name ("Isolde, ...") in turn, so every speaker is exercised, and the
fake engine's chat requests are checked: the prompt ends with the group nudge for the addressed
member. The fake engine's replies name no cast member, so personas never answer each other (no
chained replies), and each channel has one person, so the merge window (several people writing in
a channel) never applies. --compare-cast N runs a second column beside --cast in the same run: the
same bot and fakes, each column on its own channels, their rounds alternating (so a change in the
machine's load hits both), the same messages in both (a story of one is answered by Wren, whoever is
named). The warm-up rounds, not measured, address each member once: a persona's first reply in a
channel creates its webhook (each persona has its own, so its messages stay editable); their REST
calls per reply are printed apart.

The bot's process and the fakes' process still share this machine's cores, so figures on a loaded
laptop are an upper bound of what the bot alone costs. For a burst of N simultaneous messages the
bot's added latency cannot be below about N x its CPU per message / its cores: compare p99 with that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import discord  # noqa: E402

from bot import event_loop  # noqa: E402
from bot.app import MasqueBot, apply_endpoints  # noqa: E402
from bot.builtin import builtin_personas  # noqa: E402
from bot.cards import parse_card  # noqa: E402
from bot.cast import Cast, member_of  # noqa: E402
from bot.engine_client import EngineClient  # noqa: E402
from bot.settings import BotSettings  # noqa: E402
from bot.store import Store  # noqa: E402
from bot.story.scene import SCENE_INSTRUCTION  # noqa: E402
from tests.fakes.fake_discord import FakeDiscord, RestCall  # noqa: E402
from tests.fakes.fake_engine import FakeEngine  # noqa: E402
from tests.fakes.openai_shapes import message_text, usage  # noqa: E402

PERSONA = "Wren Halloway"
CAST = (("Wren Halloway", "Wren"), ("Captain Isolde Varga", "Isolde"), ("Old Mossback", "Mossback"),
        ("Maud", "Maud"))  # who joins a scene, in order, and the name a message addresses them by
CARDS = REPO / "tests" / "fixtures" / "cards"
IMPORTED = {"Maud": CARDS / "Maud.json"}  # not built in: imported into the guild when the cast needs it
NUDGE = re.compile(r"\[Write the next reply only as ([^.]+)\.")
# Names no cast member, so no persona answers another (a named member would answer, chaining replies).
REPLY = ("*Leaning on the rail, they watch the fog roll in over the water.* "
         "Then we go at dawn, before the harbour master wakes. Bring the lantern and keep your voice low.")
PLACES = {  # where the story can be, and the details the fake engine may add when describing it
    "harbour": ("a foggy harbour at dawn, wooden piers, moored fishing boats, gulls, wet cobblestones",
                ["lantern light", "grey sky", "coiled ropes", "a lone sailor", "crates of fish"]),
    "forest": ("an old pine forest at dusk, mossy trunks, a narrow trail, ferns, distant owl",
               ["long shadows", "mist between trees", "a fallen log", "fireflies", "a stone marker"]),
    "tavern": ("a crowded tavern at night, low beams, a roaring fireplace, tankards on oak tables",
               ["a bard playing", "smoke haze", "a card game", "candle stubs", "a sleeping dog"]),
}
READY_S = 30.0
ROUND_S = 120.0


class ChildProcess:
    """The parent's handle on a spawned child process that answers commands over a pipe, one at a time.

    `target(conn, *args)` runs in the child, typically an object's `Served.serve_commands(conn)`, where
    `call("x", **kwargs)` runs `do_x(**kwargs)` and answers with its result.
    """

    def __init__(self, target: Any, *args: Any, name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=target, args=(child, *args), name=name, daemon=True)
        self._process.start()
        child.close()
        self._lock = asyncio.Lock()

    async def call(self, command: str, **kwargs: Any) -> Any:
        async with self._lock:
            loop = asyncio.get_running_loop()
            answer: asyncio.Future = loop.create_future()
            loop.add_reader(self._conn.fileno(), self._receive, answer)
            try:
                self._conn.send((command, kwargs))
                ok, value = await answer
            finally:
                loop.remove_reader(self._conn.fileno())
        if not ok:
            raise RuntimeError(f"fakes: {command} failed: {value}")
        return value

    def _receive(self, answer: asyncio.Future) -> None:
        if answer.done():
            return
        try:
            answer.set_result(self._conn.recv())
        except EOFError:
            answer.set_exception(RuntimeError(f"the {self._process.name} process ended "
                                              f"(exit code {self._process.exitcode})"))

    def close(self, wait_s: float = 10) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(("stop", {}))
        self._process.join(timeout=wait_s)
        if self._process.is_alive():
            self._process.kill()


class FakesProcess(ChildProcess):
    """The fakes' process (FakeWorld): the fake Discord with `channels` more channels, and the fake engine."""

    def __init__(self, channels: int, engine_delay: float) -> None:
        super().__init__(fakes_main, channels, engine_delay, name="fakes")


def fakes_main(conn: Connection, channels: int, engine_delay: float) -> None:
    """The fakes' process: serve the fake Discord and engine, answer the parent's commands."""
    asyncio.run(FakeWorld(channels, engine_delay).serve(conn))


class Served:
    """What a child process serves: the parent's commands (`do_<command>`) until `do_stop`."""

    def __init__(self) -> None:
        self._stopped = asyncio.Event()

    async def serve_commands(self, conn: Connection) -> None:
        """Answer the parent's commands, each in a task of its own, until told to stop."""
        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), lambda: loop.create_task(self._answer(conn, *conn.recv())))
        try:
            await self._stopped.wait()
        finally:
            loop.remove_reader(conn.fileno())

    async def _answer(self, conn: Connection, command: str, kwargs: dict[str, Any]) -> None:
        try:
            conn.send((True, await getattr(self, f"do_{command}")(**kwargs)))
        except Exception as exc:  # reported to the parent, which raises it
            conn.send((False, repr(exc)))

    async def do_stop(self) -> None:
        self._stopped.set()

    async def do_cpu(self) -> float:
        """This process's CPU seconds so far (every thread)."""
        return time.process_time()


class FakeWorld(Served):
    """The fake Discord and engine, and what the parent asks of them (timed on this process's clock)."""

    def __init__(self, channels: int, engine_delay: float, discord_server: FakeDiscord | None = None) -> None:
        super().__init__()
        self.engine = FakeEngine(reply=scene_reply(random.Random(7)), latency=engine_delay)
        self.discord = discord_server or FakeDiscord()
        self.channels = self.discord.world.add_channels(channels) if channels else []

    async def serve(self, conn: Connection) -> None:
        await self.engine.start()
        await self.discord.start()
        try:
            await self.serve_commands(conn)
        finally:
            await self.discord.stop()
            await self.engine.stop()

    async def do_info(self) -> dict[str, Any]:
        world = self.discord.world
        return {"token": self.discord.token, "api_base": self.discord.api_base, "engine_url": self.engine.url,
                "gateway_url": self.discord.gateway_url, "guild_id": world.guild_id, "channels": self.channels}

    async def do_count(self, path: str) -> int:
        return len(self.engine.requests_to(path))

    async def do_round(self, label: str, texts: dict[int, str], art: bool) -> dict[str, Any]:
        """One message in each channel of `texts`, all at once; waits for every reply to be sealed (and
        its scene art)."""
        since_calls, since_chats = len(self.discord.calls), len(self.engine.requests)
        since_dispatch = len(self.discord.dispatched)
        await self.say_all(label, texts)
        deadline = time.monotonic() + ROUND_S
        done = await self.sealed_replies(texts, since_calls, deadline)
        if len(done) < len(texts):
            raise TimeoutError(f"round {label}: {len(done)}/{len(texts)} replies")
        figures = self._figures(since_calls, since_chats, since_dispatch, done)
        # Scene art comes after the reply: wait until each channel's illustrate has finished.
        while art and self._embeddings(since_chats) < len(texts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {label}: scene art did not finish")
            await asyncio.sleep(0.05)
        if art:
            await asyncio.sleep(0.2)  # the image post after the last embedding
        return figures

    async def say_all(self, label: str, texts: dict[int, str]) -> list[dict[str, Any]]:
        """The user says `texts[channel]` in every channel at once (tagged with the round's label, so each
        message is told apart); returns the MESSAGE_CREATE payloads, in the order of `texts`."""
        return list(await asyncio.gather(*(self.discord.user_says(f"{text} [{label} #{i}]", channel_id=channel)
                                           for i, (channel, text) in enumerate(texts.items()))))

    async def sealed_replies(self, channels: Collection[int], since_calls: int, deadline: float) -> dict[int, RestCall]:
        """Each channel's first sealed reply (final persona edit) among the calls from `since_calls`, waiting
        until every channel has one or `deadline` (time.monotonic) passes: those sealed by then."""
        done: dict[int, RestCall] = {}
        while True:
            seen = len(self.discord.calls)
            for call in self.discord.calls[since_calls:seen]:  # each call read once
                channel = self._sealed(call)
                if channel in channels:
                    done.setdefault(channel, call)
            since_calls = seen
            if len(done) == len(channels) or time.monotonic() > deadline:
                return done
            await asyncio.sleep(0.01)

    def _embeddings(self, since: int) -> int:
        return sum(1 for r in self.engine.requests[since:] if r.path == "/v1/embeddings")

    def _sealed(self, call: RestCall) -> int | None:
        """The channel a final persona edit (with buttons) belongs to, else None."""
        if call.method != "PATCH" or call.status != 200 or not (call.json or {}).get("components"):
            return None
        if not call.path.startswith("/webhooks/") or call.path.startswith(f"/webhooks/{self.discord.world.bot_id}/"):
            return None
        return int(call.response["channel_id"])

    def _figures(self, since_calls: int, since_chats: int, since_dispatch: int,
                 done: dict[int, RestCall]) -> dict[str, Any]:
        user_id = str(self.discord.world.user_id)
        sent = {int(d["channel_id"]): (at, d["content"]) for event, d, at in self.discord.dispatched[since_dispatch:]
                if event == "MESSAGE_CREATE" and d["author"]["id"] == user_id}
        chats = [r for r in self.engine.requests[since_chats:] if r.path == "/v1/chat/completions"
                 and r.json["messages"][0].get("content") != SCENE_INSTRUCTION]
        added, ends, prompts = [], [], []
        for channel, final in done.items():
            started, content = sent[channel]
            chat = next(r for r in chats if content in message_text(r.json["messages"][-1]))
            added.append((final.done_at - started) - chat.engine_seconds)
            ends.append(final.done_at)
            prompts.append({"channel": channel, **prompt_size(chat.json)})
        span = max(ends) - min(at for at, _ in sent.values())
        rest = len(self.discord.calls) - since_calls
        return {"added": added, "rate": len(done) / span, "rest_per_reply": rest / len(done),
                "chats_per_message": len(chats) / len(done), "prompts": prompts,
                "engine_s": statistics.mean(r.engine_seconds for r in chats)}


def prompt_size(body: dict[str, Any]) -> dict[str, Any]:
    """Who a chat request asks to speak (the group nudge's name; None in a story of one) and its size."""
    messages = body["messages"]
    nudge = NUDGE.search(message_text(messages[-1]))
    return {"speaker": nudge.group(1) if nudge else None,
            "tokens": sum(len(message_text(m)) for m in messages) / 4,
            "words": usage(body, "")["prompt_tokens"],  # what the fake engine reports as usage.prompt_tokens
            "system_chars": len(message_text(messages[0])) if messages[0].get("role") == "system" else 0}


def scene_reply(rng: random.Random):
    """The fake engine's answers: role-play replies, and image prompts of the place last mentioned."""
    def reply(body: dict[str, Any]) -> str:
        messages = body.get("messages", [])
        if messages and messages[0].get("content") == SCENE_INSTRUCTION:
            text = str(messages[-1].get("content", "")).lower()
            place = max(PLACES, key=lambda p: text.rfind(p))
            base, details = PLACES[place]
            return f"{base}, {', '.join(rng.sample(details, 2))}"
        return REPLY
    return reply


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@dataclass
class Column:
    """One side of the comparison: stories whose cast has `cast` personas, on channels of their own."""

    tag: str
    cast: int
    channels: list[int]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    bot_cpu: float = 0.0
    memory_cpu: float = 0.0  # the part of bot_cpu spent by the memory worker after each round
    fakes_cpu: float = 0.0
    store_times: dict[str, list[float]] = field(default_factory=dict)
    prompts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by speaker
    warm_up_rest: list[float] = field(default_factory=list)  # REST calls per reply in each warm-up round
    checked: int = 0
    wrong: list[str] = field(default_factory=list)  # prompts not for the expected speaker

    @property
    def label(self) -> str:
        return f"{self.cast} persona" + ("s" if self.cast > 1 else "")


class Bench:
    """One benchmark run: store and bot up against the fakes' process; rounds of simultaneous messages."""

    def __init__(self, args: argparse.Namespace, fakes: FakesProcess, workdir: Path):
        self.args, self.fakes = args, fakes
        self.database_url = args.database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
        self.store = Store(self.database_url)
        self.store_times: dict[str, list[float]] = {}
        self.bot: MasqueBot | None = None
        self.columns: list[Column] = []
        self.display: dict[str, str] = {}  # a persona's name -> the name it speaks under

    async def __aenter__(self) -> Bench:
        info = await self.fakes.call("info")
        self.guild_id, n = info["guild_id"], self.args.channels
        self.columns = [Column(f"c{i}-", cast, info["channels"][i * n:(i + 1) * n])
                        for i, cast in enumerate(column_casts(self.args))]
        await self.store.upgrade()
        await self.store.sync_builtin_personas(builtin_personas())
        await self.store.update_guild_settings(self.guild_id, cooldown_s=0)
        if self.args.breakdown:
            self.store_times = time_store_calls(self.store)
        settings = BotSettings(DISCORD_TOKEN=info["token"], MASQUE_ENGINE_URL=info["engine_url"],
                               MASQUE_DATABASE_URL=self.database_url, DISCORD_API_BASE=info["api_base"],
                               DISCORD_GATEWAY_URL=info["gateway_url"], _env_file=None)
        apply_endpoints(settings)
        self.bot = MasqueBot(settings, self.store, EngineClient.from_settings(settings))
        self._runner = asyncio.create_task(self.bot.start(info["token"]))
        await asyncio.wait_for(self.bot.wait_until_ready(), READY_S)
        await self.set_up_scenes()
        return self

    async def set_up_scenes(self) -> None:
        """Each channel's story, and its cast joined as /story add does (not timed)."""
        size = max(column.cast for column in self.columns)
        for name, _ in CAST[:size]:
            if name in IMPORTED:
                path = IMPORTED[name]
                await self.store.create_persona(self.guild_id, parse_card(path.read_bytes(), path.name))
            self.display[name] = member_of(await self.store.get_persona(self.guild_id, name)).name
        cast = Cast(self.store)
        for column in self.columns:
            for channel_id in column.channels:
                story, _, _ = await self.bot.pipeline.start_story(channel_id, self.guild_id, PERSONA, "Uma")
                for name, _ in CAST[1:column.cast]:
                    persona = await cast.persona_named(self.guild_id, name)
                    await cast.add(story, persona)
                    await cast.greet(story, persona, "Uma")

    async def __aexit__(self, *exc: object) -> None:
        if self.bot is not None:
            await self.bot.close()
            await asyncio.wait_for(self._runner, READY_S)
            await self.bot.engine.close()
        await self.store.close()

    async def round(self, label: str, texts: dict[int, str], art: bool = False) -> dict[str, Any]:
        return {"label": label, **await self.fakes.call("round", label=label, texts=texts, art=art)}

    async def warm_up(self) -> None:
        """Rounds that address each member once, in every column (the same messages): every persona's
        first reply in a channel creates its webhook (each persona has its own), and the caches warm."""
        for k in range(max(c.cast for c in self.columns)):
            for column in self.columns:
                result = await self.round(f"{column.tag}warm-up{k}",
                                          dict.fromkeys(column.channels, f"{CAST[k][1]}, we reach the harbour."))
                column.warm_up_rest.append(result["rest_per_reply"])
        await self.memory_work()  # the warm-up's, not measured

    async def memory_work(self) -> None:
        """Let the memory worker do what the replies so far left it (embeddings of the new turns,
        summaries): it waits for a moment with no reply in the making, which back-to-back rounds
        seldom leave it, so without this its work would fall after the measured rounds."""
        async with asyncio.timeout(120):
            await self.bot.pipeline.memory.worker.drain()

    async def measure(self, column: Column, number: int) -> None:
        """A measured round of `column`: channel i addresses cast member (number + i) mod the largest cast."""
        addressed = max(c.cast for c in self.columns)
        who = {ch: (number + i) % addressed for i, ch in enumerate(column.channels)}
        texts = {ch: f"{CAST[k][1]}, what do you see now?" for ch, k in who.items()}
        cpu, fakes_cpu = time.process_time(), await self.fakes.call("cpu")
        result = await self.round(f"{column.tag}r{number}", texts)
        replies_cpu = time.process_time()
        await self.memory_work()
        column.memory_cpu += time.process_time() - replies_cpu
        column.bot_cpu += time.process_time() - cpu
        column.fakes_cpu += await self.fakes.call("cpu") - fakes_cpu
        column.rounds.append(result)
        for name, spent in self.store_times.items():
            column.store_times.setdefault(name, []).extend(spent)
        self.store_times.clear()
        lead = self.display[PERSONA]
        for prompt in result["prompts"]:
            k = who[prompt["channel"]]
            expected = lead if column.cast == 1 else self.display[CAST[k][0]] if k < column.cast else None
            speaker = prompt["speaker"] or lead  # a story of one has no group nudge
            column.prompts.setdefault(speaker, []).append(prompt)
            if expected is not None:
                column.checked += 1
                if speaker != expected or (column.cast == 1) != (prompt["speaker"] is None):
                    column.wrong.append(f"{texts[prompt['channel']]!r} -> {prompt['speaker']}")


def column_casts(args: argparse.Namespace) -> list[int]:
    return [args.cast] + ([args.compare_cast] if args.compare_cast else [])


async def main_async(args: argparse.Namespace, fakes: FakesProcess) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="masque-bench-") as workdir:
        async with Bench(args, fakes, Path(workdir)) as bench:
            await bench.warm_up()
            bench.store_times.clear()  # the breakdown covers the measured rounds only
            for number in range(args.rounds):
                for column in bench.columns:  # alternating: a change in the machine's load hits every column
                    await bench.measure(column, number)
            figures = report(args, bench.columns)
            if args.breakdown:
                for column in bench.columns:
                    print_breakdown(column, args.channels * args.rounds)
            if args.scene_rounds:
                figures["scene_art"] = await scene_art(bench, args)
            return figures


async def scene_art(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds with scene art after every reply, in the first column's channels; the story wanders between PLACES."""
    await bench.store.update_guild_settings(bench.guild_id, scene_art=True, scene_art_every=1)
    stats = bench.bot.pipeline.art.stats
    before = (stats.hits, stats.misses)
    walk = random.Random(11)
    places = list(PLACES)
    for i in range(args.scene_rounds):
        place = places[0] if i == 0 else walk.choice(places)
        await bench.round(f"art{i}", dict.fromkeys(bench.columns[0].channels, f"We walk on to the {place}."), art=True)
    hits, misses = stats.hits - before[0], stats.misses - before[1]
    painted = await bench.fakes.call("count", path="/v1/images/generations")
    print(f"\nscene art ({bench.columns[0].label}): {hits + misses} illustrations, {hits} reused, {misses} painted "
          f"({painted} image requests in all), hit rate {hits / max(1, hits + misses):.0%} "
          f"at reuse threshold {bench.bot.settings.scene_reuse_threshold}")
    return {"hits": hits, "misses": misses, "painted": painted}


def column_figures(column: Column) -> dict[str, Any]:
    rounds, added_ms = column.rounds, [a * 1000 for r in column.rounds for a in r["added"]]
    messages = len(added_ms)
    speakers = {name: {"prompts": len(found), **{key: statistics.mean(p[key] for p in found)
                                                 for key in ("tokens", "words", "system_chars")}}
                for name, found in column.prompts.items()}
    return {"cast": column.cast, "messages": messages,
            "engine_ms": statistics.mean(r["engine_s"] for r in rounds) * 1000,
            "p50_ms": percentile(added_ms, 50), "p99_ms": percentile(added_ms, 99), "max_ms": max(added_ms),
            "msg_per_s": statistics.mean(r["rate"] for r in rounds),
            "rest_per_reply": statistics.mean(r["rest_per_reply"] for r in rounds),
            "chats_per_message": statistics.mean(r["chats_per_message"] for r in rounds),
            "warm_up_rest": sum(column.warm_up_rest) / len(column.warm_up_rest),
            "bot_cpu_ms": column.bot_cpu / messages * 1000, "memory_cpu_ms": column.memory_cpu / messages * 1000,
            "fakes_cpu_ms": column.fakes_cpu / messages * 1000,
            "speakers": speakers, "speaker_checked": column.checked, "speaker_wrong": column.wrong}


ROWS = (("engine time per chat request (mean)", "engine_ms", "{:.1f} ms"),
        ("bot added latency p50", "p50_ms", "{:.1f} ms"),
        ("bot added latency p99", "p99_ms", "{:.1f} ms"),
        ("bot added latency max", "max_ms", "{:.1f} ms"),
        ("messages handled per second (per round, mean)", "msg_per_s", "{:.1f} msg/s"),
        ("REST calls per reply", "rest_per_reply", "{:.2f}"),
        ("REST calls per reply in the warm-up (new webhooks)", "warm_up_rest", "{:.2f}"),
        ("chat requests per message (1: no chained replies)", "chats_per_message", "{:.2f}"),
        ("bot CPU per message (the bot's process)", "bot_cpu_ms", "{:.1f} ms"),
        ("  of which memory work (embeddings, summaries)", "memory_cpu_ms", "{:.1f} ms"),
        ("fakes' CPU per message (their own process)", "fakes_cpu_ms", "{:.1f} ms"))


def report(args: argparse.Namespace, columns: list[Column]) -> dict[str, Any]:
    """Print the columns side by side; returns their figures by label."""
    figures = {column.label: column_figures(column) for column in columns}
    print(f"\nbot benchmark: {args.channels} channels at once x {args.rounds} rounds "
          f"({args.channels * args.rounds} messages) per column, fake engine fixed delay "
          f"{args.engine_delay * 1000:.0f} ms")
    if len(columns) > 1:
        print("  (one bot and one fakes' process; each column on its own channels, their rounds alternating)")
    print("  one person per channel: the merge window for several people never applies")
    print(f"  the bot's event loop: {type(asyncio.get_running_loop()).__module__.split('.')[0]} (--loop)")
    width = max(len(name) for name, _, _ in ROWS)
    print(f"  {'':<{width}}" + "".join(f"  {label:>12}" for label in figures))
    for name, key, shape in ROWS:
        print(f"  {name:<{width}}" + "".join(f"  {shape.format(f[key]):>12}" for f in figures.values()))
    print("\nprompt size per speaker, mean per chat request (tokens ~ characters of all messages / 4; "
          "words: the fake engine's usage.prompt_tokens; system: the system message's characters):")
    print(f"  {'column':<12} {'speaker':<16} {'prompts':>7} {'tokens~':>8} {'words':>7} {'system':>7}")
    for label, f in figures.items():
        for name, s in f["speakers"].items():
            print(f"  {label:<12} {name:<16} {s['prompts']:>7} {s['tokens']:>8.0f} {s['words']:>7.0f} "
                  f"{s['system_chars']:>7.0f}")
    for label, f in figures.items():
        wrong, checked = f["speaker_wrong"], f["speaker_checked"]
        expected = ("the lead, with no group nudge" if f["cast"] == 1
                    else "the persona addressed, named by the group nudge")
        print(f"  {label}: {checked - len(wrong)}/{checked} prompts for {expected}"
              + (f"; wrong: {'; '.join(wrong[:3])}" if wrong else ""))
    return figures


def time_store_calls(store: Store) -> dict[str, list[float]]:
    """Wrap the store's coroutine methods on this instance to time them (--breakdown)."""
    times: dict[str, list[float]] = {}
    for name in dir(store):
        method = getattr(store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(method):
            continue

        async def timed(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await _method(*args, **kwargs)
            finally:
                times.setdefault(_name, []).append(time.perf_counter() - started)
        setattr(store, name, timed)
    return times


def print_breakdown(column: Column, messages: int) -> None:
    """Store time per message by method, biggest first (includes waiting for SQLite's lock)."""
    print(f"\nstore time per message (wall, incl. waiting), by method, {column.label}:")
    for name, spent in sorted(column.store_times.items(), key=lambda kv: -sum(kv[1]))[:10]:
        print(f"  {name:<24} {len(spent) / messages:5.1f} calls  {sum(spent) / messages * 1000:8.1f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=50, help="channels sending at once (per column)")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (one message per channel each)")
    parser.add_argument("--engine-delay", type=float, default=0.25, help="the fake engine's fixed delay, seconds")
    parser.add_argument("--scene-rounds", type=int, default=6, help="rounds with scene art on (0: skip)")
    parser.add_argument("--database-url", default="", help="default: a SQLite file in a temporary folder")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the bot's event loop (bot/event_loop.py; masque-bot's default: uvloop where installed)")
    parser.add_argument("--breakdown", action="store_true", help="also time the store's methods per message")
    parser.add_argument("--cast", type=int, default=1, choices=range(1, len(CAST) + 1),
                        help="personas in each story's scene")
    parser.add_argument("--compare-cast", type=int, default=0, choices=range(0, len(CAST) + 1),
                        help="also run stories with this many personas, side by side (0: no)")
    args = parser.parse_args(argv)
    if args.compare_cast == args.cast:
        parser.error("--compare-cast must differ from --cast")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the printed figures (by column label, and scene_art)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    discord.utils.setup_logging(level=logging.WARNING, root=False)
    fakes = FakesProcess(args.channels * len(column_casts(args)), args.engine_delay)
    try:
        return event_loop.run(main_async(args, fakes), use_uvloop=args.loop == "uvloop")
    finally:
        fakes.close()


if __name__ == "__main__":
    main()
