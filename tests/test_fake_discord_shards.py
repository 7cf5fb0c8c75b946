"""The fake Discord shards its gateway like Discord: real discord.py AutoShardedClients, one per "process".

Each client runs some shards of a count against one FakeDiscord; the fake must give each shard its own
session, the guild (and its events) only to the shard that owns it, DMs to shard 0, RESUME per shard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import discord
import pytest
import yarl

from tests.fakes.discord_payloads import message_payload
from tests.fakes.fake_discord import FakeDiscord

WAIT_S = 10.0


@pytest.fixture
async def server(endpoints_restored: None) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(shards=2) as fake:
        discord.http.Route.BASE = fake.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
        yield fake


class ShardProcess(discord.AutoShardedClient):
    """A bot process running some shards; it keeps the messages it was sent."""

    def __init__(self, **options: object) -> None:
        # The fake sends GUILD_CREATE right after READY: no need to wait discord.py's default 2 s for more.
        super().__init__(intents=discord.Intents.default(), guild_ready_timeout=0.1, **options)
        self.seen: list[discord.Message] = []

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        pass  # the fake has no identify rate limit: no 5 s between this process's shards

    async def on_message(self, message: discord.Message) -> None:
        self.seen.append(message)


@contextlib.asynccontextmanager
async def shard_process(server: FakeDiscord, **options: object) -> AsyncIterator[ShardProcess]:
    """A ready ShardProcess logged in to `server`, closed after."""
    client = ShardProcess(**options)
    runner = asyncio.create_task(client.start(server.token))
    try:
        await asyncio.wait_for(asyncio.shield(client.wait_until_ready()), WAIT_S)
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(runner, WAIT_S)


async def until(condition: Callable[[], bool], what: str, wait_s: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + wait_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def two_processes(server: FakeDiscord) -> AsyncIterator[tuple[ShardProcess, ShardProcess]]:
    """Shards 0 and 1 of 2, one per process, connecting at once."""
    async with contextlib.AsyncExitStack() as stack:
        first, second = await asyncio.gather(
            stack.enter_async_context(shard_process(server, shard_count=2, shard_ids=[0])),
            stack.enter_async_context(shard_process(server, shard_count=2, shard_ids=[1])))
        yield first, second


async def test_two_processes_each_get_only_their_shards_guilds_and_events(server: FakeDiscord) -> None:
    async with two_processes(server) as processes:
        assert server.identified_shards == [(0, 2), (1, 2)]
        assert sorted(tuple(i["shard"]) for i in server.identifies) == [(0, 2), (1, 2)]
        assert server.session(0).session_id != server.session(1).session_id
        owner = server.shard_of()
        assert owner == server.world.guild_shard(2) == (server.world.guild_id >> 22) % 2
        owning, other = processes[owner], processes[1 - owner]
        assert [g.id for g in owning.guilds] == [server.world.guild_id]
        assert list(other.guilds) == []
        assert owning.get_guild(server.world.guild_id).shard_id == owner

        said = await server.user_says("Which shard hears me?")
        await until(lambda: [m.id for m in owning.seen] == [int(said["id"])], "the owning shard's message")
        await asyncio.sleep(0.3)  # room for the other shard to get it too, if the fake were to send it
        assert other.seen == []
        assert server.session(1 - owner).seq == 1  # READY only: no guild, no events

        # A DM has no guild: shard 0 gets it, whoever owns the guild.
        dm = message_payload(server.world, server.world.ids.next(), server.world.ids.next(),
                             server.world.users()[server.world.user_id], "psst")
        del dm["guild_id"]
        await server.dispatch("MESSAGE_CREATE", dm)
        await until(lambda: int(dm["id"]) in [m.id for m in processes[0].seen], "the DM on shard 0")
        await asyncio.sleep(0.3)
        assert int(dm["id"]) not in [m.id for m in processes[1].seen]
        assert processes[0].seen[-1].guild is None


async def test_a_dropped_shard_resumes_and_gets_only_what_it_missed(server: FakeDiscord) -> None:
    async with two_processes(server) as processes:
        owner = server.shard_of()
        owning, other = processes[owner], processes[1 - owner]
        session = server.session(owner)
        before = await server.user_says("Before the drop.")
        await until(lambda: len(owning.seen) == 1, "the first message")

        await server.drop_gateway(4000, shard=owner)
        assert session.sockets == [] and server.session(1 - owner).sockets != []  # the other shard stays
        missed = await server.user_says("While the shard is away.")  # kept for the shard's RESUME

        await until(lambda: len(owning.seen) == 2, "the missed message, replayed")
        await asyncio.sleep(0.3)  # room for a replay of the first message, if the fake were to send it
        assert [m.id for m in owning.seen] == [int(before["id"]), int(missed["id"])]
        assert [r["session_id"] for r in server.resumes] == [session.session_id]
        assert len(server.identifies) == 2  # resumed, not identified again
        assert server.session(owner) is session and session.sockets != []
        assert other.seen == []


async def test_a_second_identify_for_a_shard_replaces_its_session(server: FakeDiscord) -> None:
    owner = server.shard_of()
    async with shard_process(server, shard_count=2, shard_ids=[owner]):
        first = server.session(owner)
    async with shard_process(server, shard_count=2, shard_ids=[owner]) as again:
        second = server.session(owner)
        assert second is not first and second.session_id != first.session_id
        assert server.identified_shards == [(owner, 2)]
        said = await server.user_says("Hello again.")
        await until(lambda: [m.id for m in again.seen] == [int(said["id"])], "the message on the new session")
        assert [e[1] for e in first.sent] == ["READY", "GUILD_CREATE"]  # the old session got nothing more


async def test_the_bots_voice_state_carries_the_session_of_the_shard_that_asked(server: FakeDiscord) -> None:
    owner = server.shard_of()
    async with (shard_process(server, shard_count=2, shard_ids=[1 - owner]),  # the other shard identifies first
                shard_process(server, shard_count=2, shard_ids=[owner]) as owning):
        session = server.session(owner)
        guild = owning.get_guild(server.world.guild_id)
        await guild.change_voice_state(channel=guild.get_channel(server.world.voice_channel_id))  # op 4
        await until(lambda: guild.me.voice is not None, "the bot's voice state")
        assert guild.me.voice.channel.id == server.world.voice_channel_id
        assert [e for e, _, _ in server.dispatched][-2:] == ["VOICE_STATE_UPDATE", "VOICE_SERVER_UPDATE"]
        assert server.dispatched[-2][1]["session_id"] == session.session_id != server.session(1 - owner).session_id

        await server.move_bot(server.world.other_voice_channel_id)  # a moderator: the owner's session too
        await until(lambda: guild.me.voice.channel.id == server.world.other_voice_channel_id, "the move")
        assert server.dispatched[-2][1]["session_id"] == session.session_id


@pytest.mark.parametrize("shards", [1, 3])
async def test_a_process_without_a_count_learns_it_from_gateway_bot(server: FakeDiscord, shards: int) -> None:
    server.shards = shards
    async with shard_process(server) as client:  # shard_count None: GET /gateway/bot
        assert client.shard_count == shards and sorted(client.shards) == list(range(shards))
        assert server.calls_to("GET", "/gateway/bot")
        assert server.identified_shards == [(n, shards) for n in range(shards)]
        guild = client.get_guild(server.world.guild_id)
        assert guild is not None and guild.shard_id == server.shard_of(shard_count=shards)
        said = await server.user_says("One process, every shard.")
        await until(lambda: [m.id for m in client.seen] == [int(said["id"])], "the message")


async def test_a_shard_outside_its_count_is_refused(server: FakeDiscord) -> None:
    client = ShardProcess(shard_count=2, shard_ids=[2])
    try:
        with pytest.raises(discord.ConnectionClosed) as closed:
            await asyncio.wait_for(client.start(server.token), WAIT_S)
        assert closed.value.code == 4010  # Discord's "Invalid shard"
    finally:
        await client.close()
    assert server.identified_shards == []
