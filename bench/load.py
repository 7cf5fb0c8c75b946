"""Load benchmark (not a test): many channels at once, the bot sharded over several processes on PostgreSQL.

Run from the repository root (a PostgreSQL server is needed)::

    MASQUE_TEST_POSTGRES_URL=postgresql+asyncpg://USER:PASS@HOST:5432/postgres .venv/bin/python bench/load.py
    .venv/bin/python bench/load.py --channels 1000 --guilds 100 --shards 4 --processes 2 --rounds 3 \\
        --engine-delay 0.25 --database-url postgresql+asyncpg://USER:PASS@HOST/DB   # an EMPTY database

Without --database-url it creates a fresh database on the server named by MASQUE_TEST_POSTGRES_URL and
drops it after. Issue 11's shape: 1,000 channels (--guilds G x --channels/G each) over the fake Discord
with 4 shards, the real MasqueBot in 2 OS processes (MASQUE_SHARD_COUNT=4, MASQUE_SHARD_IDS=0-1 and
2-3), each with its own Store on the one database and its LISTEN connection, and the fake engine with a
fixed delay. The fakes (tests/fakes: the sharded fake Discord, each guild's events sent to the shard
owning it by (guild_id >> 22) % shards, and the fake engine) run in a process of their own, as in
bench/bot.py, whose pieces this reuses: the fakes' process and its pipe, the user's messages, what a
sealed reply is (the final webhook edit, the one that puts the buttons on) and the added latency.

Set-up, not timed: migrate, sync the built-in personas, cooldown 0 in every guild, a story with Wren
Halloway in every channel (through the store), then a warm-up round (every channel's first reply
creates its webhook), checked like the others but not in the figures. Each measured round: one user
message in every channel at once (MESSAGE_CREATE through the gateway), then wait until every
channel's reply is sealed, and a little longer for a second reply, were one coming. It prints, per
round and overall:

- messages handled per second (the round's messages / from its first dispatch to its last sealed
  reply; a round lasts at least the engine's fixed delay);
- the bot's added latency p50/p99: dispatch -> final webhook edit, minus the engine's time on that
  message's chat request;
- replies per message, by user message id: each must get exactly one persona reply, sealed; lost
  (none) and duplicated (more than one) messages are counted and listed;
- which process answered which shard's channels: every bot process calls the fake Discord on an
  address of its own, so each reply's REST calls say who made them; a channel must be answered only
  by the process running the shard of its guild;
- each bot process's CPU seconds per message it answered.

It exits non-zero when a reply was lost or duplicated, or came from a process not owning its shard.
The bot processes and the fakes share this machine's cores: on a small machine the figures are an upper
bound of the bot's own cost. For a burst of N simultaneous messages the added latency cannot be below
about N x the CPU per message (bots, fakes and PostgreSQL together) / the cores.

First figures (December 2026, a 2-core machine, the defaults, 3 rounds): 48.7 msg/s, added latency p50
15.4 s / p99 20.5 s, 4,000 messages with exactly one reply each, every channel answered by its shard's
process, ~31 ms bot CPU per message in each process, 4.2 ms in the fakes: CPU-bound (1,000 x ~35 ms,
plus PostgreSQL's, over 2 cores is at least ~18 s a round; a round took ~20.5 s). With --processes 1 on
the same machine: 41.9 msg/s, p50 18.4 s / p99 25.2 s, 24 ms CPU per message, its one process saturating
a core.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import discord  # noqa: E402
import yarl  # noqa: E402

from bench.bot import CAST, PERSONA, READY_S, ROUND_S, ChildProcess, FakeWorld, Served, percentile  # noqa: E402
from bot import event_loop  # noqa: E402
from bot.app import MasqueBot, apply_endpoints  # noqa: E402
from bot.builtin import builtin_personas  # noqa: E402
from bot.engine_client import EngineClient  # noqa: E402
from bot.pipeline import StoryPipeline  # noqa: E402
from bot.settings import BotSettings  # noqa: E402
from bot.store import Store  # noqa: E402
from tests.conftest import POSTGRES_ENV, _drop_postgres_database, _postgres_database  # noqa: E402
from tests.fakes.fake_discord import FakeDiscord, RestCall  # noqa: E402
from tests.fakes.openai_shapes import message_text  # noqa: E402

TEXT = f"{CAST[0][1]}, what do you see now?"
TAG = re.compile(r"\[(\S+) #(\d+)\]")  # the label say_all puts on each message: [round #index]
SET_UP_AT_ONCE = 10  # stories started concurrently during set-up (a Store's pool: 15)


# -- the fakes' process ------------------------------------------------------------------------------


def load_fakes_main(conn: Connection, guilds: int, channels_each: int, shards: int, processes: int,
                    engine_delay: float) -> None:
    """The fakes' process: the sharded fake Discord with `guilds` guilds and the fake engine."""
    asyncio.run(LoadWorld(guilds, channels_each, shards, processes, engine_delay).serve(conn))


