"""Persona storage: built-ins, guild personas, lookups for commands and autocomplete."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from bot.cards import Card, ParsedCard
from bot.store.db import Database
from bot.store.models import GLOBAL_GUILD, Persona, PersonaScope
from bot.store.stories import ACTIVE_STORIES, CHANNEL_PERSONAS

AUTOCOMPLETE_LIMIT = 25  # Discord shows at most 25 choices
PERSONAS = "personas"  # cache kind: by id


class PersonaExists(ValueError):
    """A persona of that name already exists in the guild."""


def _name_key(name: str) -> str:
    return name.strip().casefold()


def _fields(parsed: ParsedCard) -> dict:
    card = parsed.card
    return {
        "name": card.name,
        "name_key": _name_key(card.name),
        "card": card.to_v3(),
        "avatar": parsed.avatar,
        "avatar_mime": "image/png" if parsed.avatar else None,
        "art_style": card.art_style,
        "voice": card.voice,
    }


class PersonaRepo(Database):
    async def sync_builtin_personas(self, cards: list[ParsedCard]) -> None:
        """Insert or refresh the built-in personas (guild 0), so commands treat them like any other."""
        async with self.session() as session:
            existing = {
                p.name_key: p
                for p in await session.scalars(select(Persona).where(Persona.guild_id == GLOBAL_GUILD))
            }
            for parsed in cards:
                fields = _fields(parsed)
                row = existing.get(fields["name_key"])
                if row is None:
                    session.add(Persona(guild_id=GLOBAL_GUILD, scope=PersonaScope.BUILTIN, **fields))
                elif row.card != fields["card"] or row.avatar != fields["avatar"]:
                    for key, value in fields.items():
                        setattr(row, key, value)
        self.forget(PERSONAS)

    async def create_persona(self, guild_id: int, parsed: ParsedCard, author_id: int | None = None) -> Persona:
        """Store a new guild persona; raises PersonaExists when the name is taken in that guild."""
        persona = Persona(guild_id=guild_id, scope=PersonaScope.GUILD, author_id=author_id, **_fields(parsed))
        try:
            async with self.session() as session:
                session.add(persona)
        except IntegrityError as exc:
            raise PersonaExists(f"a persona named {parsed.card.name!r} already exists here") from exc
        return persona

    async def update_persona(self, persona_id: int, card: Card | None = None,
                             avatar: bytes | None = None) -> Persona:
        """Replace a persona's card and/or avatar; the name may change (checked for clashes)."""
        try:
            async with self.session() as session:
                persona = await session.get_one(Persona, persona_id)
                if card is not None:
                    persona.name, persona.name_key = card.name, _name_key(card.name)
                    persona.card = card.to_v3()
                    persona.art_style, persona.voice = card.art_style, card.voice
                if avatar is not None:
                    persona.avatar, persona.avatar_mime = avatar, "image/png"
        except IntegrityError as exc:
            raise PersonaExists(f"a persona named {card.name!r} already exists here") from exc
        finally:
            self.forget(PERSONAS, persona_id)
        return persona

    async def get_persona(self, guild_id: int, name: str) -> Persona | None:
        """The guild's persona of that name, else the built-in one."""
        async with self.read() as session:
            rows = await session.scalars(
                select(Persona)
                .where(Persona.name_key == _name_key(name), Persona.guild_id.in_((guild_id, GLOBAL_GUILD)))
                .order_by(Persona.guild_id.desc())
            )
            return rows.first()

    async def get_persona_by_id(self, persona_id: int) -> Persona | None:
        """The persona with that id (cached: read on every message; treat it as read-only)."""
        return await self._cached(PERSONAS, persona_id, lambda: self._load_persona(persona_id))

    async def _load_persona(self, persona_id: int) -> Persona | None:
        async with self.read() as session:
            return await session.get(Persona, persona_id)

    async def list_personas(self, guild_id: int | None = None) -> list[Persona]:
        """Personas usable in a guild (its own and the built-ins); all of them when guild_id is None."""
        query = select(Persona).order_by(Persona.guild_id, Persona.name_key)
        if guild_id is not None:
            query = query.where(Persona.guild_id.in_((guild_id, GLOBAL_GUILD)))
        async with self.read() as session:
            return list(await session.scalars(query))

    async def persona_names(self, guild_id: int, prefix: str = "") -> list[str]:
        """Names for autocomplete: those containing `prefix`, guild ones first."""
        pattern = f"%{_name_key(prefix)}%"
        async with self.read() as session:
            rows = await session.scalars(
                select(Persona.name)
                .where(Persona.guild_id.in_((guild_id, GLOBAL_GUILD)), Persona.name_key.like(pattern))
                .order_by(Persona.guild_id.desc(), Persona.name_key)
                .limit(AUTOCOMPLETE_LIMIT)
            )
            return list(rows)

    async def delete_persona(self, guild_id: int, name: str) -> bool:
        """Delete a guild persona (built-ins cannot be deleted). True when one was deleted."""
        if guild_id == GLOBAL_GUILD:
            return False
        async with self.session() as session:
            result = await session.execute(
                delete(Persona).where(Persona.guild_id == guild_id, Persona.name_key == _name_key(name))
            )
        if result.rowcount > 0:
            self.forget(PERSONAS)
            self.forget(ACTIVE_STORIES)  # their persona_id is now NULL
            self.forget(CHANNEL_PERSONAS)  # channels bound to it lost it (ON DELETE CASCADE)
        return result.rowcount > 0
