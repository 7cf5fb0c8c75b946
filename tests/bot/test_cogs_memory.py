"""/memory, /lore, /story note|summary|export|import through SimCord: what a player sees, and what the
persona is then told (the prompt the fake engine receives)."""

from __future__ import annotations

import json

import pytest
import simcord

from bot.story.chatfile import from_sillytavern_jsonl
from tests.bot.simcord_kit import make_bot, start_story, world
from tests.conftest import CARDS

EMBERFALL = CARDS / "Emberfall.lorebook.json"
GLASSMOTH_LORE = "The Glassmoths are moths of living crystal"  # in Emberfall's "glassmoth" entry


@pytest.fixture
def emberfall() -> tuple[str, bytes]:
    """A SillyTavern World Info file (the project's own) as a Discord attachment."""
    return EMBERFALL.name, EMBERFALL.read_bytes()


def said(result: simcord.InteractionResult) -> str:
    """What the bot answered: the last followup of a deferred command, else the response."""
    return (result.followups[-1] if result.followups else result.response).content


def _content(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))


def prompt_for(fake_engine, line: str) -> str:
    """The text of the newest story prompt that carries the player's `line`."""
    for request in reversed(fake_engine.requests_to("/v1/chat/completions")):
        text = "\n".join(_content(m) for m in request.json["messages"])
        if line in text:
            return text
    raise AssertionError(f"no prompt carried {line!r}")


def world_info(**entries: dict) -> bytes:
    """A SillyTavern World Info file (entries keyed by uid, as ST saves them)."""
    return json.dumps({"entries": {uid: {"uid": int(uid.strip("e")), "key": [], "keysecondary": [],
                                         "comment": "", "content": "", "constant": False, "selective": False,
                                         "order": 100, "position": 0, "disable": False, **entry}
                                   for uid, entry in entries.items()}}).encode()


# ---------------------------------------------------------------- /memory


