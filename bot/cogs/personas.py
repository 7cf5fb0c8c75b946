"""/persona: create (modal), import, export, edit (modal), avatar, list, show, delete.

The group is hidden from members without Manage Server by default (server
admins can open it up under Integrations); the commands that change personas
check Manage Server again at run time, so opening the group lets members
browse personas but never change them.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.cards import (
    MAX_CARD_BYTES,
    Card,
    CardError,
    ParsedCard,
    card_from_json,
    parse_card,
    to_charx,
    to_json,
    to_png_card,
)
from bot.cards.parser import placeholder_avatar, to_png
from bot.discord_io.uploads import refuse_if_too_big
from bot.store import GLOBAL_GUILD, Persona, PersonaExists, Store

MODAL_FIELD_LIMIT = 4000  # Discord's limit for one text input
SHOW_FIELD_CHARS = 1000  # an embed field holds 1024
MAX_AVATAR_BYTES = 8 * 1024 * 1024
MAX_VOICE_CHARS = 100  # the persona's voice column
DEFAULT_VOICE = "default"  # the speech server's own default voice
AUTOCOMPLETE_LIMIT = 25  # Discord shows at most 25 choices
EDITABLE = ("name", "description", "personality", "scenario", "first_mes")
_LABELS = {"name": "Name", "description": "Description", "personality": "Personality",
           "scenario": "Scenario", "first_mes": "First message (greeting)"}
manage_server = app_commands.checks.has_permissions(manage_guild=True)


class PersonaModal(discord.ui.Modal):
    """The five card fields Discord fits in one modal; the rest come in by /persona import."""

    def __init__(self, title: str, store: Store, existing: Persona | None = None):
        super().__init__(title=title, timeout=15 * 60)
        self.store, self.existing = store, existing
        data = (existing.card.get("data") or {}) if existing else {}
        for key in EDITABLE:
            long = key != "name"
            self.add_item(discord.ui.TextInput(
                label=_LABELS[key], custom_id=key, default=str(data.get(key, "")) or None,
                style=discord.TextStyle.paragraph if long else discord.TextStyle.short,
                max_length=MODAL_FIELD_LIMIT if long else 100, required=key in ("name", "description")))

    def values(self) -> dict[str, str]:
        return {item.custom_id: item.value.strip() for item in self.children if isinstance(item, discord.ui.TextInput)}

    async def on_submit(self, interaction: discord.Interaction) -> None:
        fields = self.values()
        try:
            if self.existing is None:
                card, _ = card_from_json({"spec": "chara_card_v3", "data": fields}, "the form")
                parsed = ParsedCard(card, placeholder_avatar(card.name), "json", "v3")
                persona = await self.store.create_persona(interaction.guild_id, parsed, interaction.user.id)
                verb = "Created"
            else:
                raw = dict(self.existing.card)
                raw["data"] = {**raw.get("data", {}), **fields}
                card, _ = card_from_json(raw, "the form")
                persona = await self.store.update_persona(self.existing.id, card=card)
                verb = "Saved"
        except (CardError, PersonaExists) as exc:
            await interaction.response.send_message(f"{exc}. Nothing was saved; try again.", ephemeral=True)
            return
        await interaction.response.send_message(f"{verb} persona **{persona.name}**. "
                                                f"Start a story with `/story start persona:{persona.name}`.",
                                                ephemeral=True)


class Personas(commands.Cog):
    """Persona management."""

    persona = app_commands.Group(name="persona", description="Create, import and manage personas",
                                 guild_only=True, default_permissions=discord.Permissions(manage_guild=True))

    def __init__(self, bot: commands.Bot):
        self.bot = bot
        self.store: Store = bot.store  # type: ignore[attr-defined]

    async def name_autocomplete(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = await self.store.persona_names(interaction.guild_id or GLOBAL_GUILD, current)
        return [app_commands.Choice(name=n, value=n) for n in names]

    async def guild_persona(self, interaction: discord.Interaction, name: str) -> Persona:
        """The guild's own persona `name` (built-ins cannot be changed)."""
        persona = await self.store.get_persona(interaction.guild_id, name)
        if persona is None:
            raise app_commands.CheckFailure(f"There is no persona named {name!r}. See /persona list.")
        if persona.guild_id == GLOBAL_GUILD:
            raise app_commands.CheckFailure(f"{persona.name} is built in and cannot be changed. "
                                            "Export it and import a copy under a new name.")
        return persona

    @persona.command()
    @manage_server
    async def create(self, interaction: discord.Interaction) -> None:
        """Write a new persona in a form."""
        await interaction.response.send_modal(PersonaModal("New persona", self.store))

    @persona.command(name="import")
    @manage_server
    @app_commands.describe(card="A character card: PNG, JSON or CHARX (Tavern V1/V2/V3)")
    async def import_(self, interaction: discord.Interaction, card: discord.Attachment) -> None:
        """Import a character card file as a persona."""
        refuse_if_too_big(card, MAX_CARD_BYTES)
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            parsed = parse_card(await card.read(), card.filename)
            persona = await self.store.create_persona(interaction.guild_id, parsed, interaction.user.id)
        except (CardError, PersonaExists) as exc:
            await interaction.followup.send(f"Could not import: {exc}.", ephemeral=True)
            return
        await interaction.followup.send(f"Imported **{persona.name}** ({parsed.format}, {parsed.source_spec}). "
                                        f"Start a story with `/story start persona:{persona.name}`.", ephemeral=True)

    @persona.command()
    @app_commands.describe(name="The persona", format="File format (PNG keeps the avatar)")
    @app_commands.autocomplete(name=name_autocomplete)
    async def export(self, interaction: discord.Interaction, name: str,
                     format: Literal["png", "json", "charx"] = "png") -> None:
        """Download a persona as a character card file."""
        persona = await self._find(interaction, name)
        card = Card.model_validate(persona.card)
        writers = {"png": lambda: to_png_card(card, persona.avatar), "json": lambda: to_json(card),
                   "charx": lambda: to_charx(card, persona.avatar)}
        file = discord.File(io.BytesIO(writers[format]()), filename=f"{_slug(persona.name)}.{format}")
        await interaction.response.send_message(file=file, ephemeral=True)

    @persona.command()
    @manage_server
    @app_commands.autocomplete(name=name_autocomplete)
    async def edit(self, interaction: discord.Interaction, name: str) -> None:
        """Edit a persona's main fields in a form."""
        persona = await self.guild_persona(interaction, name)
        data: dict[str, Any] = persona.card.get("data") or {}
        if any(len(str(data.get(k, ""))) > MODAL_FIELD_LIMIT for k in EDITABLE):
            raise app_commands.CheckFailure("This persona has a field longer than a form allows. Export it, "
                                            "edit the file, delete the persona and import the file again.")
        await interaction.response.send_modal(PersonaModal(f"Edit {persona.name}"[:45], self.store, persona))

    @persona.command()
    @manage_server
    @app_commands.describe(name="The persona", image="A PNG, JPEG, GIF or WebP image")
    @app_commands.autocomplete(name=name_autocomplete)
    async def avatar(self, interaction: discord.Interaction, name: str, image: discord.Attachment) -> None:
        """Give a persona a new avatar."""
        persona = await self.guild_persona(interaction, name)
        if image.size > MAX_AVATAR_BYTES:
            raise app_commands.CheckFailure(f"That image is over {MAX_AVATAR_BYTES // (1024 * 1024)} MiB.")
        try:
            png = to_png(await image.read(), image.filename)
        except CardError as exc:
            raise app_commands.CheckFailure(f"{exc}. Try a PNG or JPEG.") from exc
        await self.store.update_persona(persona.id, avatar=png)
        await interaction.response.send_message(f"New avatar for **{persona.name}**.", ephemeral=True)

    async def voice_autocomplete(self, interaction: discord.Interaction,
                                 current: str) -> list[app_commands.Choice[str]]:
        voices = await self.bot.engine.voices()  # type: ignore[attr-defined]
        matches = [v for v in [DEFAULT_VOICE, *voices] if current.casefold() in v.casefold()]
        return [app_commands.Choice(name=v, value=v) for v in matches[:AUTOCOMPLETE_LIMIT]]

    @persona.command()
    @manage_server
    @app_commands.describe(name="The persona", voice="A voice of the speech server (default: its own default)")
    @app_commands.autocomplete(name=name_autocomplete, voice=voice_autocomplete)
    async def voice(self, interaction: discord.Interaction, name: str,
                    voice: app_commands.Range[str, 1, MAX_VOICE_CHARS] | None = None) -> None:
        """Show or set the voice a persona speaks with (voice messages and voice channels)."""
        persona = await self.guild_persona(interaction, name) if voice else await self._find(interaction, name)
        if voice is None:
            await interaction.response.send_message(
                f"**{persona.name}** speaks with the voice **{persona.voice or DEFAULT_VOICE}**.", ephemeral=True)
            return
        chosen = "" if voice == DEFAULT_VOICE else voice.strip()
        known = await self.bot.engine.voices()  # type: ignore[attr-defined]
        if chosen and known and chosen not in known:  # a server that lists no voices takes any name
            listed = ", ".join(known[:20])
            raise app_commands.CheckFailure(f"The speech server has no voice {chosen!r}. Its voices: {listed}.")
        card = Card.model_validate(persona.card)
        block = {**card.data.masque, "voice": chosen}
        card.data.extensions = {**card.data.extensions, "masque": block}
        await self.store.update_persona(persona.id, card=card)
        await interaction.response.send_message(
            f"**{persona.name}** now speaks with the voice **{chosen or DEFAULT_VOICE}**.", ephemeral=True)

    @persona.command(name="list")
    async def list_(self, interaction: discord.Interaction) -> None:
        """List the personas this server can use."""
        personas = await self.store.list_personas(interaction.guild_id)
        lines = [f"• **{p.name}**{' (built in)' if p.guild_id == GLOBAL_GUILD else ''}" for p in personas]
        await interaction.response.send_message("\n".join(lines)[:2000] or "No personas yet. Try /persona create.",
                                                ephemeral=True)

    @persona.command()
    @app_commands.autocomplete(name=name_autocomplete)
    async def show(self, interaction: discord.Interaction, name: str) -> None:
        """Show a persona's card."""
        persona = await self._find(interaction, name)
        data = persona.card.get("data") or {}
        embed = discord.Embed(title=persona.name, description=_clip(data.get("description", "")))
        for key in ("personality", "scenario", "first_mes"):
            if data.get(key):
                embed.add_field(name=_LABELS[key], value=_clip(data[key], SHOW_FIELD_CHARS), inline=False)
        files = []
        if persona.avatar:
            files.append(discord.File(io.BytesIO(persona.avatar), filename="avatar.png"))
            embed.set_thumbnail(url="attachment://avatar.png")
        await interaction.response.send_message(embed=embed, files=files, ephemeral=True)

    @persona.command()
    @manage_server
    @app_commands.autocomplete(name=name_autocomplete)
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        """Delete one of this server's personas."""
        persona = await self.guild_persona(interaction, name)
        await self.store.delete_persona(interaction.guild_id, persona.name)
        await interaction.response.send_message(f"Deleted **{persona.name}**.", ephemeral=True)

    async def _find(self, interaction: discord.Interaction, name: str) -> Persona:
        persona = await self.store.get_persona(interaction.guild_id or GLOBAL_GUILD, name)
        if persona is None:
            raise app_commands.CheckFailure(f"There is no persona named {name!r}. See /persona list.")
        return persona


def _clip(text: str, limit: int = 4000) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[:60] or "persona"


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Personas(bot))
