"""The story pipeline on a real SQLite store and a fake OpenAI-shaped engine over real HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.builtin import builtin_personas
from bot.engine_client import EngineBadResponse, EngineClient, EngineTimeout, EngineUnavailable
from bot.pipeline import (
    NO_REPLY_TRIES,
    InputAttachment,
    NoStory,
    StoryError,
    StoryPipeline,
    UnknownPersona,
    UserInput,
)
from bot.store import AuthorKind, Store
from tests.bot.story_helpers import Collector, chats, next_id, settings_for

CHANNEL, GUILD = 111, 222
def said(text: str, name: str = "Ann", message_id: int | None = None, **kw: object) -> UserInput:
    return UserInput(text, author_id=7, author_name=name, message_id=message_id or next_id(), **kw)


async def test_start_story_stores_the_greeting_with_alternates_as_swipes(pipeline: StoryPipeline):
    story, persona, greetings = await pipeline.start_story(CHANNEL, GUILD, "wren halloway", "Ann")
    assert persona.name == "Wren Halloway" and len(greetings) >= 2
    assert all("{{" not in g for g in greetings)
    [turn] = await pipeline.store.recent_turns(story.id)
    assert turn.author_kind == AuthorKind.PERSONA and turn.text == greetings[0]
    assert [s.text for s in turn.swipes] == greetings
    sink = Collector()
    shown = await pipeline.show_greeting(story, sink)
    assert shown is not None and sink.finished == [greetings[0]]
    assert (await pipeline.store.turn_by_message(sink.ids[0])).id == turn.id
    with pytest.raises(UnknownPersona):
        await pipeline.start_story(CHANNEL, GUILD, "nobody at all")


async def test_reply_streams_stores_both_turns_and_builds_the_prompt(pipeline, fake_engine, script):
    engine = fake_engine
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    sink = Collector()
    result = await pipeline.reply(CHANNEL, GUILD, said("My cat is gone, Wren.", message_id=555), sink)
    assert result.persona_turn.text == script.default
    assert sink.finished == [script.default]
    assert len(sink.updates) > 2 and sink.updates[-1] == script.default
    assert all(script.default.startswith(u) for u in sink.updates)
    assert (await pipeline.store.turn_by_message(555)).id == result.user_turn.id
    assert (await pipeline.store.turn_by_message(sink.ids[0])).id == result.persona_turn.id
    turns = await pipeline.store.recent_turns(story.id)
    assert [t.author_kind for t in turns] == [AuthorKind.PERSONA, AuthorKind.USER, AuthorKind.PERSONA]
    request = chats(engine)[-1]
    assert "Port Vesper" in request["messages"][0]["content"]
    assert request["messages"][-1]["content"].startswith("Ann: My cat is gone, Wren.")
    assert "\nAnn:" in request["stop"]


async def test_a_streamed_name_header_is_never_shown(pipeline, script):
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    script.replies[:] = ["Wren: *sighs* Fine."]
    sink = Collector()
    result = await pipeline.reply(CHANNEL, GUILD, said("well?"), sink)
    assert result.persona_turn.text == "*sighs* Fine." == sink.finished[-1]
    assert all(u and "*sighs* Fine.".startswith(u) for u in sink.updates)


async def test_two_messages_at_once_are_answered_in_order(pipeline, fake_engine, script):
    engine = fake_engine
    engine.latency = 0.2
    script.replies[:] = ["first answer", "second answer"]
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    one, two = await asyncio.gather(
        pipeline.reply(CHANNEL, GUILD, said("one", "Ann"), Collector()),
        pipeline.reply(CHANNEL, GUILD, said("two", "Bo"), Collector()))
    assert (one.persona_turn.text, two.persona_turn.text) == ("first answer", "second answer")
    turns = await pipeline.store.recent_turns(story.id)
    assert [t.text for t in turns[1:]] == ["one", "first answer", "two", "second answer"]
    assert [t.position for t in turns] == sorted(t.position for t in turns)
    # The second prompt saw the first exchange.
    second_prompt = str(chats(engine)[1]["messages"])
    assert "first answer" in second_prompt and "Bo: two" in second_prompt


@pytest.mark.parametrize(("mode", "error"), [("down", EngineUnavailable), ("garbage", EngineBadResponse),
                                             ("slow", EngineTimeout), ("error", EngineUnavailable)])
async def test_engine_failure_keeps_the_user_turn_and_retry_answers_it(store, fake_engine, script, mode, error):
    settings = settings_for(fake_engine.url, MASQUE_ENGINE_TIMEOUT_S=0.5)
    client = EngineClient.from_settings(settings)
    pipeline = StoryPipeline(store, client, settings)
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await fake_engine.set_mode(mode)
    with pytest.raises(error) as caught:
        await pipeline.reply(CHANNEL, GUILD, said("are you there?"), Collector())
    assert caught.value.user_message
    turns = await store.recent_turns(story.id)
    assert turns[-1].text == "are you there?" and caught.value.turn_id == turns[-1].id
    await fake_engine.set_mode("ok")
    assert await client.health() == {fake_engine.url: True}  # the engine is back
    answer = await pipeline.regenerate(caught.value.turn_id, Collector())
    turns = await store.recent_turns(story.id)
    assert [t.text for t in turns[-2:]] == ["are you there?", script.default] and answer.id == turns[-1].id
    await client.close()


async def test_an_empty_reply_is_asked_again_then_a_bad_response(pipeline, fake_engine, script):
    script.default = "   "
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway")
    with pytest.raises(EngineBadResponse, match="no reply in character"):
        await pipeline.reply(CHANNEL, GUILD, said("hello?"), Collector())
    assert len(chats(fake_engine)) == NO_REPLY_TRIES


async def test_regenerate_adds_a_selected_swipe_and_swipe_moves_between_them(pipeline, fake_engine, script):
    engine = fake_engine
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    script.replies[:] = ["take one", "take two"]
    result = await pipeline.reply(CHANNEL, GUILD, said("hi"), Collector())
    regen_prompt_count = len(chats(engine))
    turn = await pipeline.regenerate(result.persona_turn.id, Collector())
    assert [s.text for s in turn.swipes] == ["take one", "take two"] and turn.text == "take two"
    assert "take one" not in str(chats(engine)[regen_prompt_count]["messages"])  # regenerate never sees itself
    turn = await pipeline.swipe(turn.id, -1)
    assert turn.text == "take one" and turn.selected_swipe == 0
    turn = await pipeline.swipe(turn.id, +9)
    assert turn.text == "take two"
    turn = await pipeline.swipe(turn.id, -1)
    await pipeline.reply(CHANNEL, GUILD, said("go on"), Collector())
    history = str(chats(engine)[-1]["messages"])
    assert "take one" in history and "take two" not in history  # the story keeps the chosen swipe


async def test_continue_appends_to_the_reply(pipeline, fake_engine, script):
    engine = fake_engine
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    script.replies[:] = ["She looks up.", "Then she sighs."]
    result = await pipeline.reply(CHANNEL, GUILD, said("hi"), Collector())
    sink = Collector()
    turn = await pipeline.continue_turn(result.persona_turn.id, sink)
    assert turn.text == "She looks up. Then she sighs." == sink.finished[-1]
    assert "Continue your last reply" in str(chats(engine)[-1]["messages"][-1])


async def test_rewind_reset_end_status_and_transcript(pipeline):
    story, _, greetings = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    for text in ("one", "two"):
        await pipeline.reply(CHANNEL, GUILD, said(text), Collector())
    status = await pipeline.status(CHANNEL)
    assert (status.turns, status.persona_name, status.scene_images) == (5, "Wren Halloway", 0)
    transcript = await pipeline.transcript(CHANNEL)
    assert transcript.startswith("# Wren Halloway") and "Ann: two" in transcript and "Wren: " in transcript
    removed = await pipeline.rewind(CHANNEL, 2)
    assert [t.text for t in removed][1] == "two"
    assert (await pipeline.status(CHANNEL)).turns == 3
    new_story, new_greetings = await pipeline.reset(CHANNEL)
    assert new_story.id != story.id and new_greetings == greetings
    assert (await pipeline.status(CHANNEL)).turns == 1
    assert (await pipeline.end(CHANNEL)).id == new_story.id
    with pytest.raises(NoStory):
        await pipeline.reply(CHANNEL, GUILD, said("anyone?"), Collector())


async def test_edits_and_deletes_follow_the_users_messages(pipeline):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    sink = Collector()
    await pipeline.reply(CHANNEL, GUILD, said("I have a dog", message_id=901), sink)
    edited = await pipeline.edit_user_turn(901, "I have a cat")
    assert edited is not None and edited.text == "I have a cat"
    assert await pipeline.edit_user_turn(sink.ids[0], "persona text is not the user's") is None
    assert await pipeline.edit_user_turn(424242, "unknown") is None
    assert await pipeline.delete_by_message(901) is True
    assert await pipeline.delete_by_message(901) is False
    assert "I have a cat" not in [t.text for t in await pipeline.store.recent_turns(story.id)]


async def test_audio_goes_natively_to_a_masque_engine_and_its_transcript_is_kept(pipeline, fake_engine, script):
    engine = fake_engine
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await pipeline.reply(CHANNEL, GUILD, said("hi"), Collector())  # the client learns the engine's dialect
    voice = InputAttachment("audio", "voice-message.ogg", "audio/ogg", b"OggS fake audio", "https://cdn/v.ogg")
    photo = InputAttachment("image", "cat.png", "image/png", b"\x89PNG fake", "https://cdn/cat.png")
    result = await pipeline.reply(CHANNEL, GUILD, said("", attachments=[voice, photo]), Collector())
    assert result.heard == [engine.transcript] and result.seen == [engine.caption]
    last = chats(engine)[-1]["messages"][-1]["content"]
    kinds = [p["type"] for p in last]
    assert kinds == ["text", "input_audio", "image_url"]
    assert last[1]["input_audio"]["format"] == "ogg"
    assert last[2]["image_url"]["url"].startswith("data:image/png;base64,")
    assert not engine.requests_to("/v1/audio/transcriptions")
    turn = await pipeline.store.get_turn(result.user_turn.id)
    assert turn.attachments[0]["transcript"] == engine.transcript and turn.attachments[1]["caption"] == engine.caption
    assert "size" in turn.attachments[0] and "data" not in turn.attachments[0]
    await pipeline.reply(CHANNEL, GUILD, said("and?"), Collector())
    assert f"[voice message: {engine.transcript}]" in str(chats(engine)[-1]["messages"])


async def test_audio_is_transcribed_first_for_an_engine_without_masque_extras(pipeline, fake_engine, script):
    engine = fake_engine
    engine.masque = False
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    voice = InputAttachment("audio", "note.wav", "audio/wav", b"RIFF fake")
    result = await pipeline.reply(CHANNEL, GUILD, said("listen", attachments=[voice]), Collector())
    assert result.heard == [engine.transcript]
    assert engine.requests_to("/v1/audio/transcriptions")
    last = chats(engine)[-1]["messages"][-1]["content"]
    assert last == f"Ann: listen\n[voice message: {engine.transcript}]"


async def test_a_failed_transcription_keeps_the_user_turn(pipeline, fake_engine):
    fake_engine.masque = False
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await fake_engine.set_mode("error", paths=("/v1/audio/transcriptions",))
    voice = InputAttachment("audio", "note.wav", "audio/wav", b"RIFF fake")
    with pytest.raises(EngineUnavailable) as caught:
        await pipeline.reply(CHANNEL, GUILD, said("listen", attachments=[voice]), Collector())
    turn = await pipeline.store.get_turn(caught.value.turn_id)
    assert turn.story_id == story.id and turn.text == "listen" and turn.attachments[0]["filename"] == "note.wav"
    assert not chats(fake_engine)


async def test_a_restart_resumes_the_story_from_sql(tmp_path: Path, fake_engine, script):
    engine, url = fake_engine, fake_engine.url
    db = f"sqlite+aiosqlite:///{tmp_path / 'resume.db'}"
    settings = settings_for(url)

    async def open_pipeline() -> StoryPipeline:
        store = Store(db)
        await store.upgrade()
        await store.sync_builtin_personas(builtin_personas())
        return StoryPipeline(store, EngineClient.from_settings(settings), settings)

    first = await open_pipeline()
    await first.start_story(CHANNEL, GUILD, "Old Mossback", "Ann")
    script.replies[:] = ["Hrrm. A riddle, then."]
    await first.reply(CHANNEL, GUILD, said("Tell me a riddle"), Collector())
    await first.engine.close()
    await first.store.close()

    second = await open_pipeline()
    result = await second.reply(CHANNEL, GUILD, said("I give up"), Collector())
    history = str(chats(engine)[-1]["messages"])
    assert "Tell me a riddle" in history and "Hrrm. A riddle, then." in history
    assert result.persona_turn.position == 5
    await second.engine.close()
    await second.store.close()


async def test_a_deleted_persona_gives_a_clear_story_error(pipeline):
    await pipeline.store.bind_personas(CHANNEL, GUILD, [])
    story = await pipeline.store.start_story(CHANNEL, GUILD, None, "orphan")
    assert story.persona_id is None
    with pytest.raises(StoryError, match="persona"):
        await pipeline.reply(CHANNEL, GUILD, said("hello"), Collector())


async def test_a_summary_stands_in_for_the_turns_it_covers(pipeline, fake_engine):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await pipeline.reply(CHANNEL, GUILD, said("the butler did it"), Collector())
    await pipeline.store.add_summary(story.id, through_position=3, text="Ann accused the butler.")
    await pipeline.reply(CHANNEL, GUILD, said("what now?"), Collector())
    messages = chats(fake_engine)[-1]["messages"]
    assert "The story so far: Ann accused the butler." in messages[0]["content"]
    assert "the butler did it" not in str(messages) and "what now?" in str(messages)