async def test_a_pinned_fact_is_listed_and_reaches_the_next_prompt(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        added = await w.player.slash(w.channel, "memory add", text="Pip's sister is called Mira.")
        assert added.ephemeral and "Pinned fact" in added.response.content
        story = await store.active_story(w.channel.id)
        [fact] = await store.facts(story.id)
        assert fact.author_id == w.player.id and f"#{fact.id}" in added.response.content

        listing = await w.player.slash(w.channel, "memory list")
        assert listing.ephemeral and f"**#{fact.id}**" in listing.response.content
        assert "sister is called Mira" in listing.response.content

        await w.player.send(w.channel, "Have you met my family?")
        assert "Pip's sister is called Mira." in prompt_for(fake_engine, "Have you met my family?")


async def test_only_the_author_or_an_admin_may_unpin_a_fact(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.slash(w.channel, "memory add", text="The lighthouse key is under the mat.")
        story = await store.active_story(w.channel.id)
        [fact] = await store.facts(story.id)

        other = w.guild.add_member(w.env.create_user("quinn"))
        refused = await other.slash(w.channel, "memory remove", id=fact.id)
        assert refused.response.ephemeral and "Only whoever pinned a fact" in refused.response.content
        assert [f.id for f in await store.facts(story.id)] == [fact.id]
        assert w.error_types() == ["CheckFailure"]  # answered by tree.on_error

        missing = await w.admin.slash(w.channel, "memory remove", id=fact.id + 99)
        assert missing.response.ephemeral and f"no pinned fact #{fact.id + 99}" in missing.response.content

        removed = await w.admin.slash(w.channel, "memory remove", id=fact.id)
        assert removed.response.content == f"Unpinned fact #{fact.id}."
        assert await store.facts(story.id) == []
        listing = await w.player.slash(w.channel, "memory list")
        assert "No pinned facts yet" in listing.response.content

        fake_engine.reply = "Wren shrugs."  # not the default echo of the prompt
        await w.player.send(w.channel, "Where is the key?")
        assert "under the mat" not in prompt_for(fake_engine, "Where is the key?")
        assert w.error_types() == ["CheckFailure", "StoryError"]  # and the unknown fact


async def test_the_author_of_a_fact_may_unpin_it(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.slash(w.channel, "memory add", text="It always rains on Tuesdays.")
        story = await store.active_story(w.channel.id)
        [fact] = await store.facts(story.id)
        removed = await w.player.slash(w.channel, "memory remove", id=fact.id)
        assert removed.response.content == f"Unpinned fact #{fact.id}."
        assert await store.facts(story.id) == []


async def test_memory_without_a_story_says_how_to_start_one(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        result = await w.player.slash(w.channel, "memory add", text="Anything.")
        assert result.response.ephemeral and "/story start" in result.response.content
        assert w.error_types() == ["NoStory"]


# ---------------------------------------------------------------- /story note and /story summary


async def test_an_authors_note_reaches_the_next_prompt_and_can_be_cleared(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        fake_engine.reply = "Wren listens."  # not the default echo of the prompt
        noted = await w.player.slash(w.channel, "story note", text="Keep the mood eerie and quiet.", depth=1)
        assert noted.ephemeral and noted.response.content == "Author's note set, 1 messages from the end."
        story = await store.active_story(w.channel.id)
        assert story.author_note == "Keep the mood eerie and quiet." and story.author_note_depth == 1

        await w.player.send(w.channel, "I open the cellar door.")
        assert "Keep the mood eerie and quiet." in prompt_for(fake_engine, "I open the cellar door.")

        cleared = await w.player.slash(w.channel, "story note")
        assert cleared.response.content == "Author's note cleared."
        await w.player.send(w.channel, "I close it again.")
        assert "eerie" not in prompt_for(fake_engine, "I close it again.")


async def test_summary_is_shown_and_only_an_admin_may_edit_it(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        empty = await w.player.slash(w.channel, "story summary")
        assert empty.ephemeral and empty.response.content.startswith("No summary yet.")

        await w.player.send(w.channel, "I ask about the wreck.")
        story = await store.active_story(w.channel.id)
        through = (await store.recent_turns(story.id))[-1].position
        await store.add_summary(story.id, through, "Pip asked Wren about the wreck of the *Gull*.")

        shown = await w.admin.slash(w.channel, "story summary")
        assert f"(through turn {through})" in shown.response.content
        assert r"wreck of the \*Gull\*." in shown.response.content  # markdown escaped

        # A player sees the summary and the buttons, but pressing Edit is refused.
        theirs = await w.player.slash(w.channel, "story summary")
        refused = await w.player.click(theirs.response, label="Edit")
        assert refused.modal is None
        assert refused.response.ephemeral and "Manage Server" in refused.response.content
        redo = await w.player.click(theirs.response, label="Redo")
        assert redo.response.ephemeral and "Manage Server" in redo.response.content
        assert (await store.latest_summary(story.id)).text == "Pip asked Wren about the wreck of the *Gull*."

        editing = await w.admin.click(shown.response, label="Edit")
        assert editing.modal is not None
        [field] = [c for row in editing.modal["components"] for c in row["components"]]
        assert field["value"] == "Pip asked Wren about the wreck of the *Gull*."
        saved = await w.admin.submit_modal(editing, {field["custom_id"]: "Pip learned the Gull sank in 1892."})
        assert saved.response.ephemeral and saved.response.content.startswith("Saved")

        latest = await store.latest_summary(story.id)
        assert latest.text == "Pip learned the Gull sank in 1892." and latest.through_position == through
        again = await w.player.slash(w.channel, "story summary")
        assert "Pip learned the Gull sank in 1892." in again.response.content


# ---------------------------------------------------------------- /lore


async def test_import_a_sillytavern_world_info_then_list_and_show_it(bot_settings, store, fake_engine, emberfall):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        imported = await w.admin.slash(w.channel, "lore import", file=emberfall)
        assert imported.ephemeral
        assert "4 entries, for this story" in said(imported) and "problem" not in said(imported)
        story = await store.active_story(w.channel.id)
        [record] = await store.lorebooks(w.guild.id, story.id)
        assert record.story_id == story.id

        listing = await w.player.slash(w.channel, "lore list")
        assert listing.response.content == f"**{record.name}** · 4 entries · this story"

        shown = await w.player.slash(w.channel, "lore show", name=record.name)
        embed = shown.response.embeds[0]
        assert shown.ephemeral and embed.title == record.name
        assert len(embed.fields) == 4 and not any(f.name.startswith("⚠️") for f in embed.fields)
        assert "keys: emberfall, monastery, cloister, mountain monastery" in embed.fields[0].value
        assert any("keys: glassmoth" in f.value for f in embed.fields)

        choices = await w.player.autocomplete(w.channel, "lore show", "name", record.name[:3].lower())
        assert [c["value"] for c in choices] == [record.name]


async def test_a_lore_key_in_a_message_puts_its_entry_in_the_next_prompt(bot_settings, store, fake_engine, emberfall):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.admin.slash(w.channel, "lore import", file=emberfall)
        fake_engine.reply = "Wren pours."  # not the default echo of the prompt
        await w.player.send(w.channel, "I order a pint and sit down.")
        assert GLASSMOTH_LORE not in prompt_for(fake_engine, "I order a pint")
        await w.player.send(w.channel, "Have you ever seen a glassmoth?")
        assert GLASSMOTH_LORE in prompt_for(fake_engine, "Have you ever seen a glassmoth?")


async def test_a_server_wide_book_reaches_every_story_and_can_be_removed(bot_settings, store, fake_engine, emberfall):
    async with world(make_bot(bot_settings, store)) as w:
        no_story = await w.admin.slash(w.channel, "lore import", file=emberfall)
        assert "no story in this channel" in no_story.response.content
        assert await store.lorebooks(w.guild.id, None) == []

        book = world_info(e0={"key": ["kraken"], "content": "A kraken sleeps beneath Port Vesper."})
        imported = await w.admin.slash(w.channel, "lore import", file=("Sea Lore.json", book), scope="guild")
        assert "**Sea Lore**: 1 entries, for every story in this server." in said(imported)
        await start_story(w)
        listing = await w.player.slash(w.channel, "lore list")
        assert listing.response.content == "**Sea Lore** · 1 entries · server-wide"
        await w.player.send(w.channel, "Tell me about the kraken.")
        assert "A kraken sleeps beneath Port Vesper." in prompt_for(fake_engine, "Tell me about the kraken.")

        removed = await w.admin.slash(w.channel, "lore remove", name="sea lore")
        assert removed.response.content == "Removed lorebook **Sea Lore**."
        assert await store.lorebooks(w.guild.id, None) == []
        gone = await w.player.slash(w.channel, "lore list")
        assert gone.response.content.startswith("No lorebooks here.")
        assert w.error_types() == ["CheckFailure"]  # the import without a story, answered above


async def test_importing_a_book_again_replaces_it(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        fake_engine.reply = "Wren nods."  # not the default echo of the prompt
        old = world_info(e0={"key": ["kraken"], "content": "The kraken is a myth."})
        await w.admin.slash(w.channel, "lore import", file=("Sea Lore.json", old))
        await w.player.send(w.channel, "Is the kraken real?")
        assert "The kraken is a myth." in prompt_for(fake_engine, "Is the kraken real?")

        new = world_info(e0={"key": ["kraken"], "content": "The kraken woke last winter."},
                         e1={"key": ["gull"], "content": "Gulls follow the fishing boats."})
        replaced = await w.admin.slash(w.channel, "lore import", file=("Sea Lore.json", new))
        assert "**Sea Lore**: 2 entries" in said(replaced)
        story = await store.active_story(w.channel.id)
        assert [len(r.book["entries"]) for r in await store.lorebooks(w.guild.id, story.id)] == [2]
        await w.player.send(w.channel, "And the kraken now?")
        prompt = prompt_for(fake_engine, "And the kraken now?")
        assert "The kraken woke last winter." in prompt and "The kraken is a myth." not in prompt


async def test_a_malformed_world_info_is_refused_or_its_bad_entries_shown(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        story = await store.active_story(w.channel.id)
        broken = await w.admin.slash(w.channel, "lore import", file=("broken.json", b'{"entries": {'))
        assert broken.ephemeral and "broken.json" in said(broken) and "Nothing was stored." in said(broken)
        assert await store.lorebooks(w.guild.id, story.id) == []

        book = world_info(e0={"key": ["/[a-/i"], "comment": "Bad pattern", "content": "Never shown."},
                          e1={"key": ["harbour"], "comment": "Harbour", "content": "Gulls circle the harbour."})
        imported = await w.admin.slash(w.channel, "lore import", file=("Odd.json", book))
        assert "**Odd**: 2 entries" in said(imported) and "1 problem(s)" in said(imported)
        assert [r.name for r in await store.lorebooks(w.guild.id, story.id)] == ["Odd"]

        shown = await w.player.slash(w.channel, "lore show", name="Odd")
        fields = {f.name: f.value for f in shown.response.embeds[0].fields}
        assert "keys: /[a-/i" in fields["Bad pattern"] and "keys: harbour" in fields["Harbour"]
        assert "Bad pattern" in fields["⚠️ Skipped"] and "/[a-/i" in fields["⚠️ Skipped"]

        fake_engine.reply = "Wren walks with you."  # not the default echo of the prompt
        await w.player.send(w.channel, "I walk down to the harbour.")
        prompt = prompt_for(fake_engine, "I walk down to the harbour.")
        assert "Gulls circle the harbour." in prompt and "Never shown." not in prompt


async def test_a_player_may_not_import_or_remove_lore(bot_settings, store, fake_engine, emberfall):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        story = await store.active_story(w.channel.id)
        denied = await w.player.slash(w.channel, "lore import", file=emberfall)
        assert denied.response.ephemeral and "Manage Server" in denied.response.content
        assert await store.lorebooks(w.guild.id, story.id) == []

        await w.admin.slash(w.channel, "lore import", file=emberfall)
        [record] = await store.lorebooks(w.guild.id, story.id)
        denied = await w.player.slash(w.channel, "lore remove", name=record.name)
        assert denied.response.ephemeral and "Manage Server" in denied.response.content
        assert len(await store.lorebooks(w.guild.id, story.id)) == 1
        assert w.error_types() == ["MissingPermissions", "MissingPermissions"]


# ---------------------------------------------------------------- /story export and /story import


async def _played(w, fake_engine) -> None:
    """A short story: the greeting, a player's line and a reply with two swipes."""
    await start_story(w)
    fake_engine.reply = "The innkeeper shrugs."
    await w.player.send(w.channel, "Is the kitchen open?")
    fake_engine.reply = "The innkeeper laughs."
    reply = w.persona_messages()[-1]
    await w.player.click(next(m for m in reversed(w.channel.history()) if m.components), label="Regenerate")
    assert (await w.bot.store.turn_by_message(reply.id)).text == "The innkeeper laughs."


async def _export(w, fmt: str) -> tuple[str, bytes]:
    result = await w.player.slash(w.channel, "story export", format=fmt)
    assert result.ephemeral
    [attachment] = result.response.attachments
    return attachment.filename, await attachment.read()


async def test_export_in_three_formats(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await _played(w, fake_engine)
        story = await store.active_story(w.channel.id)
        turns = await store.recent_turns(story.id)
        await w.player.slash(w.channel, "memory add", text="The kitchen closes at nine.")
        await w.player.slash(w.channel, "story note", text="Be brief.")

        name, text = await _export(w, "text")
        assert name == f"story-{w.channel.id}.txt"
        assert "Pip: Is the kitchen open?" in text.decode() and "The innkeeper laughs." in text.decode()

        name, jsonl = await _export(w, "sillytavern")
        assert name == f"story-{w.channel.id}.jsonl"
        chat = from_sillytavern_jsonl(jsonl, name)
        assert (chat.user_name, chat.character_name) == ("Pip", "Wren Halloway")  # the persona /story import finds
        assert [(t.author_kind, t.text) for t in chat.turns] == [(str(t.author_kind), t.text) for t in turns]
        reply = chat.turns[-1]
        assert reply.swipes == ["The innkeeper shrugs.", "The innkeeper laughs."] and reply.selected_swipe == 1

        name, raw = await _export(w, "masque")
        assert name == f"story-{w.channel.id}.json"
        document = json.loads(raw)
        assert document["format"] == "masque.story" and document["version"] == 1
        assert [t["text"] for t in document["turns"]] == [t.text for t in turns]
        assert [s["text"] for s in document["turns"][-1]["swipes"]] == ["The innkeeper shrugs.",
                                                                        "The innkeeper laughs."]
        assert document["extra"]["pinned_facts"] == ["The kitchen closes at nine."]
        assert document["extra"]["author_note"] == "Be brief."


async def test_an_exported_chat_imports_into_another_channel(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await _played(w, fake_engine)
        original = await store.recent_turns((await store.active_story(w.channel.id)).id)
        _, jsonl = await _export(w, "sillytavern")

        cellar = w.guild.create_text_channel("cellar")
        imported = await w.admin.slash(cellar, "story import", file=("tavern.jsonl", jsonl))
        assert imported.ephemeral
        assert f"Imported {len(original)} messages" in said(imported) and "**Wren Halloway**" in said(imported)
        story = await store.active_story(cellar.id)
        turns = await store.recent_turns(story.id)
        assert [(t.author_kind, t.author_name, t.text) for t in turns] == \
            [(t.author_kind, t.author_name, t.text) for t in original]
        assert [s.text for s in turns[-1].swipes] == ["The innkeeper shrugs.", "The innkeeper laughs."]
        assert turns[-1].selected_swipe == 1

        # The story goes on from there: the next prompt holds the imported turns.
        await w.player.send(cellar, "Then I'll have the soup.")
        prompt = prompt_for(fake_engine, "Then I'll have the soup.")
        assert "Is the kitchen open?" in prompt and "The innkeeper laughs." in prompt


async def test_story_import_is_admin_only_and_names_a_bad_file(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await _played(w, fake_engine)
        _, jsonl = await _export(w, "sillytavern")
        before = (await store.active_story(w.channel.id)).id

        denied = await w.player.slash(w.channel, "story import", file=("tavern.jsonl", jsonl))
        assert denied.response.ephemeral and "Manage Server" in denied.response.content
        bad = await w.admin.slash(w.channel, "story import", file=("notes.jsonl", b"not json\n"))
        assert "notes.jsonl" in said(bad) and "Nothing was imported." in said(bad)
        unknown = await w.admin.slash(w.channel, "story import", file=("tavern.jsonl", jsonl), persona="Nobody")
        assert "Nobody" in said(unknown)
        assert (await store.active_story(w.channel.id)).id == before
        assert w.error_types() == ["MissingPermissions", "UnknownPersona"]


@pytest.mark.parametrize("fmt", ["text", "sillytavern", "masque"])
async def test_export_without_a_story_says_how_to_start_one(bot_settings, store, fake_engine, fmt):
    async with world(make_bot(bot_settings, store)) as w:
        result = await w.player.slash(w.channel, "story export", format=fmt)
        assert result.response.ephemeral and "/story start" in result.response.content
        assert w.error_types() == ["NoStory"]
