"""An engine with no image model (the offline preset): the persona is told what was shared and nothing
invented, and scene art says which setting turns it on, through SimCord with the real bot."""

from __future__ import annotations

from tests.bot.simcord_kit import make_bot, start_story, world
from tests.bot.test_listener import png_bytes

SETTING = "MASQUE_ENGINE_IMAGES__MODEL"


async def test_an_image_is_named_by_file_and_size_and_nothing_is_quoted_as_seen(bot_settings, store, fake_engine):
    fake_engine.caption = ""  # like our engine without a captioner: no caption comes back
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "Look at this", attachments=[("lantern.png", png_bytes())])
        body = fake_engine.requests_to("/v1/chat/completions")[-1].json
        text = body["messages"][-1]["content"][0]["text"]
        assert text.endswith("Look at this\n[an image was shared: lantern.png, 8×8]")
        bot_texts = [m.content for m in w.channel.history() if m.author.id == w.bot.user.id]
        assert not any("saw:" in t or "seen" in t for t in bot_texts)
        story = await store.active_story(w.channel.id)
        user_turn = next(t for t in await store.recent_turns(story.id) if t.text == "Look at this")
        assert "caption" not in user_turn.attachments[0]
        assert (user_turn.attachments[0]["width"], user_turn.attachments[0]["height"]) == (8, 8)


async def test_scene_art_off_says_which_setting_turns_it_on(bot_settings, store, fake_engine):
    fake_engine.images = False
    async with world(make_bot(bot_settings, store)) as w:
        await start_story(w)
        await w.player.send(w.channel, "I step outside.")
        chats_before = len(fake_engine.requests_to("/v1/chat/completions"))
        scene = await w.player.slash(w.channel, "scene")
        assert SETTING in (scene.response or scene.followups[-1]).content
        imagine = await w.player.slash(w.channel, "imagine", prompt="a lighthouse")
        assert SETTING in (imagine.response or imagine.followups[-1]).content
        # no scene prompt was written for nothing, and no image was asked for
        assert len(fake_engine.requests_to("/v1/chat/completions")) == chats_before
        assert fake_engine.requests_to("/v1/images/generations") == []

        settings = await w.admin.slash(w.channel, "masque settings", scene_art=True)
        assert settings.response.content.startswith("Saved.") and SETTING in settings.response.content
        await w.player.send(w.channel, "I run for the boats.")  # replies go on without art
        assert w.persona_messages()[-1].content and not w.persona_messages()[-1].attachments
        errors = [type(getattr(e, "original", e)).__name__ for e in w.env.errors]
        assert errors == ["EngineFeatureOff", "EngineFeatureOff"]  # /scene and /imagine, answered above