class LoadWorld(FakeWorld):
    """bench/bot.py's FakeWorld with several guilds over `shards` shards, one address per bot process, and
    rounds that account for every reply by user message id and by the process that sent it."""

    def __init__(self, guilds: int, channels_each: int, shards: int, processes: int, engine_delay: float) -> None:
        super().__init__(0, engine_delay, FakeDiscord(shards=shards))
        self.guilds = self.discord.world.add_guilds(guilds, channels_each)
        self.processes = processes
        self.api_bases: list[str] = []  # one per bot process: its calls come in on that address's port

    async def do_info(self) -> dict[str, Any]:
        if not self.api_bases:
            for _ in range(self.processes):
                self.api_bases.append(await self.discord.listen_again())
        return {"token": self.discord.token, "gateway_url": self.discord.gateway_url, "engine_url": self.engine.url,
                "api_bases": self.api_bases, "ports": [yarl.URL(base).port for base in self.api_bases],
                "guilds": self.guilds}

    async def do_round(self, label: str, texts: dict[int, str], settle_s: float) -> dict[str, Any]:
        """One message in each channel of `texts` at once; waits until every reply is sealed (or ROUND_S), then
        `settle_s` more for replies that should not come. Returns the round's figures (bench/bot.py's) and,
        per user message, its replies and who sent them."""
        since_calls, since_chats = len(self.discord.calls), len(self.engine.requests)
        since_dispatch = len(self.discord.dispatched)
        sent = await self.say_all(label, texts)
        done = await self.sealed_replies(set(texts), since_calls, time.monotonic() + ROUND_S)
        await asyncio.sleep(settle_s)
        figures = self._figures(since_calls, since_chats, since_dispatch, done) if done else {"added": [], "rate": 0.0}
        added = dict(zip(done, figures["added"], strict=True))
        posts, sealed = self._replies(since_calls)
        chats = Counter(int(m.group(2)) for r in self.engine.requests[since_chats:] if r.path == "/v1/chat/completions"
                        and (m := TAG.search(message_text(r.json["messages"][-1]))) and m.group(1) == label)
        messages = []
        for i, message in enumerate(sent):
            channel = int(message["channel_id"])
            messages.append({"id": int(message["id"]), "channel": channel, "guild": int(message["guild_id"]),
                             "posts": len(posts.get(channel, [])), "sealed": len(sealed.get(channel, {})),
                             "ports": sorted({c.port for c in posts.get(channel, [])}
                                             | {c.port for c in sealed.get(channel, {}).values()}),
                             "chats": chats[i], "added": added.get(channel)})
        return {"rate": figures["rate"], "messages": messages}

    def _replies(self, since_calls: int) -> tuple[dict[int, list[RestCall]], dict[int, dict[int, RestCall]]]:
        """Persona messages posted since `since_calls`, by channel, and the sealing edits by channel and message."""
        posts: dict[int, list[RestCall]] = {}
        sealed: dict[int, dict[int, RestCall]] = {}
        for call in self.discord.calls[since_calls:]:
            if (channel := self._sealed(call)) is not None:
                sealed.setdefault(channel, {})[int(call.response["id"])] = call
            elif (channel := self._persona_post(call)) is not None:
                posts.setdefault(channel, []).append(call)
        return posts, sealed

    def _persona_post(self, call: RestCall) -> int | None:
        """The channel of a message a persona webhook posted (POST /webhooks/{id}/{token}), else None."""
        parts = call.path.split("/")
        if call.method != "POST" or len(parts) != 4 or parts[1] != "webhooks" or call.status not in (200, 204):
            return None
        hook = self.discord.webhooks.get(int(parts[2]))
        if hook is None:  # an interaction follow-up (the application's id), or a deleted webhook
            return None
        return int((call.response or {}).get("channel_id") or hook["channel_id"])


