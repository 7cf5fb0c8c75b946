"""Group scenes through SimCord with the real bot: a cast of personas and several people in one story."""

from __future__ import annotations

import json
import re

from bot.story.cast import JOIN_TEXT
from tests.bot.simcord_kit import World, make_bot, start_story, world
from tests.bot.test_cogs_personas import CARD

NUDGE = re.compile(r"\[Write the next reply only as ([^.]+)\.")
ISOLDE, MOSS = "Captain Isolde Varga", "Old Mossback"


def speaker_of(body: dict) -> str:
    """Who the bot asked to speak: the group nudge names them (a story of one has none)."""
    found = NUDGE.search(str(body["messages"][-1]["content"]))
    return found.group(1) if found else "Wren"


def scripted(lines: dict[str, str] | None = None):
    """A fake engine reply: each speaker says its name (and a scripted line addressing someone, if any)."""
    lines = lines or {}

    def reply(body: dict) -> str:
        name = speaker_of(body)
        return lines.get(name, f"{name} speaks.")
    return reply


async def cast_of(w: World, *names: str) -> None:
    for name in names:
        result = await w.admin.slash(w.channel, "story add", persona=name)
        assert "is in the scene" in said(result)


def said(result) -> str:
    """What a command answered (a deferred command's follow-up shows as its response)."""
    return (result.response or result.followups[-1]).content


def speakers(w: World) -> list[str]:
    return [m.author.name for m in w.persona_messages()]


async def test_two_personas_each_answer_when_addressed_and_replies_go_to_their_author(bot_settings, store,
                                                                                      fake_engine):
    fake_engine.reply = scripted()
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await cast_of(w, ISOLDE)
        assert w.channel.history()[-1].content == "-# Captain Isolde Varga joins the scene."
        await w.player.send(w.channel, "Isolde, what do you see out there?")
        assert speakers(w)[-1] == "Captain Varga"  # her display name (the card's nickname), her webhook identity
        assert w.persona_messages()[-1].content == "Captain Varga speaks."
        await w.player.send(w.channel, "And you, Wren?")
        assert speakers(w)[-1] == "Wren"
        wren_message = w.persona_messages()[-1]
        await w.player.send(w.channel, "Go on.", reply_to=next(m for m in w.persona_messages()
                                                               if m.author.name == "Captain Varga"))
        assert speakers(w)[-1] == "Captain Varga"
        await w.player.send(w.channel, "Really?", reply_to=wren_message)
        assert speakers(w)[-1] == "Wren"

        # the prompt is built for the speaker: the rest of the cast as scene members, every name in the history
        body = fake_engine.requests_to("/v1/chat/completions")[-1].json
        system = body["messages"][0]["content"]
        assert "Also in this scene" in system and "- Captain Varga" in system and "- Wren" not in system
        history = json.dumps(body["messages"][1:])
        assert "Captain Varga: Captain Varga speaks." in history  # another persona speaks on the user side
        assert {"role": "assistant", "content": "Wren speaks."} in body["messages"]  # her own turns are hers
        assert "\nCaptain Varga:" in body["stop"]

        status = await w.player.slash(w.channel, "story status")
        assert "Cast: **Wren Halloway**, **Captain Isolde Varga**" in status.response.content


async def test_four_personas_the_addressed_one_answers_and_a_removed_one_speaks_no_more(bot_settings, store,
                                                                                        fake_engine):
    fake_engine.reply = scripted()
    async with world(make_bot(bot_settings, store)) as w:
        imported = await w.admin.slash(w.channel, "persona import", card=("marrow.json", json.dumps(CARD).encode()))
        assert "Imported" in imported.response.content
        await start_story(w)
        await cast_of(w, ISOLDE, MOSS, "Marrow")
        for line, who in [("Marrow, dig here.", "Marrow"), ("Mossback, is the forest awake?", "Old Mossback"),
                          ("Varga, status report.", "Captain Varga"), ("Wren, who did it?", "Wren")]:
            await w.player.send(w.channel, line)
            assert speakers(w)[-1] == who, line
        removed = await w.admin.slash(w.channel, "story remove", persona="Marrow")
        assert removed.response.content == "-# Marrow leaves the scene."
        await w.player.send(w.channel, "Marrow? Are you still here?")
        assert speakers(w)[-1] != "Marrow"
        assert "Marrow" not in (await w.player.slash(w.channel, "story status")).response.content.split("Cast:")[1]

        exported = await w.player.slash(w.channel, "story export", format="text")
        text = (await exported.response.attachments[0].read()).decode()
        for name in ("Pip", "Wren", "Captain Varga", "Old Mossback", "Marrow"):
            assert f"{name}:" in text or f"[{name}]" in text or name in text
        assert "Marrow joins the scene." in text and "Marrow leaves the scene." in text


