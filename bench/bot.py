"""Bot benchmark (not a test): the bot's own cost per message, over the real network path.

Run from the repository root::

    .venv/bin/python bench/bot.py                          # 50 channels, 4 rounds, 250 ms engine
    .venv/bin/python bench/bot.py --channels 50 --rounds 4 --engine-delay 0.25 --scene-rounds 6
    .venv/bin/python bench/bot.py --database-url postgresql+asyncpg://USER:PASS@HOST/DB  # an empty database

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
- REST calls per reply (typing, webhook post, final edit; more when the stream is long);
- with --scene-rounds, the scene-art reuse hit rate: the story moves between a few places, the
  fake engine describes each place with slightly varying details, and the bot reuses an earlier
  image when the prompt embeddings are within MASQUE_SCENE_REUSE_THRESHOLD.

The bot's process and the fakes' process still share this machine's cores, so figures on a loaded
laptop are an upper bound of what the bot alone costs. For a burst of N simultaneous messages the
bot's added latency cannot be below about N x its CPU per message / its cores: compare p99 with that.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import discord  # noqa: E402

from bot.app import MasqueBot, apply_endpoints  # noqa: E402
from bot.builtin import builtin_personas  # noqa: E402
from bot.engine_client import EngineClient  # noqa: E402
from bot.settings import BotSettings  # noqa: E402
from bot.store import Store  # noqa: E402
from bot.story.scene import SCENE_INSTRUCTION  # noqa: E402
from tests.fakes.fake_discord import FakeDiscord, RestCall  # noqa: E402
from tests.fakes.fake_engine import FakeEngine  # noqa: E402

PERSONA = "Wren Halloway"
REPLY = ("*Wren leans on the rail and watches the fog roll in over the water.* "
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


class FakesProcess:
    """The parent's handle on the fakes' process: one command at a time over a pipe."""

    def __init__(self, channels: int, engine_delay: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=fakes_main, args=(child, channels, engine_delay),
                                        name="fakes", daemon=True)
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
            answer.set_exception(RuntimeError(f"the fakes' process ended (exit code {self._process.exitcode})"))

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(("stop", {}))
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()


def fakes_main(conn: Connection, channels: int, engine_delay: float) -> None:
    """The fakes' process: serve the fake Discord and engine, answer the parent's commands."""
    asyncio.run(FakeWorld(channels, engine_delay).serve(conn))


class FakeWorld:
    """The fake Discord and engine, and what the parent asks of them (timed on this process's clock)."""

    def __init__(self, channels: int, engine_delay: float) -> None:
        self.engine = FakeEngine(reply=scene_reply(random.Random(7)), latency=engine_delay)
        self.discord = FakeDiscord()
        self.channels = self.discord.world.add_channels(channels)
        self._stopped = asyncio.Event()

    async def serve(self, conn: Connection) -> None:
        await self.engine.start()
        await self.discord.start()
        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), lambda: loop.create_task(self._answer(conn, *conn.recv())))
        await self._stopped.wait()
        loop.remove_reader(conn.fileno())
        await self.discord.stop()
        await self.engine.stop()

    async def _answer(self, conn: Connection, command: str, kwargs: dict[str, Any]) -> None:
        try:
            conn.send((True, await getattr(self, f"do_{command}")(**kwargs)))
        except Exception as exc:  # reported to the parent, which raises it
            conn.send((False, repr(exc)))

    async def do_stop(self) -> None:
        self._stopped.set()

    async def do_info(self) -> dict[str, Any]:
        world = self.discord.world
        return {"token": self.discord.token, "api_base": self.discord.api_base, "engine_url": self.engine.url,
                "gateway_url": self.discord.gateway_url, "guild_id": world.guild_id, "channels": self.channels}

    async def do_cpu(self) -> float:
        return time.process_time()

    async def do_count(self, path: str) -> int:
        return len(self.engine.requests_to(path))

    async def do_round(self, label: str, text: str, art: bool) -> dict[str, Any]:
        """One message per channel, all at once; waits for every reply to be sealed (and its scene art)."""
        since_calls, since_chats = len(self.discord.calls), len(self.engine.requests)
        since_dispatch = len(self.discord.dispatched)
        await asyncio.gather(*(self.discord.user_says(f"{text} [{label} #{i}]", channel_id=channel)
                               for i, channel in enumerate(self.channels)))
        deadline = time.monotonic() + ROUND_S
        done: dict[int, RestCall] = {}
        while len(done) < len(self.channels):
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {label}: {len(done)}/{len(self.channels)} replies")
            for call in self.discord.calls[since_calls:]:
                channel = self._sealed(call)
                if channel is not None:
                    done.setdefault(channel, call)
            await asyncio.sleep(0.01)
        figures = self._figures(since_calls, since_chats, since_dispatch, done)
        # Scene art comes after the reply: wait until each channel's illustrate has finished.
        while art and self._embeddings(since_chats) < len(self.channels):
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {label}: scene art did not finish")
            await asyncio.sleep(0.05)
        if art:
            await asyncio.sleep(0.2)  # the image post after the last embedding
        return figures

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
        added, ends = [], []
        for channel, final in done.items():
            started, content = sent[channel]
            engine_s = next(r.engine_seconds for r in chats if content in str(r.json["messages"]))
            added.append((final.done_at - started) - engine_s)
            ends.append(final.done_at)
        span = max(ends) - min(at for at, _ in sent.values())
        rest = len(self.discord.calls) - since_calls
        return {"added": added, "rate": len(done) / span, "rest_per_reply": rest / len(done),
                "engine_s": statistics.mean(r.engine_seconds for r in chats)}


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