# -- a bot process ---------------------------------------------------------------------------------


def worker_main(conn: Connection, database_url: str, env: dict[str, str]) -> None:
    """A bot process: the real MasqueBot on some shards (MASQUE_SHARD_IDS in `env`), its own Store."""
    logging.basicConfig(level=logging.WARNING)
    discord.utils.setup_logging(level=logging.WARNING, root=False)
    event_loop.run(BotWorker(database_url, env).serve(conn))  # the loop masque-bot runs on


class BotWorker(Served):
    """One bot process, answering the parent's commands: ready (which guilds and shards it got), cpu, stop."""

    def __init__(self, database_url: str, env: dict[str, str]) -> None:
        super().__init__()
        self.database_url, self.env = database_url, env
        self.bot: MasqueBot | None = None
        self._runner: asyncio.Task | None = None

    async def serve(self, conn: Connection) -> None:
        settings = BotSettings(_env_file=None, MASQUE_DATABASE_URL=self.database_url, **self.env)
        apply_endpoints(settings)  # this process's own address of the fake Discord
        store = Store(self.database_url)
        await store.listen()  # other processes' changes reach this one's cache
        self.bot = MasqueBot(settings, store, EngineClient.from_settings(settings))
        self._runner = asyncio.create_task(self.bot.start(settings.discord_token.get_secret_value()))
        try:
            await self.serve_commands(conn)
        finally:
            await self.bot.close()
            await asyncio.wait_for(self._runner, READY_S)
            await self.bot.engine.close()
            await store.close()

    async def do_ready(self) -> dict[str, Any]:
        """Wait until every shard of this process is ready; the guilds and shards it has."""
        assert self.bot is not None and self._runner is not None
        ready = asyncio.ensure_future(self.bot.wait_until_ready())
        await asyncio.wait({ready, self._runner}, timeout=READY_S, return_when=asyncio.FIRST_COMPLETED)
        if self._runner.done():
            ready.cancel()
            self._runner.result()  # raises what stopped the bot
            raise RuntimeError("the bot stopped before it was ready")
        if not ready.done():
            ready.cancel()
            raise TimeoutError(f"the bot was not ready in {READY_S:.0f} s")
        return {"guilds": sorted(g.id for g in self.bot.guilds), "shards": sorted(self.bot.shards)}


# -- the parent ----------------------------------------------------------------------------------


