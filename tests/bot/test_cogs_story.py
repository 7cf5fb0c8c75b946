"""/story, /scene, /imagine and the reply buttons through SimCord."""

from __future__ import annotations

from tests.bot.simcord_kit import make_bot, start_story, world


def controls(w):
    """The latest message carrying the reply buttons."""
    return next(m for m in reversed(w.channel.history()) if m.components)


async def test_greeting_swipes_through_alternate_greetings(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        started = await start_story(w)
        assert "alternate greetings" in started.response.content and started.ephemeral
        greeting = w.persona_messages()[0]
        first = greeting.content
        await w.player.click(controls(w), label="Next")
        second = w.persona_messages()[0].content
        assert second != first and w.persona_messages()[0].id == greeting.id  # edited in place
        story = await store.active_story(w.channel.id)
        turn = (await store.recent_turns(story.id))[0]
        assert turn.selected_swipe == 1 and turn.text == second
        await w.player.click(controls(w), label="Previous")
        assert w.persona_messages()[0].content == first


async def test_regenerate_continue_and_illustrate(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        fake_engine.reply = "The innkeeper shrugs."
        await w.player.send(w.channel, "Is the kitchen open?")
        reply = w.persona_messages()[-1]
        fake_engine.reply = "The innkeeper laughs."
        await w.player.click(controls(w), label="Regenerate")
        assert w.persona_messages()[-1].id == reply.id
        assert w.persona_messages()[-1].content == "The innkeeper laughs."
        turn = await store.turn_by_message(reply.id)
        assert [s.text for s in turn.swipes] == ["The innkeeper shrugs.", "The innkeeper laughs."]
        await w.player.click(controls(w), label="Previous")
        assert (await store.turn_by_message(reply.id)).text == "The innkeeper shrugs."

        fake_engine.reply = "Then she pours you a drink."
        await w.player.click(controls(w), label="Continue")
        assert w.persona_messages()[-1].content == "The innkeeper shrugs. Then she pours you a drink."

        await w.player.click(controls(w), label="Illustrate")
        art = w.persona_messages()[-1]
        assert art.attachments and art.attachments[0].filename == "scene.png"
        assert fake_engine.requests_to("/v1/images/generations")


async def test_regenerate_redoes_the_text_and_the_scene_art_together(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await store.update_guild_settings(w.guild.id, scene_art=True, scene_art_every=1)
        fake_engine.reply = "The storm breaks over the harbour."
        await w.player.send(w.channel, "I step outside.")
        old_art = w.persona_messages()[-1]
        assert old_art.attachments and old_art.attachments[0].filename == "scene.png"
        reply = w.persona_messages()[-2]

        fake_engine.reply = "The harbour lies still under the stars."
        await w.player.click(controls(w), label="Regenerate")
        shown = w.persona_messages()
        assert shown[-2].id == reply.id and shown[-2].content == "The harbour lies still under the stars."
        new_art = shown[-1]
        assert new_art.id != old_art.id and new_art.attachments[0].filename == "scene.png"
        assert all(m.id != old_art.id for m in w.channel.history())  # the old picture is gone
        # A fresh picture was painted, not the earlier one reused.
        assert len(fake_engine.requests_to("/v1/images/generations")) == 2


async def test_only_participants_may_press_the_buttons(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "Hello there")
        stranger = w.guild.add_member(w.env.create_user("stranger"))
        before = len(fake_engine.requests_to("/v1/chat/completions"))
        refused = await stranger.click(controls(w), label="Regenerate")
        assert refused.response.ephemeral and "taking part" in refused.response.content
        assert len(fake_engine.requests_to("/v1/chat/completions")) == before


async def test_status_export_rewind_reset_and_end(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        fake_engine.reply = "A quiet night."
        await w.player.send(w.channel, "I sit by the fire.")
        status = await w.player.slash(w.channel, "story status")
        assert status.response.content.startswith("**Wren Halloway** · 3 turns")

        exported = await w.player.slash(w.channel, "story export")
        text = (await exported.response.attachments[0].read()).decode()
        assert "Pip: I sit by the fire." in text and "A quiet night." in text

        rewound = await w.player.slash(w.channel, "story rewind", turns=2)
        assert "Took back 2 turns" in rewound.response.content
        assert len(w.persona_messages()) == 1  # the reply's message was deleted
        story = await store.active_story(w.channel.id)
        assert await store.count_turns(story.id) == 1

        reset = await w.player.slash(w.channel, "story reset")
        assert "starts over" in reset.response.content
        assert (await store.active_story(w.channel.id)).id != story.id
        assert len(w.persona_messages()) == 2  # a fresh greeting

        ended = await w.player.slash(w.channel, "story end")
        assert ended.response.content == "The story has ended."
        assert await store.active_story(w.channel.id) is None
        before = len(fake_engine.requests_to("/v1/chat/completions"))
        await w.player.send(w.channel, "Anyone?")
        assert len(fake_engine.requests_to("/v1/chat/completions")) == before


async def test_commands_without_a_story_say_what_to_do(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        for name in ("story status", "story export", "scene"):
            result = await w.player.slash(w.channel, name)
            message = (result.response or result.followups[-1]).content
            assert "/story start" in message, name
        assert w.error_types() == ["NoStory"] * 3  # each answered by tree.on_error (the messages above)
        unknown = await w.admin.slash(w.channel, "story start", persona="Nobody")
        assert "no persona named 'Nobody'" in unknown.response.content
        assert w.error_types() == ["NoStory"] * 3 + ["UnknownPersona"]


async def test_scene_and_imagine_post_art(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I light the lantern.")
        scene = await w.player.slash(w.channel, "scene")
        assert scene.response.ephemeral
        art = w.persona_messages()[-1]
        assert art.attachments[0].filename == "scene.png" and art.author.name == "Wren"

        imagined = await w.player.slash(w.channel, "imagine", prompt="a lighthouse @everyone")
        posted = imagined.response
        assert not posted.ephemeral and posted.attachments[0].filename == "scene.png"
        assert not w.stored(posted.message).mention_everyone
        body = fake_engine.requests_to("/v1/images/generations")[-1].json
        assert "lighthouse" in body["prompt"] and body.get("safe", True) is True


async def test_persona_names_that_discord_refuses_are_sanitised(bot_settings, store, fake_engine):
    import json
    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Clyde the Discord Mod", "description": "x", "first_mes": "Hi."}}
    async with world(make_bot(bot_settings, store)) as w:
        await w.admin.slash(w.channel, "persona import", card=("clyde.json", json.dumps(card).encode()))
        await start_story(w, "Clyde the Discord Mod")
        name = w.persona_messages()[-1].author.name
        assert "clyde" not in name.lower() and "discord" not in name.lower()
        assert name.replace("\u200a", "") == "Clyde the Discord Mod"
