"""The fake Discord with several guilds (World.add_guilds), as the load benchmark (bench/load.py) uses it.

Real discord.py AutoShardedClients, one per "process", against one FakeDiscord with 2 shards: each gets
the guilds of its shards (the added ones spread over the shards), each added guild has its own text
channels, the same members and the same roles and permissions as the main guild; a message and a webhook
in an added guild's channel carry that guild's id; `listen_again()` gives a process an address of its own,
which every call it makes records as `port`.
"""

from __future__ import annotations

import asyncio

import discord

from tests.fakes.fake_discord import FakeDiscord
from tests.test_fake_discord_shards import server, shard_process, until  # noqa: F401


def test_added_guilds_fall_on_consecutive_shards_and_keep_the_main_guild_as_it_was() -> None:
    fake = FakeDiscord(shards=4)
    world = fake.world
    main_guild, main_channels = world.guild(), list(world.channel_ids)
    added = world.add_guilds(8, 3)
    assert len(added) == 8 and all(len(channels) == 3 for channels in added.values())
    shards = [world.guild_shard(4, g) for g in added]
    assert sorted(shards) == [0, 0, 1, 1, 2, 2, 3, 3]  # each shard gets two: none left without guilds
    assert world.guild_ids == [world.guild_id, *added] and world.channel_ids == main_channels
    assert world.guild()["channels"] == main_guild["channels"]  # the main guild is unchanged
    for guild_id, channels in added.items():
        payload = world.guild(guild_id)
        assert [int(c["id"]) for c in payload["channels"]] == channels
        assert {c["guild_id"] for c in payload["channels"]} == {str(guild_id)}
        assert payload["voice_states"] == payload["threads"] == []
        assert [int(m["user"]["id"]) for m in payload["members"]] == [world.bot_id, world.admin_id, world.user_id]
        assert [r["permissions"] for r in payload["roles"]] == [r["permissions"] for r in main_guild["roles"]]
        assert payload["roles"][0]["id"] == str(guild_id)  # @everyone's id is the guild's
        assert all(world.guild_of(c) == guild_id for c in channels)
    for shard in range(4):
        listed = [int(g["id"]) for g in world.ready("s", "u", (shard, 4))["guilds"]]
        assert listed == world.shard_guilds(shard, 4) and all(world.guild_shard(4, g) == shard for g in listed)


async def test_each_process_gets_its_shards_guilds_and_their_channels(server: FakeDiscord) -> None:  # noqa: F811
    added = server.world.add_guilds(4, 2)
    async with (shard_process(server, shard_count=2, shard_ids=[0]) as first,
                shard_process(server, shard_count=2, shard_ids=[1]) as second):
        processes = (first, second)
        for shard, process in enumerate(processes):
            assert sorted(g.id for g in process.guilds) == sorted(server.world.shard_guilds(shard, 2))
        guild_id, channels = next((g, c) for g, c in added.items() if server.world.guild_shard(2, g) == 1)
        guild = second.get_guild(guild_id)
        assert guild is not None and first.get_guild(guild_id) is None
        assert sorted(c.id for c in guild.text_channels) == sorted(channels)
        assert guild.me is not None  # the bot is a member
        assert guild.get_role(server.world.admin_role_of(guild_id)).permissions.administrator
        assert guild.default_role.id == guild_id and guild.default_role.permissions.send_messages

        said = await server.user_says("Over here, in another guild.", channel_id=channels[1])
        assert said["guild_id"] == str(guild_id)
        await until(lambda: [m.id for m in second.seen] == [int(said["id"])], "the message on the owning shard")
        message = second.seen[0]
        assert message.guild.id == guild_id and message.channel.id == channels[1]
        await asyncio.sleep(0.3)  # room for the other process to get it too, if the fake were to send it
        assert first.seen == []

        # REST for that channel: a webhook of that guild, and its message echoed to the owner alone.
        hook = await message.channel.create_webhook(name="Wren")
        assert hook.guild_id == guild_id
        posted = await hook.send("The lantern is lit.", wait=True)
        assert posted.guild.id == guild_id
        await until(lambda: len(second.seen) == 2, "the webhook message's echo")
        assert second.seen[1].guild.id == guild_id and first.seen == []


async def test_a_process_on_its_own_address_is_told_apart_by_port(server: FakeDiscord) -> None:  # noqa: F811
    own = await server.listen_again()
    own_port = int(own.rsplit(":", 1)[1].split("/")[0])
    assert own_port != server.port
    discord.http.Route.BASE = own  # this "process" calls the fake there (restored by endpoints_restored)
    since = len(server.calls)
    async with shard_process(server, shard_count=1, shard_ids=[0]) as client:
        channel = client.get_channel(server.world.story_channel_id)
        await channel.send("Through my own door.")
    calls = server.calls[since:]
    assert calls and {c.port for c in calls} == {own_port}
    assert server.calls_to("POST", f"/channels/{server.world.story_channel_id}/messages")[-1].port == own_port
