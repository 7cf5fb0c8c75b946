"""/persona commands through SimCord: create, import, export, edit, avatar, list, show, delete."""

from __future__ import annotations

import io
import json

import pytest
import simcord
from PIL import Image

from bot.cards import parse_card
from tests.bot.simcord_kit import make_bot, world

CARD = {"spec": "chara_card_v2", "spec_version": "2.0",
        "data": {"name": "Marrow", "description": "A grave-digger who talks to crows.",
                 "personality": "dry", "scenario": "", "first_mes": "*Marrow leans on a spade.* Evening.",
                 "mes_example": "", "alternate_greetings": ["*A crow lands.* You again?"]}}


def png(color=(10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(out, "PNG")
    return out.getvalue()


async def test_import_then_list_show_export_and_delete(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        result = await w.admin.slash(w.channel, "persona import", card=("marrow.json", json.dumps(CARD).encode()))
        assert "Imported **Marrow**" in result.response.content and result.ephemeral
        assert (await store.get_persona(w.guild.id, "marrow")).author_id == w.admin.id

        listing = await w.admin.slash(w.channel, "persona list")
        assert "**Marrow**" in listing.response.content and "(built in)" in listing.response.content

        shown = await w.admin.slash(w.channel, "persona show", name="Marrow")
        assert shown.response.embeds[0].title == "Marrow"
        assert "grave-digger" in shown.response.embeds[0].description

        exported = await w.admin.slash(w.channel, "persona export", name="Marrow", format="png")
        attachment = exported.response.attachments[0]
        assert attachment.filename == "Marrow.png"
        parsed = parse_card(await attachment.read(), attachment.filename)
        assert parsed.card.data.alternate_greetings == ["*A crow lands.* You again?"]

        deleted = await w.admin.slash(w.channel, "persona delete", name="Marrow")
        assert "Deleted" in deleted.response.content
        assert await store.get_persona(w.guild.id, "Marrow") is None


async def test_bad_card_is_refused_with_the_reason_and_nothing_saved(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        before = len(await store.list_personas(w.guild.id))
        result = await w.admin.slash(w.channel, "persona import", card=("broken.json", b"{not json"))
        message = result.response.content
        assert message.startswith("Could not import") and "broken.json" in message
        nameless = await w.admin.slash(w.channel, "persona import",
                                       card=("nameless.json", json.dumps({"description": "x"}).encode()))
        assert "name" in nameless.response.content
        assert len(await store.list_personas(w.guild.id)) == before


async def test_create_and_edit_with_modals(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        shown = await w.admin.slash(w.channel, "persona create")
        assert shown.modal is not None
        done = await w.admin.submit_modal(shown, {"name": "Juniper", "description": "A hedge witch.",
                                                  "first_mes": "Mind the nettles."})
        assert "Created persona **Juniper**" in done.response.content
        persona = await store.get_persona(w.guild.id, "Juniper")
        assert persona.card["data"]["first_mes"] == "Mind the nettles." and persona.avatar

        shown = await w.admin.slash(w.channel, "persona edit", name="Juniper")
        fields = {c["custom_id"]: c.get("value") for row in shown.modal["components"] for c in row["components"]}
        assert fields["description"] == "A hedge witch."
        await w.admin.submit_modal(shown, {"name": "Juniper", "description": "A hedge witch with a cat."})
        assert (await store.get_persona(w.guild.id, "Juniper")).card["data"]["description"].endswith("cat.")

        taken = await w.admin.slash(w.channel, "persona create")
        clash = await w.admin.submit_modal(taken, {"name": "juniper", "description": "again"})
        assert "already exists" in clash.response.content and clash.response.ephemeral


async def test_avatar_and_autocomplete(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        await w.admin.slash(w.channel, "persona import", card=("marrow.json", json.dumps(CARD).encode()))
        choices = await w.admin.autocomplete(w.channel, "persona avatar", "name", "mar")
        assert [c["value"] for c in choices] == ["Marrow"]
        result = await w.admin.slash(w.channel, "persona avatar", name="Marrow", image=("crow.png", png()))
        assert "New avatar" in result.response.content
        assert (await store.get_persona(w.guild.id, "Marrow")).avatar == png()
        bad = await w.admin.slash(w.channel, "persona avatar", name="Marrow", image=("crow.png", b"not an image"))
        assert bad.response.ephemeral and "Try a PNG" in bad.response.content
        assert [type(e).__name__ for e in w.env.errors] == ["CheckFailure"]  # answered by tree.on_error


async def test_built_in_personas_cannot_be_changed(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        result = await w.admin.slash(w.channel, "persona delete", name="Wren Halloway")
        assert "built in" in result.response.content and result.response.ephemeral
        assert await store.get_persona(w.guild.id, "Wren Halloway") is not None
        assert [type(e).__name__ for e in w.env.errors] == ["CheckFailure"]  # answered by tree.on_error


async def test_a_member_without_manage_server_cannot_change_personas(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        # By default Discord hides the group from them...
        with pytest.raises(simcord.SetupError):
            await w.player.slash(w.channel, "persona create")
        # ...and when an admin opens /persona to everyone, browsing works but changing does not.
        command = next(c for c in await w.bot.tree.fetch_commands() if c.name == "persona")
        w.guild.set_command_permissions(command, {w.guild.default_role: True})
        listing = await w.player.slash(w.channel, "persona list")
        assert "Wren Halloway" in listing.response.content
        for name, options in [("persona create", {}), ("persona delete", {"name": "x"}),
                              ("persona import", {"card": ("m.json", json.dumps(CARD).encode())})]:
            denied = await w.player.slash(w.channel, name, **options)
            assert denied.response.ephemeral and "Manage Server" in denied.response.content, name
            assert denied.modal is None
        assert await store.get_persona(w.guild.id, "Marrow") is None
        assert {type(e).__name__ for e in w.env.errors} == {"MissingPermissions"}  # answered by tree.on_error


async def test_settings_are_admin_only_and_validated(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        shown = await w.admin.slash(w.channel, "masque settings")
        assert "Reply to: **every**" in shown.response.content
        saved = await w.admin.slash(w.channel, "masque settings", reply_mode="mentions", scene_art=True,
                                    scene_art_every=3, cooldown=5.0)
        assert saved.response.content.startswith("Saved.") and "every 3 replies" in saved.response.content
        settings = await store.guild_settings(w.guild.id)
        assert settings["reply_mode"] == "mentions" and settings["cooldown_s"] == 5.0
        with pytest.raises(simcord.OptionError):
            await w.admin.slash(w.channel, "masque settings", scene_art_every=0)
        # /masque is open to everyone (for forget-me); its admin commands refuse at run time.
        refused = await w.player.slash(w.channel, "masque settings", scene_art=False)
        assert refused.ephemeral and "Manage Server" in refused.response.content
        assert w.error_types() == ["MissingPermissions"]
        assert (await store.guild_settings(w.guild.id))["scene_art"] is True