async def test_personas_answering_each_other_stop_at_the_limit(bot_settings, store, fake_engine):
    # Each persona's reply hands over to the other: without a limit they would talk forever.
    fake_engine.reply = scripted({"Wren": "Captain Varga, your move.", "Captain Varga": "Your move, Wren."})
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await cast_of(w, ISOLDE)
        before = len(w.persona_messages())
        await w.player.send(w.channel, "Wren, start us off.")
        assert speakers(w)[before:] == ["Wren", "Captain Varga"]  # the default limit: 2 in a row
        saved = await w.admin.slash(w.channel, "story settings", persona_replies=4)
        assert "persona replies in a row: **4**" in saved.response.content
        before = len(w.persona_messages())
        await w.env.advance_time(5)  # past the player's cooldown
        await w.player.send(w.channel, "Wren, again.")
        assert speakers(w)[before:] == ["Wren", "Captain Varga", "Wren", "Captain Varga"]
        # the scene waits for a person now: no persona message came after the last one above
        await w.env.advance_time(30)
        assert len(w.persona_messages()) == before + 4


async def test_a_persona_added_mid_story_knows_only_what_happened_since(bot_settings, store, fake_engine):
    fake_engine.reply = scripted()
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "The key is under the blue mat.")
        await cast_of(w, ISOLDE)
        await w.env.advance_time(5)
        await w.player.send(w.channel, "Isolde, where were you?")
        body = fake_engine.requests_to("/v1/chat/completions")[-1].json
        prompt = json.dumps(body["messages"])
        assert speaker_of(body) == "Captain Varga"
        assert "blue mat" not in prompt  # said before she came
        assert JOIN_TEXT.format(name="Captain Varga") in prompt and "where were you" in prompt


async def test_a_message_inside_the_cooldown_is_kept_and_answered_after_it(bot_settings, store, fake_engine):
    fake_engine.reply = lambda body: "Noted: " + body["messages"][-1]["content"].replace("\n\n", " | ")
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        # longer than SimCord's settle timeout, so the wait is virtual (advance_time ends it)
        await store.update_guild_settings(w.guild.id, cooldown_s=60)
        await w.player.send(w.channel, "one")
        fast = await w.player.send(w.channel, "two")
        assert any(str(r.emoji) == "⏳" for r in next(m for m in w.channel.history() if m.id == fast.id).reactions)
        story = await store.active_story(w.channel.id)
        assert [t.text for t in await store.recent_turns(story.id)][-2:] == ["Noted: Pip: one", "two"]  # kept
        await w.player.send(w.channel, "three")  # also inside the cooldown: merged into the same answer
        await w.env.advance_time(61)
        turns = [(t.author_kind.value, t.text) for t in await store.recent_turns(story.id)]
        assert turns[-3:] == [("user", "two"), ("user", "three"), ("persona", "Noted: Pip: two | Pip: three")]


async def test_mentions_mode_keeps_the_chatter_it_does_not_answer(bot_settings, store, fake_engine):
    fake_engine.reply = scripted()
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await cast_of(w, ISOLDE)
        await store.update_guild_settings(w.guild.id, reply_mode="mentions")
        calls = len(fake_engine.requests_to("/v1/chat/completions"))
        await w.player.send(w.channel, "(whispering to Ada) the captain looks nervous")
        assert len(fake_engine.requests_to("/v1/chat/completions")) == calls  # not answered...
        await w.env.advance_time(5)
        await w.player.send(w.channel, "Isolde, are you nervous?")
        assert speakers(w)[-1] == "Captain Varga"
        prompt = json.dumps(fake_engine.requests_to("/v1/chat/completions")[-1].json["messages"])
        assert "the captain looks nervous" in prompt  # ...but part of the story


async def test_regenerate_and_swipes_stay_with_the_persona_who_spoke(bot_settings, store, fake_engine):
    fake_engine.reply = scripted()
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await cast_of(w, ISOLDE)
        await w.player.send(w.channel, "Isolde, report.")
        await w.env.advance_time(5)
        await w.player.send(w.channel, "Wren, your view?")
        isolde_message = next(m for m in w.persona_messages() if m.author.name == "Captain Varga")
        fake_engine.reply = scripted({"Captain Varga": "Captain Varga, take two."})
        history = w.channel.history()
        at = next(i for i, m in enumerate(history) if m.id == isolde_message.id)
        controls = next(m for m in history[at:] if m.components)  # the buttons under her reply
        await w.player.click(controls, label="Regenerate")
        edited = next(m for m in w.channel.history() if m.id == isolde_message.id)
        assert edited.content == "Captain Varga, take two." and edited.author.name == "Captain Varga"
        assert speaker_of(fake_engine.requests_to("/v1/chat/completions")[-1].json) == "Captain Varga"

        rewound = await w.admin.slash(w.channel, "story rewind", turns=2)  # Wren's reply and the question
        assert "Took back 2 turns" in said(rewound)
        story = await store.active_story(w.channel.id)
        assert [t.author_name for t in await store.recent_turns(story.id)][-1] == "Captain Varga"
