"""The SQL store on real SQLite and PostgreSQL: personas, stories, turns, swipes, concurrency."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from bot.cards import parse_card
from bot.store import (
    GLOBAL_GUILD,
    AuthorKind,
    DuplicateMessage,
    NewTurn,
    PersonaExists,
    SceneArt,
    SceneKey,
    Store,
    Story,
    StoryStatus,
)

GUILD, CHANNEL, OTHER_CHANNEL = 111, 222, 333


def card_bytes(name: str, **data) -> bytes:
    return json.dumps({"spec": "chara_card_v3", "spec_version": "3.0",
                       "data": {"name": name, "first_mes": "Hi", **data}}).encode()


async def new_story(store: Store, channel: int = CHANNEL) -> Story:
    persona = await store.get_persona(GUILD, "Old Mossback")
    return await store.start_story(channel, GUILD, persona.id)


async def test_builtins_are_synced_once(store: Store):
    names = [p.name for p in await store.list_personas(GUILD)]
    assert {"Wren Halloway", "Captain Isolde Varga", "Old Mossback"} <= set(names)
    from bot.builtin import builtin_personas

    await store.sync_builtin_personas(builtin_personas())
    assert len(await store.list_personas(GUILD)) == len(names)


async def test_persona_crud_and_lookup(store: Store):
    parsed = parse_card(card_bytes("Ada", extensions={"masque": {"art_style": "ink", "voice": "joe"}}), "ada.json")
    ada = await store.create_persona(GUILD, parsed, author_id=7)
    assert ada.art_style == "ink" and ada.voice == "joe" and ada.author_id == 7
    with pytest.raises(PersonaExists):
        await store.create_persona(GUILD, parse_card(card_bytes("ADA"), "dup.json"))
    await store.create_persona(GUILD + 1, parsed)  # the same name in another guild is fine
    assert (await store.get_persona(GUILD, "ada")).id == ada.id
    assert await store.get_persona(999, "Ada") is None
    assert "Ada" in await store.persona_names(GUILD, "ad")
    renamed = parse_card(card_bytes("Ada Lovelace"), "r.json").card
    assert (await store.update_persona(ada.id, card=renamed)).name == "Ada Lovelace"
    assert await store.delete_persona(GUILD, "ada lovelace")
    assert not await store.delete_persona(GUILD, "ada lovelace")
    assert not await store.delete_persona(GLOBAL_GUILD, "Old Mossback")  # built-ins stay


async def test_a_guild_persona_shadows_a_builtin(store: Store):
    mine = await store.create_persona(GUILD, parse_card(card_bytes("Old Mossback"), "m.json"))
    assert (await store.get_persona(GUILD, "old mossback")).id == mine.id
    assert (await store.get_persona(GUILD + 5, "old mossback")).scope == "builtin"


async def test_story_lifecycle_one_active_per_channel(store: Store):
    first = await new_story(store)
    second = await new_story(store)
    stories = await store.stories(CHANNEL)
    assert [s.status for s in stories] == [StoryStatus.ARCHIVED, StoryStatus.ACTIVE]
    assert (await store.active_story(CHANNEL)).id == second.id != first.id
    # The database itself refuses a second active story in a channel.
    with pytest.raises(IntegrityError):
        async with store.session() as session:
            session.add(Story(channel_id=CHANNEL, guild_id=GUILD, status=StoryStatus.ACTIVE, turn_seq=0))
    assert (await store.end_story(CHANNEL)).id == second.id
    assert await store.active_story(CHANNEL) is None
    assert await store.end_story(CHANNEL) is None


async def test_turns_swipes_messages_and_rewind(store: Store):
    story = await new_story(store)
    user = await store.add_turn(story.id, NewTurn(AuthorKind.USER, "Hello", author_id=5, author_name="Sam",
                                                  attachments=[{"kind": "audio", "transcript": "Hello"}],
                                                  message_ids=[1001]))
    reply = await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "Hrrm.", swipes=["Hrrm.", "Hmm?"],
                                                   message_ids=[2001, 2002]))
    assert (user.position, reply.position) == (1, 2)
    assert [s.text for s in reply.swipes] == ["Hrrm.", "Hmm?"] and reply.text == "Hrrm."
    assert (await store.turn_by_message(2002)).id == reply.id
    swiped = await store.add_swipe(reply.id, "Well now.", token_count=3)
    assert swiped.selected_swipe == 2 and swiped.text == "Well now."
    back = await store.select_swipe(reply.id, 0)
    assert back.text == "Hrrm." and back.selected_swipe == 0
    assert (await store.select_swipe(reply.id, 99)).selected_swipe == 2  # clamped
    edited = await store.edit_turn(user.id, "Hello there")
    assert edited.text == "Hello there" and edited.attachments[0]["transcript"] == "Hello"
    await store.set_turn_messages(reply.id, [3001])
    assert await store.turn_by_message(2001) is None and (await store.turn_by_message(3001)).id == reply.id
    turns = await store.recent_turns(story.id)
    assert [t.text for t in turns] == ["Hello there", "Well now."]
    removed = await store.rewind(story.id, 1)
    assert [t.id for t in removed] == [reply.id]
    assert await store.count_turns(story.id) == 1 and await store.turn_by_message(3001) is None
    nxt = await store.add_turn(story.id, NewTurn(AuthorKind.USER, "again"))
    assert nxt.position == 3  # positions never repeat, even after a rewind


async def test_a_turn_is_stored_whole_or_not_at_all(store: Store):
    story = await new_story(store)
    first = await store.add_turn(story.id, NewTurn(AuthorKind.USER, "Knock knock", message_ids=[71]))
    with pytest.raises(DuplicateMessage):  # one of its messages already shows a turn
        await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "Who?", swipes=["Who?", "Yes?"],
                                               message_ids=[72, 71]))
    with pytest.raises(LookupError, match="does not exist"):
        await store.add_turn(story.id + 1000, NewTurn(AuthorKind.USER, "Anyone?", message_ids=[73]))
    assert [(t.text, [m.message_id for m in t.messages]) for t in await store.recent_turns(story.id)] == [
        ("Knock knock", [71])]
    assert await store.turn_by_message(72) is None and await store.turn_by_message(73) is None
    second = await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "Who?", swipes=["Who?", "Yes?"],
                                                    token_count=2, message_ids=[74, 75]))
    stored = await store.get_turn(second.id)
    for turn in (second, stored):  # what add_turn returns is what was stored
        assert turn.position == first.position + 1  # the refused turn took no position
        assert [(s.index, s.text, s.token_count) for s in turn.swipes] == [(0, "Who?", 2), (1, "Yes?", 2)]
        assert [(m.message_id, m.part) for m in turn.messages] == [(74, 0), (75, 1)]
        assert (turn.author_kind, turn.text, turn.selected_swipe) == (AuthorKind.PERSONA, "Who?", 0)


async def test_turns_answered_after_a_reply_that_came_meanwhile_move_after_it(store: Store):
    story = await new_story(store)
    first = await store.add_turn(story.id, NewTurn(AuthorKind.USER, "first", author_name="Sam"))
    await store.answer_after(story.id, [first])
    assert first.position == 1  # no persona turn came after it: it stays
    second = await store.add_turn(story.id, NewTurn(AuthorKind.USER, "second", author_name="Ada"))
    await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "answer to first"))  # written while Ada wrote
    await store.answer_after(story.id, [second])
    assert second.position == 4
    turns = await store.recent_turns(story.id)
    assert [t.text for t in turns] == ["first", "answer to first", "second"]
    assert [t.position for t in turns] == [1, 3, 4]
    assert (await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "answer to second"))).position == 5


async def test_last_persona_id_is_the_newest_persona_turn_s(store: Store):
    story = await new_story(store)
    assert await store.last_persona_id(story.id) is None
    first = (await store.list_personas())[0].id
    second = (await store.list_personas())[1].id
    await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "a", persona_id=first))
    await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "b", persona_id=second))
    await store.add_turn(story.id, NewTurn(AuthorKind.USER, "c", author_name="Sam"))
    await store.add_turn(story.id, NewTurn(AuthorKind.SYSTEM, "note", persona_id=first))
    assert await store.last_persona_id(story.id) == second


async def test_concurrent_turns_in_one_channel_keep_order_and_lose_nothing(store: Store):
    story = await new_story(store)
    count = 40
    turns = await asyncio.gather(*(store.add_turn(story.id, NewTurn(AuthorKind.USER, f"m{i}"))
                                   for i in range(count)))
    assert sorted(t.position for t in turns) == list(range(1, count + 1))
    stored = await store.recent_turns(story.id)
    assert len(stored) == count
    assert [t.position for t in stored] == list(range(1, count + 1))
    assert {t.text for t in stored} == {f"m{i}" for i in range(count)}


async def test_concurrent_swipes_lose_nothing(store: Store):
    story = await new_story(store)
    turn = await store.add_turn(story.id, NewTurn(AuthorKind.PERSONA, "s0"))
    await asyncio.gather(*(store.add_swipe(turn.id, f"s{i}") for i in range(1, 11)))
    stored = await store.get_turn(turn.id)
    assert sorted(s.text for s in stored.swipes) == sorted(f"s{i}" for i in range(11))
    assert [s.index for s in stored.swipes] == list(range(11))


async def test_channels_settings_summaries_and_scene_art(store: Store):
    story = await new_story(store)
    mossback = await store.get_persona(GUILD, "Old Mossback")
    wren = await store.get_persona(GUILD, "Wren Halloway")
    await store.bind_personas(CHANNEL, GUILD, [wren.id, mossback.id])
    assert await store.channel_persona_ids(CHANNEL) == [wren.id, mossback.id]
    await store.bind_personas(CHANNEL, GUILD, [mossback.id])
    assert await store.channel_persona_ids(CHANNEL) == [mossback.id]
    assert await store.update_channel_settings(CHANNEL, GUILD, reply_mode="mentions") == {"reply_mode": "mentions"}
    assert await store.channel_settings(OTHER_CHANNEL) == {}
    await store.update_guild_settings(GUILD, scene_art=True)
    assert await store.update_guild_settings(GUILD, cooldown_s=3) == {"scene_art": True, "cooldown_s": 3}
    await store.add_summary(story.id, 10, "They met.")
    await store.add_summary(story.id, 20, "They met and talked.")
    assert (await store.latest_summary(story.id)).text == "They met and talked."
    art = await store.add_scene_art(SceneArt(story_id=story.id, prompt="a forest", embedding=[0.1, 0.2],
                                             image=b"\x89PNG", width=64, height=64, seed=1))
    bank = await store.scene_art(story.id)
    assert [a.id for a in bank] == [art.id] and bank[0].embedding == [0.1, 0.2]
    bare = await store.add_scene_art(SceneArt(story_id=story.id, prompt="a link", embedding=[0.3, 0.4],
                                              image_url="https://cdn.example/a.png"))
    assert await store.scene_keys(story.id) == [  # newest first, without the pixels
        SceneKey(bare.id, None, "a link", [0.3, 0.4], has_image=False),
        SceneKey(art.id, None, "a forest", [0.1, 0.2], has_image=True)]
    assert await store.scene_art_image(art.id) == b"\x89PNG" and await store.scene_art_image(bare.id) is None
    assert await store.count_scene_art(story.id) == 2 and await store.count_scene_art(story.id + 1) == 0


async def test_state_survives_a_restart(database_url: str):
    from bot.builtin import builtin_personas

    first = Store(database_url)
    await first.upgrade()
    await first.sync_builtin_personas(builtin_personas())
    story = await new_story(first)
    await first.add_turn(story.id, NewTurn(AuthorKind.USER, "remember me"))
    await first.close()

    second = Store(database_url)
    await second.upgrade()  # a no-op at head
    try:
        active = await second.active_story(CHANNEL)
        assert active.id == story.id
        assert [t.text for t in await second.recent_turns(active.id)] == ["remember me"]
    finally:
        await second.close()


async def test_reads_do_not_wait_for_a_writer(store: Store):
    story = await new_story(store)
    await store.add_turn(story.id, NewTurn(AuthorKind.USER, "before"))
    holding, release = asyncio.Event(), asyncio.Event()

    async def slow_writer() -> None:
        async with store.session() as session:  # holds the write lock (SQLite) / a row lock until released
            await session.execute(update(Story).where(Story.id == story.id).values(title="busy"))
            holding.set()
            await release.wait()

    writer = asyncio.create_task(slow_writer())
    await holding.wait()
    queued = asyncio.create_task(store.add_turn(story.id, NewTurn(AuthorKind.USER, "queued")))
    # Readers see the last committed state at once instead of queueing behind the writers.
    turns, summary = await asyncio.wait_for(store.prompt_history(story.id, 10), 5)
    assert [t.text for t in turns] == ["before"] and summary is None
    assert [t.text for t in await asyncio.wait_for(store.recent_turns(story.id), 5)] == ["before"]
    assert await asyncio.wait_for(store.list_personas(GUILD), 5)
    assert not queued.done()
    release.set()
    await writer
    await queued
    assert [t.text for t in await store.recent_turns(story.id)] == ["before", "queued"]


async def test_prompt_history_skips_what_the_summary_covers(store: Store):
    story = await new_story(store)
    for i in range(6):
        await store.add_turn(story.id, NewTurn(AuthorKind.USER, f"t{i}"))
    await store.add_summary(story.id, through_position=2, text="earlier")
    turns, summary = await store.prompt_history(story.id, 3)
    assert summary.text == "earlier" and [t.text for t in turns] == ["t3", "t4", "t5"]
    turns, _ = await store.prompt_history(story.id, 10, before=5)
    assert [t.position for t in turns] == [3, 4]


async def test_cached_rows_follow_every_change(store: Store):
    ada = await store.create_persona(GUILD, parse_card(card_bytes("Ada"), "ada.json"))
    assert (await store.get_persona_by_id(ada.id)).name == "Ada"
    await store.update_persona(ada.id, card=parse_card(card_bytes("Ada Two"), "ada.json").card)
    assert (await store.get_persona_by_id(ada.id)).name == "Ada Two"

    assert await store.active_story(CHANNEL) is None
    story = await store.start_story(CHANNEL, GUILD, ada.id)
    assert (await store.active_story(CHANNEL)).persona_id == ada.id
    assert await store.delete_persona(GUILD, "Ada Two")
    assert await store.get_persona_by_id(ada.id) is None
    assert (await store.active_story(CHANNEL)).persona_id is None  # SET NULL in the database
    await store.end_story(CHANNEL)
    assert await store.active_story(CHANNEL) is None
    again = await new_story(store)
    assert (await store.active_story(CHANNEL)).id == again.id != story.id

    assert await store.guild_settings(GUILD) == {}
    await store.update_guild_settings(GUILD, cooldown_s=3)
    assert await store.guild_settings(GUILD) == {"cooldown_s": 3}
    (await store.guild_settings(GUILD))["cooldown_s"] = 99  # callers get a copy
    assert await store.guild_settings(GUILD) == {"cooldown_s": 3}
    await store.forget_guild(GUILD)
    assert await store.guild_settings(GUILD) == {}


async def test_a_prompt_s_facts_and_lorebooks_follow_every_change(store: Store):
    story = await new_story(store)

    async def extras() -> tuple[list[str], list[str]]:
        reads = await store.prompt_reads(story.id, 10)
        return [f.text for f in reads.facts], [b.name for b in reads.books]

    assert await extras() == ([], [])
    fact = await store.add_fact(story.id, "The key is under the mat.", author_id=7)
    assert await extras() == (["The key is under the mat."], [])
    await store.save_lorebook(GUILD, None, "Harbour", {"entries": {}})  # the guild's: every story reads it
    await store.save_lorebook(GUILD, story.id, "Ship", {"entries": {}})
    assert await extras() == (["The key is under the mat."], ["Ship", "Harbour"])
    assert await store.remove_lorebook(GUILD, None, "Harbour")
    assert (await extras())[1] == ["Ship"]
    await store.remove_fact(story.id, fact.id)
    assert (await extras())[0] == []
    await store.add_fact(story.id, "Sam hates boats.", author_id=7)
    assert (await extras())[0] == ["Sam hates boats."]
    await store.erase_user(7)  # forget-me takes the facts they pinned
    assert (await extras())[0] == []