class Bench:
    """One benchmark run: store and bot up against the fakes' process; rounds of simultaneous messages."""

    def __init__(self, args: argparse.Namespace, fakes: FakesProcess, workdir: Path):
        self.args, self.fakes = args, fakes
        self.database_url = args.database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
        self.store = Store(self.database_url)
        self.store_times: dict[str, list[float]] = {}
        self.bot: MasqueBot | None = None

    async def __aenter__(self) -> Bench:
        info = await self.fakes.call("info")
        self.guild_id, self.channels = info["guild_id"], info["channels"]
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
        for channel_id in self.channels:
            await self.bot.pipeline.start_story(channel_id, self.guild_id, PERSONA, "Uma")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.bot is not None:
            await self.bot.close()
            await asyncio.wait_for(self._runner, READY_S)
            await self.bot.engine.close()
        await self.store.close()

    async def round(self, label: str, text: str, art: bool = False) -> dict[str, Any]:
        return {"label": label, **await self.fakes.call("round", label=label, text=text, art=art)}


async def main_async(args: argparse.Namespace, fakes: FakesProcess) -> None:
    with tempfile.TemporaryDirectory(prefix="masque-bench-") as workdir:
        async with Bench(args, fakes, Path(workdir)) as bench:
            await bench.round("warm-up", "We reach the harbour.")  # creates the webhooks, warms caches
            bench.store_times.clear()  # the breakdown covers the measured rounds only
            cpu_before, fakes_before = time.process_time(), await fakes.call("cpu")
            rounds = [await bench.round(f"r{i}", "What do you see now?") for i in range(args.rounds)]
            bot_cpu, fakes_cpu = time.process_time() - cpu_before, await fakes.call("cpu") - fakes_before
            report(args, rounds, bot_cpu, fakes_cpu)
            if args.breakdown:
                print_breakdown(bench.store_times, args.channels * args.rounds)
            if args.scene_rounds:
                await scene_art(bench, args)


async def scene_art(bench: Bench, args: argparse.Namespace) -> None:
    """Rounds with scene art after every reply; the story wanders between PLACES."""
    await bench.store.update_guild_settings(bench.guild_id, scene_art=True, scene_art_every=1)
    stats = bench.bot.pipeline.art.stats
    before = (stats.hits, stats.misses)
    walk = random.Random(11)
    places = list(PLACES)
    for i in range(args.scene_rounds):
        place = places[0] if i == 0 else walk.choice(places)
        await bench.round(f"art{i}", f"We walk on to the {place}.", art=True)
    hits, misses = stats.hits - before[0], stats.misses - before[1]
    painted = await bench.fakes.call("count", path="/v1/images/generations")
    print(f"\nscene art: {hits + misses} illustrations, {hits} reused, {misses} painted "
          f"({painted} image requests in all), hit rate {hits / max(1, hits + misses):.0%} "
          f"at reuse threshold {bench.bot.settings.scene_reuse_threshold}")


def report(args: argparse.Namespace, rounds: list[dict[str, Any]], bot_cpu: float, fakes_cpu: float) -> None:
    added_ms = [a * 1000 for r in rounds for a in r["added"]]
    rates = [r["rate"] for r in rounds]
    rest = statistics.mean(r["rest_per_reply"] for r in rounds)
    engine_ms = statistics.mean(r["engine_s"] for r in rounds) * 1000
    print(f"\nbot benchmark: {args.channels} channels at once x {args.rounds} rounds "
          f"({len(added_ms)} messages), fake engine fixed delay {args.engine_delay * 1000:.0f} ms")
    rows = [("engine time per chat request (mean)", f"{engine_ms:.1f} ms"),
            ("bot added latency p50", f"{percentile(added_ms, 50):.1f} ms"),
            ("bot added latency p99", f"{percentile(added_ms, 99):.1f} ms"),
            ("bot added latency max", f"{max(added_ms):.1f} ms"),
            ("messages handled per second (per round, mean)", f"{statistics.mean(rates):.1f} msg/s"),
            ("REST calls per reply", f"{rest:.2f}"),
            ("bot CPU per message (the bot's process)", f"{bot_cpu / len(added_ms) * 1000:.1f} ms"),
            ("fakes' CPU per message (their own process)", f"{fakes_cpu / len(added_ms) * 1000:.1f} ms")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>12}")


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


def print_breakdown(times: dict[str, list[float]], messages: int) -> None:
    """Store time per message by method, biggest first (includes waiting for SQLite's lock)."""
    print("\nstore time per message (wall, incl. waiting), by method:")
    for name, spent in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:10]:
        print(f"  {name:<24} {len(spent) / messages:5.1f} calls  {sum(spent) / messages * 1000:8.1f} ms")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=50, help="channels sending at once")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (one message per channel each)")
    parser.add_argument("--engine-delay", type=float, default=0.25, help="the fake engine's fixed delay, seconds")
    parser.add_argument("--scene-rounds", type=int, default=6, help="rounds with scene art on (0: skip)")
    parser.add_argument("--database-url", default="", help="default: a SQLite file in a temporary folder")
    parser.add_argument("--breakdown", action="store_true", help="also time the store's methods per message")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    discord.utils.setup_logging(level=logging.WARNING, root=False)
    fakes = FakesProcess(args.channels, args.engine_delay)
    try:
        asyncio.run(main_async(args, fakes))
    finally:
        fakes.close()


if __name__ == "__main__":
    main()
