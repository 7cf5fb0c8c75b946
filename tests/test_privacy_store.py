"""bot/store/privacy.py on SQLite and PostgreSQL: forgetting a user or a guild, and the departure clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, inspect, select

from bot.cards import load_card
from bot.store import AuthorKind, NewTurn, SceneArt, Store
from bot.store.models import GuildDeparture, Swipe, Turn, TurnEmbedding, TurnMessage
from tests.conftest import CARDS

GUILD, OTHER_GUILD = 111, 222
ADA, BOB = 501, 502  # Discord user ids
PICTURE = {"kind": "image", "filename": "map.png", "url": "https://cdn.example/map.png",
           "content_type": "image/png", "size": 10}


async def _count(store: Store, model, *where) -> int:
    async with store.read() as session:
        return await session.scalar(select(func.count()).select_from(model).where(*where)) or 0


async def _story_with_talk(store: Store, channel: int, guild: int, tag: str) -> int:
    """A story where Ada and Bob speak and the persona answers each; returns its id."""
    story = await store.start_story(channel, guild, None)
    ada = await store.add_turn(story.id, NewTurn(AuthorKind.USER, f"Ada {tag} one", author_id=ADA,
                                                 author_name="Ada", attachments=[PICTURE], message_ids=[channel + 1]))
    await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "", swipes=[f"Reply to Ada {tag}", "another reply"],
                                           message_ids=[channel + 2]))
    await store.add_turn(story.id, NewTurn(AuthorKind.USER, f"Ada {tag} two", author_id=ADA, author_name="Ada"))
    await store.add_turn(story.id, NewTurn(AuthorKind.USER, f"Bob {tag}", author_id=BOB, author_name="Bob"))
    await store.add_embeddings(story.id, [(ada.id, ada.position, [1.0, 0.0, 0.0])])
    await store.add_summary(story.id, 2, f"Ada and Bob met ({tag}).")
    await store.add_fact(story.id, f"Ada fears the sea ({tag})", author_id=ADA)
    await store.add_fact(story.id, f"Bob owns a boat ({tag})", author_id=BOB)
    await store.add_scene_art(SceneArt(story_id=story.id, turn_id=ada.id, prompt="Ada's map", embedding=[1.0]))
    return story.id


async def test_forget_a_user_in_one_guild(store: Store):
    here = await _story_with_talk(store, 10, GUILD, "here")
    there = await _story_with_talk(store, 20, OTHER_GUILD, "there")
    persona = await store.create_persona(GUILD, load_card(CARDS / "Ilse.png"), author_id=ADA)
    assert await store.count_user_turns(ADA, GUILD) == 2 and await store.count_user_turns(ADA) == 4
    assert await _count(store, Turn) == 8 and await _count(store, TurnMessage) == 4
    assert [p["name"] for p in (await store.export_user(ADA))["personas_authored"]] == [persona.name]

    erased = await store.erase_user(ADA, GUILD)

    assert erased.as_dict() == {"turns": 2, "attachments": 1, "facts": 1, "summaries": 1, "scene_art": 1,
                                "personas_unlinked": 1}
    texts = [t.text for t in await store.recent_turns(here)]
    assert texts == ["Reply to Ada here", "Bob here"]  # the persona's reply and Bob stay
    assert [t.text for t in await store.recent_turns(there)] == [
        "Ada there one", "Reply to Ada there", "Ada there two", "Bob there"]
    assert [f.text for f in await store.facts(here)] == ["Bob owns a boat (here)"]
    assert await store.summaries(here) == [] and len(await store.summaries(there)) == 1
    assert await store.count_scene_art(here) == 0 and await store.count_scene_art(there) == 1
    # What hung off Ada's turns went with them (the database's cascades), not the others'.
    assert await _count(store, TurnMessage) == 3 and await _count(store, Swipe) == 4
    assert await _count(store, TurnEmbedding, TurnEmbedding.story_id == here) == 0
    assert await _count(store, TurnEmbedding, TurnEmbedding.story_id == there) == 1
    kept = await store.get_persona(GUILD, persona.name)
    assert kept is not None and kept.author_id is None
    assert await store.count_user_turns(ADA, GUILD) == 0 and await store.count_user_turns(ADA) == 2


async def test_forget_a_user_everywhere_then_export_is_empty(store: Store):
    await _story_with_talk(store, 10, GUILD, "here")
    await _story_with_talk(store, 20, OTHER_GUILD, "there")
    before = await store.export_user(ADA)
    assert before["guilds"] == [GUILD, OTHER_GUILD]
    assert [t["text"] for t in before["turns"]] == ["Ada here one", "Ada here two", "Ada there one", "Ada there two"]
    assert before["turns"][0]["attachments"] == [PICTURE] and len(before["pinned_facts"]) == 2

    erased = await store.erase_user(ADA)
    assert (erased.turns, erased.attachments, erased.facts, erased.summaries) == (4, 2, 2, 2)
    after = await store.export_user(ADA)
    assert after["turns"] == [] and after["pinned_facts"] == [] and after["guilds"] == []
    assert [t["text"] for t in (await store.export_user(BOB))["turns"]] == ["Bob here", "Bob there"]


async def test_forget_a_guild_leaves_other_guilds_and_the_builtins(store: Store):
    here = await _story_with_talk(store, 10, GUILD, "here")
    there = await _story_with_talk(store, 20, OTHER_GUILD, "there")
    await store.create_persona(GUILD, load_card(CARDS / "Ilse.png"))
    await store.create_persona(OTHER_GUILD, load_card(CARDS / "Ilse.png"))
    await store.save_lorebook(GUILD, None, "World", {"entries": {}})
    await store.save_lorebook(GUILD, here, "Local", {"entries": {}})
    await store.update_guild_settings(GUILD, cooldown_s=5)
    await store.update_channel_settings(10, GUILD, voice_replies="always")
    builtins = len(await store.list_personas(0))

    erased = await store.erase_guild(GUILD)

    assert erased.as_dict() == {"stories": 1, "turns": 4, "personas": 1, "channels": 1, "lorebooks": 1,
                                "settings": 1}  # the story's own book went with the story
    assert await store.get_story(here) is None and await store.active_story(10) is None
    assert await store.guild_settings(GUILD) == {} and await store.channel_settings(10) == {}
    assert await store.lorebooks(GUILD, None) == []
    assert await _count(store, Turn, Turn.story_id == here) == 0
    assert await _count(store, Turn, Turn.story_id == there) == 4
    assert [p.guild_id for p in await store.list_personas(OTHER_GUILD) if p.guild_id] == [OTHER_GUILD]
    assert len(await store.list_personas(0)) == builtins


async def test_departed_guilds_are_purged_after_the_retention_only(store: Store):
    await _story_with_talk(store, 10, GUILD, "here")
    await _story_with_talk(store, 20, OTHER_GUILD, "there")
    left = datetime(2026, 3, 1, tzinfo=UTC)
    await store.guild_left(GUILD, left)
    await store.guild_left(OTHER_GUILD, left)
    await store.guild_left(GUILD, left + timedelta(days=5))  # a second leave does not restart the clock
    assert await store.guild_left_at(GUILD) == left
    assert await store.guilds_back([OTHER_GUILD]) == 1  # added back: it stays

    retention = timedelta(days=30)  # the purge is given "now" less the retention
    assert await store.purge_departed_guilds(left + timedelta(days=29) - retention) == []
    assert await store.active_story(10) is not None
    assert await store.purge_departed_guilds(left + timedelta(days=31) - retention) == [GUILD]
    assert await store.active_story(10) is None and await store.active_story(20) is not None
    assert await store.guild_left_at(GUILD) is None and await _count(store, GuildDeparture) == 0


async def test_the_departures_migration_goes_down_and_up(store: Store):
    async def tables() -> set[str]:
        async with store.engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))

    assert "guild_departures" in await tables()
    await store.guild_left(GUILD, datetime(2026, 3, 1, tzinfo=UTC))
    await store.downgrade("7c1e9a4d2b10")
    assert "guild_departures" not in await tables() and "turns" in await tables()
    await store.upgrade()
    assert "guild_departures" in await tables() and await store.guild_left_at(GUILD) is None