def shard_split(shards: int, processes: int) -> list[list[int]]:
    """Each process's shard ids: contiguous runs, as even as they go (4 over 2: [0, 1], [2, 3])."""
    return [list(range(i * shards // processes, (i + 1) * shards // processes)) for i in range(processes)]


def shard_ids_setting(ids: list[int]) -> str:
    """MASQUE_SHARD_IDS for these ids: "0-1" for a run, else "0,2"."""
    contiguous = ids == list(range(ids[0], ids[-1] + 1))
    return f"{ids[0]}-{ids[-1]}" if contiguous and len(ids) > 1 else ",".join(map(str, ids))


@dataclass
class Process:
    """What the parent knows of one bot process."""

    index: int
    shards: list[int]
    port: int
    handle: ChildProcess
    guilds: set[int] = field(default_factory=set)
    cpu_s: float = 0.0  # during measured rounds
    answered: int = 0  # measured messages of its channels
    shard_channels: Counter = field(default_factory=Counter)  # shard -> channels it answered (every round)


@dataclass
class Tally:
    """Replies per user message, over every round (warm-up included)."""

    messages: int = 0
    lost: list[int] = field(default_factory=list)  # user message ids with no sealed reply
    duplicated: list[int] = field(default_factory=list)  # with more than one reply (or chat request)
    wrong_process: list[int] = field(default_factory=list)  # answered by a process not owning the shard
    replies: Counter = field(default_factory=Counter)  # replies per message -> messages


class LoadBench:
    """The fakes, the database and the bot processes, and the rounds."""

    def __init__(self, args: argparse.Namespace, database_url: str) -> None:
        self.args, self.database_url = args, database_url
        self.fakes = ChildProcess(load_fakes_main, args.guilds, args.channels // args.guilds, args.shards,
                                  args.processes, args.engine_delay, name="fakes")
        self.processes: list[Process] = []
        self.tally = Tally()
        self.rounds: list[dict[str, Any]] = []
        self.fakes_cpu_s = 0.0  # the fakes' process, during measured rounds

    async def start(self) -> None:
        info = await self.fakes.call("info")
        self.guilds: dict[int, list[int]] = info["guilds"]
        self.channel_guild = {ch: g for g, channels in self.guilds.items() for ch in channels}
        await self.set_up_database(info["engine_url"])
        for index, shards in enumerate(shard_split(self.args.shards, self.args.processes)):
            env = {"DISCORD_TOKEN": info["token"], "MASQUE_ENGINE_URL": info["engine_url"],
                   "DISCORD_API_BASE": info["api_bases"][index], "DISCORD_GATEWAY_URL": info["gateway_url"],
                   "MASQUE_SHARD_COUNT": str(self.args.shards), "MASQUE_SHARD_IDS": shard_ids_setting(shards)}
            handle = ChildProcess(worker_main, self.database_url, env, name=f"bot-{index}")
            self.processes.append(Process(index, shards, info["ports"][index], handle))
        for process in self.processes:
            ready = await process.handle.call("ready")
            process.guilds = set(ready["guilds"]) & set(self.guilds)  # the fake's main guild is not played
            assert ready["shards"] == process.shards, (ready["shards"], process.shards)

    async def set_up_database(self, engine_url: str) -> None:
        """Migrate, built-in personas, cooldown 0 in every guild, a story in every channel (not timed)."""
        store = Store(self.database_url)
        settings = BotSettings(_env_file=None, MASQUE_DATABASE_URL=self.database_url, MASQUE_ENGINE_URL=engine_url)
        engine = EngineClient.from_settings(settings)
        pipeline = StoryPipeline(store, engine, settings)
        try:
            await store.upgrade()
            await store.sync_builtin_personas(builtin_personas())
            for guild in self.guilds:
                await store.update_guild_settings(guild, cooldown_s=0)
            at_once = asyncio.Semaphore(SET_UP_AT_ONCE)

            async def start_story(channel: int, guild: int) -> None:
                async with at_once:
                    await pipeline.start_story(channel, guild, PERSONA, "Uma")
            await asyncio.gather(*(start_story(ch, g) for ch, g in self.channel_guild.items()))
        finally:
            await pipeline.close()
            await engine.close()
            await store.close()

    def owner(self, guild: int) -> Process:
        """The process running the shard that gets `guild`'s events."""
        shard = (guild >> 22) % self.args.shards
        return next(p for p in self.processes if shard in p.shards)

    async def round(self, label: str, measured: bool) -> dict[str, Any]:
        """One message in every channel at once; tallies its replies (and the CPU of each process, when measured)."""
        cpu, fakes_cpu = [await p.handle.call("cpu") for p in self.processes], await self.fakes.call("cpu")
        result = await self.fakes.call("round", label=label, texts=dict.fromkeys(self.channel_guild, TEXT),
                                       settle_s=max(0.5, 2 * self.args.engine_delay))
        spent = [await p.handle.call("cpu") - before for p, before in zip(self.processes, cpu, strict=True)]
        fakes_spent = await self.fakes.call("cpu") - fakes_cpu
        by_port = {p.port: p for p in self.processes}
        summary = {"label": label, "rate": result["rate"], "lost": 0, "duplicated": 0, "wrong_process": 0,
                   "added_ms": [], "per_process": Counter()}
        for message in result["messages"]:
            self.tally.messages += 1
            self.tally.replies[message["posts"]] += 1
            owner = self.owner(message["guild"])
            answered_by = [by_port[port] for port in message["ports"]]
            if message["sealed"] == 0 or message["posts"] == 0:
                self.tally.lost.append(message["id"])
                summary["lost"] += 1
            elif message["posts"] > 1 or message["sealed"] > 1 or message["chats"] > 1:
                self.tally.duplicated.append(message["id"])
                summary["duplicated"] += 1
            if any(p is not owner for p in answered_by):
                self.tally.wrong_process.append(message["id"])
                summary["wrong_process"] += 1
            for process in answered_by:
                process.shard_channels[(message["guild"] >> 22) % self.args.shards] += 1
            if message["added"] is not None:
                summary["added_ms"].append(message["added"] * 1000)
            summary["per_process"][owner.index] += 1
        if measured:
            self.fakes_cpu_s += fakes_spent
            for process, cpu_s in zip(self.processes, spent, strict=True):
                process.cpu_s += cpu_s
                process.answered += summary["per_process"][process.index]
            self.rounds.append(summary)
        summary["cpu_ms"] = [s / max(1, summary["per_process"][p.index]) * 1000
                             for p, s in zip(self.processes, spent, strict=True)]
        print_round(summary, len(result["messages"]))
        return summary

    async def close(self) -> None:
        for process in self.processes:
            process.handle.close(wait_s=READY_S)
        self.fakes.close()


def print_round(summary: dict[str, Any], messages: int) -> None:
    added = summary["added_ms"] or [float("nan")]
    cpu = ", ".join(f"bot-{i} {ms:.1f}" for i, ms in enumerate(summary["cpu_ms"]))
    print(f"  {summary['label']:<8} {messages} messages, {summary['rate']:7.1f} msg/s, added latency "
          f"p50 {percentile(added, 50):7.1f} ms, p99 {percentile(added, 99):7.1f} ms; lost {summary['lost']}, "
          f"duplicated {summary['duplicated']}, from the wrong process {summary['wrong_process']}; "
          f"CPU ms/message: {cpu}", flush=True)


def plural(count: int, noun: str) -> str:
    """ "1 bot process", "2 bot processes"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('s') else 's'}"


def report(bench: LoadBench) -> dict[str, Any]:
    """Print the overall figures; returns them."""
    args, tally = bench.args, bench.tally
    added = [ms for r in bench.rounds for ms in r["added_ms"]]
    figures = {
        "channels": len(bench.channel_guild), "guilds": len(bench.guilds), "shards": args.shards,
        "processes": args.processes, "rounds": len(bench.rounds), "messages": tally.messages,
        "msg_per_s": statistics.mean(r["rate"] for r in bench.rounds) if bench.rounds else 0.0,
        "p50_ms": percentile(added, 50) if added else None, "p99_ms": percentile(added, 99) if added else None,
        "lost": list(tally.lost), "duplicated": list(tally.duplicated), "wrong_process": list(tally.wrong_process),
        "replies_per_message": dict(tally.replies),
        "fakes_cpu_ms_per_message": bench.fakes_cpu_s / max(1, sum(p.answered for p in bench.processes)) * 1000,
        "per_process": [{"shards": p.shards, "guilds": len(p.guilds), "shard_channels": dict(p.shard_channels),
                         "cpu_ms_per_message": p.cpu_s / p.answered * 1000 if p.answered else None}
                        for p in bench.processes]}
    print(f"\nload benchmark: {figures['channels']} channels in {figures['guilds']} guilds, {args.shards} shards in "
          f"{plural(args.processes, 'bot process')}, PostgreSQL, fake engine fixed delay "
          f"{args.engine_delay * 1000:.0f} ms; "
          f"{plural(len(bench.rounds), 'measured round')}")
    if added:
        print(f"  messages handled per second (per round, mean)  {figures['msg_per_s']:.1f} msg/s")
        print(f"  bot added latency p50 / p99                    {figures['p50_ms']:.1f} / {figures['p99_ms']:.1f} ms")
    print(f"  the fakes' CPU per message (their own process)  {figures['fakes_cpu_ms_per_message']:.1f} ms")
    counts = ", ".join(f"{n} repl{'y' if n == 1 else 'ies'}: {m}" for n, m in sorted(tally.replies.items()))
    print(f"  replies per message (every round, warm-up included, {tally.messages} messages): {counts}")
    print(f"  lost {len(tally.lost)}, duplicated {len(tally.duplicated)}, "
          f"answered by a process not running the guild's shard {len(tally.wrong_process)}")
    for ids, what in ((tally.lost, "lost"), (tally.duplicated, "duplicated"), (tally.wrong_process, "wrong process")):
        if ids:
            print(f"    {what}: message ids {ids[:10]}{' ...' if len(ids) > 10 else ''}")
    print("  who answered (channels answered, every round, by the shard of their guild):")
    for p, f in zip(bench.processes, figures["per_process"], strict=True):
        shards = ", ".join(f"shard {s}: {n}" for s, n in sorted(p.shard_channels.items())) or "none"
        cpu = f"{f['cpu_ms_per_message']:.1f} ms" if f["cpu_ms_per_message"] is not None else "n/a"
        print(f"    bot-{p.index} (shards {shard_ids_setting(p.shards)}, {len(p.guilds)} guilds): {shards}; "
              f"CPU per message {cpu}")
    return figures


async def run(args: argparse.Namespace, database_url: str) -> dict[str, Any]:
    bench = LoadBench(args, database_url)
    try:
        started = time.monotonic()
        await bench.start()
        print(f"set-up: {len(bench.channel_guild)} stories, {plural(args.processes, 'bot process')} ready in "
              f"{time.monotonic() - started:.1f} s", flush=True)
        await bench.round("warm-up", measured=False)
        for number in range(args.rounds):
            await bench.round(f"r{number}", measured=True)
        return report(bench)
    finally:
        await bench.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.database_url:
        return await run(args, args.database_url)
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        raise SystemExit(f"bench/load.py runs on PostgreSQL: give --database-url (an empty database) or set "
                         f"{POSTGRES_ENV} to a server URL (a fresh database is made there and dropped after)")
    url, name = await _postgres_database(server)
    try:
        return await run(args, url)
    finally:
        await _drop_postgres_database(server, name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=1000, help="channels in all (split evenly over the guilds)")
    parser.add_argument("--guilds", type=int, default=100, help="guilds the channels are in")
    parser.add_argument("--shards", type=int, default=4, help="the bot's shards in all (MASQUE_SHARD_COUNT)")
    parser.add_argument("--processes", type=int, default=2, help="bot processes sharing the shards")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (one message per channel each)")
    parser.add_argument("--engine-delay", type=float, default=0.25, help="the fake engine's fixed delay, seconds")
    parser.add_argument("--database-url", default="",
                        help=f"an EMPTY PostgreSQL database (default: a fresh one on {POSTGRES_ENV}'s server)")
    args = parser.parse_args(argv)
    if args.channels % args.guilds or args.channels < args.guilds:
        parser.error("--channels must be a multiple of --guilds")
    if not 1 <= args.processes <= args.shards:
        parser.error("--processes must be between 1 and --shards")
    if args.database_url and not args.database_url.startswith("postgresql"):
        parser.error("--database-url must be a PostgreSQL URL (postgresql+asyncpg://...)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the printed figures (lost, duplicated and wrong_process list message ids)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    discord.utils.setup_logging(level=logging.WARNING, root=False)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result["lost"] or result["duplicated"] or result["wrong_process"] else 0)
