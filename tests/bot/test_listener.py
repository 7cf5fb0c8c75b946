"""The story listener end to end through SimCord: messages in, persona replies out through a webhook."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.bot.simcord_kit import make_bot, start_story, world


async def test_story_start_posts_greeting_as_persona_and_a_message_gets_a_reply(bot_settings, store, fake_engine):
    fake_engine.reply = "The lantern flickers. *Wren looks up.* Welcome, traveller."
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        greeting = w.persona_messages()
        assert len(greeting) == 1 and greeting[0].author.name == "Wren"  # the card's nickname
        await w.player.send(w.channel, "Hello! Any rooms free tonight?")
        replies = w.persona_messages()
        assert len(replies) == 2, w.env.transcript()[-2500:]
        assert replies[-1].content == "The lantern flickers. *Wren looks up.* Welcome, traveller."
        story = await store.active_story(w.channel.id)
        turns = await store.recent_turns(story.id)
        assert [t.author_kind.value for t in turns] == ["persona", "user", "persona"]
        assert turns[1].author_name == "Pip" and turns[1].text == "Hello! Any rooms free tonight?"
        assert [m.message_id for m in turns[2].messages] == [replies[-1].id]


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 80, 40)).save(out, "PNG")
    return out.getvalue()


async def _chat_calls(fake_engine) -> int:
    return len(fake_engine.requests_to("/v1/chat/completions"))


async def test_model_output_with_mentions_pings_nobody(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        role = w.guild.create_role("Everyone-ish", mentionable=True)
        fake_engine.reply = f"@everyone @here look! <@&{role.id}> and <@{w.admin.id}>, come quick."
        await start_story(w)
        await w.player.send(w.channel, "What is happening?")
        reply = w.persona_messages()[-1]
        assert reply.content.startswith("@everyone @here look!")
        record = w.stored(reply)
        assert record.ping_user_ids == [] and record.ping_role_ids == [] and not record.mention_everyone
        # Every send and edit the bot made said so explicitly, webhook executions included.
        sends = [r for r in w.env.http_requests if r.method in ("POST", "PATCH") and "content" in (r.json or {})]
        assert sends and all(r.json.get("allowed_mentions") == {"parse": []} for r in sends), sends


async def test_ignores_itself_other_bots_and_webhook_echoes(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        other_bot = w.guild.add_member(w.env.create_user("helperbot", bot=True))
        hook = w.guild.create_webhook(w.channel, "Announcer")
        before = await _chat_calls(fake_engine)
        await other_bot.send(w.channel, "I am a bot, answer me!")
        await hook.send("A webhook post (Discord echoes the persona's posts like this too)")
        await w.player.send(w.channel, "// out of character: brb")
        assert await _chat_calls(fake_engine) == before
        story = await store.active_story(w.channel.id)
        assert await store.count_turns(story.id) == 1  # the greeting only


# A slow engine is covered by the engine client's own tests: under SimCord's virtual clock the
# HTTP client's timeout timer never fires, so it cannot be driven from here.
@pytest.mark.parametrize("mode, words", [("down", "not reachable"), ("garbage", "unusable"),
                                         ("error", "not reachable")])
async def test_engine_failure_says_so_keeps_the_turn_and_retry_answers_it(bot_settings, store, fake_engine,
                                                                        mode, words):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await fake_engine.set_mode(mode)
        await w.player.send(w.channel, "Tell me about the harbour.")
        note = w.channel.last_message
        assert note.author.id == w.bot.user.id and words in note.content
        assert len(w.persona_messages()) == 1  # nothing half-written is left behind
        story = await store.active_story(w.channel.id)
        turns = await store.recent_turns(story.id)
        assert turns[-1].author_kind.value == "user" and turns[-1].text == "Tell me about the harbour."

        await fake_engine.set_mode("ok")
        fake_engine.reply = "The harbour never sleeps."
        await w.player.click(note, label="Retry")
        assert w.persona_messages()[-1].content == "The harbour never sleeps."
        turns = await store.recent_turns(story.id)
        assert [t.author_kind.value for t in turns] == ["persona", "user", "persona"]
        assert all(m.id != note.id for m in w.channel.history())  # the error note is gone


async def test_messages_are_kept_and_answered_in_order(bot_settings, store, fake_engine):
    fake_engine.token_delay = 0.01
    fake_engine.reply = lambda request: "Answer to: " + request["messages"][-1]["content"].replace("\n\n", " | ")
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        # Both messages reach the gateway before the bot gets to run; the second is inside Pip's cooldown
        # (3 s): kept at once, answered when the cooldown ends, after the first answer.
        w.env.backend.create_message(w.channel.id, w.player.id, "first question")
        w.env.backend.create_message(w.channel.id, w.player.id, "second question")
        await w.env.settle(timeout=10)
        await w.env.advance_time(3.5)
        await w.player.send(w.channel, "third question")
        await w.env.advance_time(3.5)
        story = await store.active_story(w.channel.id)
        turns = await store.recent_turns(story.id)
        assert [(t.author_kind.value, t.text) for t in turns[1:]] == [
            ("user", "first question"), ("persona", "Answer to: Pip: first question"),
            ("user", "second question"), ("persona", "Answer to: Pip: second question"),
            ("user", "third question"), ("persona", "Answer to: Pip: third question")]
        shown = [m.content for m in w.persona_messages()[1:]]
        assert shown == [t.text for t in turns if t.author_kind.value == "persona"][1:]


async def test_several_people_at_once_get_one_answer(bot_settings, store, fake_engine):
    fake_engine.reply = lambda request: "Answer to: " + request["messages"][-1]["content"].replace("\n\n", " | ")
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "hello")  # one person in the channel: answered at once
        assert w.persona_messages()[-1].content == "Answer to: Pip: hello"
        await w.admin.send(w.channel, "evening")  # a second person: a group now, answers wait 2 s for more
        assert w.persona_messages()[-1].content == "Answer to: ada: evening"
        await w.env.advance_time(5)  # past both cooldowns
        w.env.backend.create_message(w.channel.id, w.player.id, "I draw my sword.")
        w.env.backend.create_message(w.channel.id, w.admin.id, "I hide behind the barrel.")
        await w.env.settle()
        story = await store.active_story(w.channel.id)
        turns = await store.recent_turns(story.id)
        kinds = [(t.author_kind.value, t.author_name) for t in turns[-3:]]
        assert kinds == [("user", "Pip"), ("user", "ada"), ("persona", "Wren")]
        # one answer, to both people: both names and both messages are in the last prompt
        assert turns[-1].text == "Answer to: Pip: I draw my sword. | ada: I hide behind the barrel."
        assert len(w.persona_messages()) == 4


async def test_restart_resumes_the_story_from_sql(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        fake_engine.reply = "The blue door, remember."
        await w.player.send(w.channel, "Which door was mine?")
        await w.env.restart_bot(make_bot(bot_settings, store))
        fake_engine.reply = "Still the blue door."
        await w.player.send(w.channel, "Sorry, which one again?")
        assert w.persona_messages()[-1].content == "Still the blue door."
        prompt = str(fake_engine.requests_to("/v1/chat/completions")[-1].json["messages"])
        assert "Which door was mine?" in prompt and "The blue door, remember." in prompt
        # Buttons posted before the restart still work (their state is in the custom_id).
        fake_engine.reply = "The red door, actually."
        await w.player.click(w.channel.history()[-1], label="Regenerate")
        assert w.persona_messages()[-1].content == "The red door, actually."


async def test_editing_or_deleting_a_message_updates_or_removes_the_turn(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        sent = await w.player.send(w.channel, "I draw my sword.")
        story = await store.active_story(w.channel.id)
        await w.player.edit(sent, "I sheathe my sword.")
        assert (await store.turn_by_message(sent.id)).text == "I sheathe my sword."
        await w.player.delete(sent)
        assert await store.turn_by_message(sent.id) is None
        kinds = [t.author_kind.value for t in await store.recent_turns(story.id)]
        assert kinds == ["persona", "persona"]  # the reply stays; only the user's own turn went


async def test_images_and_audio_reach_the_engine_and_what_was_heard_is_quoted(bot_settings, store, fake_engine):
    fake_engine.transcript = "the bell rang three times"
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "Hello")  # the first reply tells the bot this engine takes audio
        await w.player.send(w.channel, "Look and listen", attachments=[
            ("lantern.png", png_bytes()), ("voice-message.ogg", b"OggS" + b"\0" * 200),
            ("notes.zip", b"PK\x03\x04")])
        body = fake_engine.requests_to("/v1/chat/completions")[-1].json
        parts = body["messages"][-1]["content"]
        kinds = [p["type"] for p in parts]
        assert "image_url" in kinds and "input_audio" in kinds
        texts = [m.content for m in w.channel.history() if m.author.id == w.bot.user.id]
        assert any("Skipped notes.zip" in t for t in texts)
        assert any("heard: “the bell rang three times”" in t for t in texts)
        story = await store.active_story(w.channel.id)
        user_turn = next(t for t in await store.recent_turns(story.id) if t.text == "Look and listen")
        audio = [a for a in user_turn.attachments if a["kind"] == "audio"]
        assert audio and audio[0]["transcript"] == "the bell rang three times"


async def test_reply_modes_and_cooldown(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await store.update_guild_settings(w.guild.id, reply_mode="mentions")
        before = await _chat_calls(fake_engine)
        await w.player.send(w.channel, "just chatting with friends")
        assert await _chat_calls(fake_engine) == before
        await w.player.send(w.channel, "wren, are you there?")
        assert await _chat_calls(fake_engine) == before + 1

        await store.update_guild_settings(w.guild.id, reply_mode="replies")
        await w.player.send(w.channel, "wren? hello?")
        assert await _chat_calls(fake_engine) == before + 1
        await w.player.send(w.channel, "Answering you", reply_to=w.persona_messages()[-1])
        assert await _chat_calls(fake_engine) == before + 2

        await store.update_guild_settings(w.guild.id, reply_mode="every", cooldown_s=60)
        await w.player.send(w.channel, "one")
        fast = await w.player.send(w.channel, "two")
        assert await _chat_calls(fake_engine) == before + 3
        assert any(str(r.emoji) == "⏳" for r in
                   next(m for m in w.channel.history() if m.id == fast.id).reactions)


async def test_deleted_webhook_is_recreated(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        first = w.persona_messages()[0].webhook_id
        w.env.backend.delete_webhook(first)
        fake_engine.reply = "Still here."
        await w.player.send(w.channel, "Hello?")
        reply = w.persona_messages()[-1]
        assert reply.content == "Still here." and reply.webhook_id != first


async def test_scene_art_follows_replies_when_the_server_turns_it_on(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await store.update_guild_settings(w.guild.id, scene_art=True, scene_art_every=2)
        fake_engine.reply = "The storm breaks over the harbour."
        await w.player.send(w.channel, "I step outside.")
        assert not any(m.attachments for m in w.persona_messages())
        await w.player.send(w.channel, "I run for the boats.")
        art = w.persona_messages()[-1]
        assert art.attachments and art.attachments[0].filename == "scene.png"
        assert len(fake_engine.requests_to("/v1/images/generations")) == 1


async def test_missing_manage_webhooks_is_explained(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        w.env.inject_error("POST", "/webhooks/*", status=403, code=50013, message="Missing Permissions", times=None)
        await w.player.send(w.channel, "Hello?")
        assert "Manage Webhooks" in w.channel.last_message.content
        story = await store.active_story(w.channel.id)
        assert (await store.recent_turns(story.id))[1].text == "Hello?"  # the user's turn is kept
