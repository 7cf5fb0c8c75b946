"""Reply shaping, sampler presets and reply length: the pure functions, then the pipeline and
/masque samplers with the real bot against the fake engine (ours, OpenAI-strict and vLLM-shaped)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import simcord
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.engine_client import EngineClient
from bot.pipeline import StoryPipeline, persona_card
from bot.prefs import GuildPrefs
from bot.story.generation import PRESETS, Samplers, asked_tokens, card_samplers, reply_tokens, resolve
from bot.story.shaping import PartialShaper, balance_marks, cut_point, shape_partial, shape_reply, trim_incomplete
from tests.bot.simcord_kit import make_bot, world
from tests.bot.story_helpers import Collector, Script, chats, settings_for
from tests.bot.test_pipeline import CHANNEL, GUILD, said
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.fake_vllm import FakeVLLM

OTHERS = ["Ann Marsh", "Bo"]
# pieces of streamed replies, name lines split across lines and chunks among them
PIECES = ["Ann", "Ann Marsh", "Bo", "Wren", "You", "you say", "User", "says", ":", "]", "[", "*", "**", "_", " ",
          "\n", "\n\n", "Hello", " there.", "the key", "Bob", "nods", "“", "*You nod*"]

# -- shaping -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "shaped"), [
    # an unfinished last sentence is trimmed back to the last whole one
    ('*She leans on the bar.* "You\'re late," she says. "The rain kept',
     '*She leans on the bar.* "You\'re late," she says.'),
    ("It was a long night. The harbour was quiet and the", "It was a long night."),
    # a closed action counts as an end
    ('"Stay close." *She draws her knife* and then she', '"Stay close." *She draws her knife*'),
    # the model starting the user's lines: cut there (full name, first name, bold, "You say")
    ("I wait for you.\nAnn Marsh: I sit down.\nWren: Good.", "I wait for you."),
    ("I wait.\nAnn: I sit down.", "I wait."),
    ("I wait.\n**Bo:** hi there.", "I wait."),
    ("Fine. I'll come.\nYou say to her: thanks.", "Fine. I'll come."),
    ("Fine.\nUser: ok", "Fine."),
    # "You say" on the first line is the persona talking to the user, not narrating for them
    ("You say that like it's easy. *She laughs.*", "You say that like it's easy. *She laughs.*"),
    # an action the trim left open is closed; a lone trailing asterisk goes
    ("*She turns to the window. Outside the", "*She turns to the window.*"),
    ("It was fine. *", "It was fine."),
    # a leading "Wren:" header is dropped
    ("Wren: Come in.", "Come in."),
    # nothing but a name: no reply at all
    ("Wren:", ""),
    ("Wren", ""),
    ("Ann:", ""),
    # text with no sentence end at all is kept as it is (nothing better to show)...
    ("no punctuation here", "no punctuation here"),
    # ...unless it stops where no sentence ends: then it says it was cut
    ("*She leans into the", "*She leans into the…*"),
    # an action or quote opened at the very end is dropped, not "closed" empty
    ('*A shade creeps across the window.* "', "*A shade creeps across the window.*"),
    # marks close innermost first
    ('*Dex nods. "Yes, that\'s it. But more likely something', '*Dex nods. "Yes, that\'s it."*'),
])
def test_shape_reply(raw: str, shaped: str):
    assert shape_reply(raw, "Wren", OTHERS) == shaped


def test_trimming_can_be_turned_off_but_impersonation_is_always_cut():
    assert shape_reply("One. Two and", "Wren", OTHERS, trim=False) == "One. Two and"
    assert shape_reply("One.\nBo: hey", "Wren", OTHERS, trim=False) == "One."


def test_shaping_pieces():
    assert trim_incomplete("Done!") == "Done!" and trim_incomplete("Done! And th") == "Done!"
    assert balance_marks('She says "hello') == 'She says "hello"'
    assert balance_marks("*nods") == "*nods*" and balance_marks("**bold** text") == "**bold** text"
    assert cut_point("Hi.\nBo says hello.", OTHERS) == 4
    assert cut_point("Bob is late.", OTHERS) is None  # "Bo" must be a whole name, followed by ":" or "says"
    assert shape_partial("Wren: I see. \nAnn: wh", "Wren", OTHERS) == ("I see.", True)
    assert shape_partial("I see. And", "Wren", OTHERS) == ("I see. And", False)


# -- presets and length ------------------------------------------------------------------------


def test_sampler_layers_preset_then_server_then_card():
    assert resolve("roleplay") == PRESETS["roleplay"]
    server = {"preset": "precise", "values": {"temperature": 0.3}}
    assert resolve("roleplay", server).temperature == 0.3 and resolve("roleplay", server).top_k == 40
    card = Samplers(top_k=10)
    both = resolve("roleplay", server, card)
    assert (both.temperature, both.top_k, both.min_p) == (0.3, 10, PRESETS["precise"].min_p)
    assert resolve("roleplay", {"preset": "nonsense"}) == PRESETS["roleplay"]  # a stale name falls back
    assert resolve("neutral").request_params() == {}  # the server's own defaults


def test_request_params_leave_out_what_openai_refuses():
    params = PRESETS["roleplay"].request_params(extras=False)
    assert "top_k" not in params and "min_p" not in params and "repetition_penalty" not in params
    assert params["frequency_penalty"] == PRESETS["roleplay"].frequency_penalty


def test_card_samplers_keep_the_valid_values_of_a_broken_block():
    assert card_samplers({"samplers": {"temperature": 0.5, "top_k": -4, "min_p": "lots"}}) == Samplers(temperature=0.5)
    assert card_samplers({"samplers": "hot"}) == Samplers() and card_samplers({}) == Samplers()


@pytest.mark.parametrize(("instruction", "tokens"), [
    ("Keep replies under 150 words.", 254),
    ("Write no more than two paragraphs.", 237),
    ("Reply in 100-150 words.", 254),
    ("Answer in 3 sentences or less, in character.", 92),
    ("Stay under 60 tokens.", 75),
    ("Be vivid. Use 150 words at most, and never more than 2 sentences.", 61),  # the smallest ask wins
    ("Write vivid prose.", None),
    ("", None),
])
def test_asked_tokens(instruction: str, tokens: int | None):
    assert asked_tokens(instruction) == tokens


def test_reply_tokens_lowers_the_setting_to_the_cards_ask():
    assert reply_tokens(300, "Keep replies under 50 words.") == 85
    assert reply_tokens(60, "Keep replies under 500 words.") == 60
    assert reply_tokens(300, "") == 300


# -- the pipeline ------------------------------------------------------------------------------


async def test_a_reply_is_sent_with_the_preset_and_shaped_before_it_is_shown_and_stored(pipeline, fake_engine,
                                                                                          script: Script):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    script.replies[:] = ['*She nods.* "Then we go tonight." She grabs her coat.\nAnn: I follow her.\nWren: Good.',
                         "Wren:", "The door creaks. She waits for the"]
    sink = Collector()
    first = await pipeline.reply(CHANNEL, GUILD, said("Shall we go?"), sink)
    assert first.persona_turn.text == '*She nods.* "Then we go tonight." She grabs her coat.'
    assert sink.finished == [first.persona_turn.text]
    assert all("Ann: I follow" not in update for update in sink.updates)  # never shown, even while streaming
    body = chats(fake_engine)[-1]
    wanted = PRESETS["roleplay"].request_params()
    assert {k: body[k] for k in wanted} == wanted

    second = await pipeline.reply(CHANNEL, GUILD, said("And then?"), Collector())  # "Wren:" is asked again
    assert second.persona_turn.text == "The door creaks."
    turns = await pipeline.store.recent_turns(story.id)
    assert [t.text for t in turns[-4:]] == ["Shall we go?", first.persona_turn.text, "And then?", "The door creaks."]


async def test_server_and_card_samplers_and_the_cards_length_reach_the_request(pipeline, fake_engine, store):
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    prefs = GuildPrefs(sampler_preset="precise", samplers=Samplers(temperature=0.4), reply_tokens=200)
    await store.update_guild_settings(GUILD, **prefs.model_dump(mode="json"))
    persona = await store.get_persona(GUILD, "Wren Halloway")
    card = persona_card(persona)
    card.data.post_history_instructions = "Keep replies under 50 words."
    card.data.extensions = {**card.data.extensions, "masque": {**card.data.masque, "samplers": {"top_k": 12}}}
    await store.update_persona(persona.id, card)
    await pipeline.reply(CHANNEL, GUILD, said("Talk to me."), Collector())
    body = chats(fake_engine)[-1]
    assert (body["temperature"], body["top_k"], body["top_p"]) == (0.4, 12, PRESETS["precise"].top_p)
    assert body["max_tokens"] == reply_tokens(200, "Keep replies under 50 words.")


@contextlib.asynccontextmanager
async def pipeline_on(server: FakeEngine, store) -> AsyncIterator[StoryPipeline]:
    """A pipeline talking to `server` (started here), with a story started."""
    await server.start()
    settings = settings_for(server.url)
    engine = EngineClient.from_settings(settings)
    try:
        pipeline = StoryPipeline(store, engine, settings)
        await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
        yield pipeline
    finally:
        await engine.close()
        await server.stop()


async def test_a_server_that_refuses_the_extras_gets_openais_samplers_only(store):
    strict = FakeEngine(openai_params_only=True, reply="Fine. Let us go.")
    async with pipeline_on(strict, store) as pipeline:
        for text in ("hello", "again"):
            result = await pipeline.reply(CHANNEL, GUILD, said(text), Collector())
            assert result.persona_turn.text == "Fine. Let us go."
        bodies = chats(strict)
        assert "top_k" in bodies[0] and len(bodies) == 3  # refused once, then asked without the extras
        assert all("top_k" not in b and "min_p" not in b and b["frequency_penalty"] == 0.2 for b in bodies[1:])


async def test_a_vllm_shaped_server_takes_every_sampler(store):
    vllm = FakeVLLM(reply="Fine. Let us go.")
    async with pipeline_on(vllm, store) as pipeline:
        await pipeline.reply(CHANNEL, GUILD, said("hello"), Collector())
        [body] = chats(vllm)
        assert body["min_p"] == PRESETS["roleplay"].min_p and body["repetition_penalty"] == 1.1


# -- /masque samplers --------------------------------------------------------------------------


async def test_masque_samplers_shows_changes_and_resets(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        shown = await w.admin.slash(w.channel, "masque samplers")
        assert "**roleplay (the bot's default)**" in shown.response.content
        saved = await w.admin.slash(w.channel, "masque samplers", preset="creative", min_p=0.08, reply_tokens=180)
        text = saved.response.content
        assert text.startswith("Saved.") and "**creative**" in text and "min_p **0.08**" in text and "**180**" in text
        stored = await store.guild_settings(w.guild.id)
        assert stored["sampler_preset"] == "creative" and stored["samplers"]["min_p"] == 0.08
        assert stored["reply_tokens"] == 180
        with pytest.raises(simcord.OptionError):
            await w.admin.slash(w.channel, "masque samplers", repetition_penalty=3.0)
        reset = await w.admin.slash(w.channel, "masque samplers", reset=True)
        assert "**roleplay (the bot's default)**" in reset.response.content
        assert (await store.guild_settings(w.guild.id))["reply_tokens"] is None
        assert not w.env.errors


@pytest.mark.parametrize("text", [
    "I wait.\nAnn\n: I take the key.", "I wait.\n**\n\n**Bo**: mine.", "Hm.\n[Ann Marsh\n]: no.",
    "Hm.\nBo\nsays nothing.", "Wren: I nod.\nYou say yes.", "A\n*\n_\nUser:\nhi", "Fine.\n\nAnn Marsh"])
def test_the_streaming_shaper_finds_name_lines_split_across_chunks(text):
    for split in range(1, len(text)):  # a chunk ends anywhere, even inside the name line's opening
        shaper = PartialShaper("Wren", OTHERS)
        first = shaper(text[:split])
        assert first == shape_partial(text[:split], "Wren", OTHERS)
        if not first[1]:
            assert shaper(text) == shape_partial(text, "Wren", OTHERS), (text, split)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=60), st.data())
def test_the_streaming_shaper_answers_as_shape_partial_on_every_prefix(pieces, data):
    text = "".join(pieces)
    ends = sorted(set(data.draw(st.lists(st.integers(1, len(text)), max_size=20)) + [len(text)]))
    shaper = PartialShaper("Wren", OTHERS)
    for end in ends:  # the chunks as they arrive: each call sees the text so far
        shown = shaper(text[:end])
        assert shown == shape_partial(text[:end], "Wren", OTHERS), text[:end]
        if shown[1]:
            break  # the stream stops there
