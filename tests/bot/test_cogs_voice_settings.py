"""/persona voice and the voice settings of /masque settings, through SimCord with the real bot."""

from __future__ import annotations

import json

import pytest
import simcord

from bot.cards import parse_card
from tests.bot.simcord_kit import make_bot, world
from tests.bot.test_cogs_personas import CARD


async def import_marrow(w) -> None:
    result = await w.admin.slash(w.channel, "persona import", card=("marrow.json", json.dumps(CARD).encode()))
    assert "Imported" in result.response.content


async def test_a_persona_voice_is_chosen_from_the_engine_and_kept_in_the_card(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await import_marrow(w)
        choices = await w.admin.autocomplete(w.channel, "persona voice", "voice", "", name="Marrow")
        assert [c["value"] for c in choices] == ["default", "joe", "amy"]  # the engine's /v1/audio/voices

        shown = await w.admin.slash(w.channel, "persona voice", name="Marrow")
        assert "**default**" in shown.response.content

        saved = await w.admin.slash(w.channel, "persona voice", name="Marrow", voice="amy")
        assert "now speaks with the voice **amy**" in saved.response.content
        persona = await store.get_persona(w.guild.id, "Marrow")
        assert persona.voice == "amy"

        exported = await w.admin.slash(w.channel, "persona export", name="Marrow", format="json")
        card = parse_card(await exported.response.attachments[0].read(), "marrow.json").card
        assert card.voice == "amy" and card.data.extensions["masque"]["voice"] == "amy"

        unknown = await w.admin.slash(w.channel, "persona voice", name="Marrow", voice="nobody")
        assert "no voice 'nobody'" in unknown.response.content and "joe, amy" in unknown.response.content
        assert (await store.get_persona(w.guild.id, "Marrow")).voice == "amy"  # unchanged

        reset = await w.admin.slash(w.channel, "persona voice", name="Marrow", voice="default")
        assert "**default**" in reset.response.content
        assert (await store.get_persona(w.guild.id, "Marrow")).voice == ""
        assert [type(e).__name__ for e in w.env.errors] == ["CheckFailure"]  # answered by tree.on_error


async def test_any_voice_name_passes_where_the_server_lists_none(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await import_marrow(w)
        await fake_engine.set_mode("error", paths=("/v1/audio/voices",))  # like a server without the route
        saved = await w.admin.slash(w.channel, "persona voice", name="Marrow", voice="af_bella")
        assert "af_bella" in saved.response.content
        assert (await store.get_persona(w.guild.id, "Marrow")).voice == "af_bella"


async def test_voice_settings_per_channel_and_per_server(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        shown = await w.admin.slash(w.channel, "masque settings")
        assert "Voice replies in this channel: **spoken**" in shown.response.content
        assert "**700 ms**" in shown.response.content
        saved = await w.admin.slash(w.channel, "masque settings", voice_replies="always", voice_silence_ms=900,
                                    voice_barge_in=False, voice_alone_leave=30.0, voice_idle_leave=0.0)
        text = saved.response.content
        assert text.startswith("Saved.") and "**always**" in text and "**900 ms**" in text
        assert "stops it: **off**" in text and "**never**" in text
        assert (await store.channel_settings(w.channel.id))["voice_replies"] == "always"
        assert (await store.guild_settings(w.guild.id))["voice_silence_ms"] == 900
        with pytest.raises(simcord.OptionError):
            await w.admin.slash(w.channel, "masque settings", voice_silence_ms=50)
        with pytest.raises(simcord.OptionError):
            await w.admin.slash(w.channel, "masque settings", voice_replies="sometimes")
