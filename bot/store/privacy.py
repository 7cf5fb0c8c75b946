"""Forgetting a person or a server, and exporting what is kept about a person.

The one home of deletion: /masque forget-me and forget-server, the purge of guilds the bot left, and
`masque data` all call these methods. Each deletion is one transaction of bulk SQL statements; the
database's ON DELETE CASCADE removes what hangs off a turn or a story (swipes, Discord message links,
recall embeddings, summaries, scene art, pinned facts, story lorebooks).

A person's data, for `erase_user` (in one guild, or everywhere):
- their turns (author_kind user, author_id them): typed, with attachments (metadata: the files stay on
  Discord's CDN, under Discord's rules) and spoken in voice channels (a transcript is a turn), with
  everything that cascades from a turn, and scene art made for one of those turns;
- the facts they pinned;
- the summaries of every story they spoke in: a summary retells all speakers together and cannot be
  edited around one of them, so it is deleted and the memory worker writes it again from the turns left;
- personas they authored stay (a guild's shared content), with `author_id` cleared.
Persona replies that answered them stay: they are the bot's text and part of the others' story.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, func, select, update

from bot.store.memory import STORY_EXTRAS, MemoryRepo
from bot.store.models import (
    GLOBAL_GUILD,
    AuthorKind,
    ChannelState,
    GuildDeparture,
    GuildSettings,
    LorebookRecord,
    Persona,
    PinnedFact,
    SceneArt,
    Story,
    Summary,
    Turn,
)
from bot.store.notify import ALL
from bot.store.personas import PERSONAS


@dataclass(frozen=True)
class UserErased:
    """What `erase_user` deleted (personas: how many lost their author link)."""

    turns: int = 0
    attachments: int = 0
    facts: int = 0
    summaries: int = 0
    scene_art: int = 0
    personas_unlinked: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class GuildErased:
    """What `erase_guild` deleted."""

    stories: int = 0
    turns: int = 0
    personas: int = 0
    channels: int = 0
    lorebooks: int = 0
    settings: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _aware(when: datetime) -> datetime:
    # SQLite stores no offset: every time written or compared here is UTC.
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class PrivacyRepo(MemoryRepo):
    # ------------------------------------------------------------ a person

    async def count_user_turns(self, user_id: int, guild_id: int | None = None) -> int:
        """How many turns the user has in `guild_id` (everywhere when None)."""
        async with self.read() as session:
            return await session.scalar(select(func.count()).where(_their_turns(user_id, guild_id))) or 0

    async def erase_user(self, user_id: int, guild_id: int | None = None) -> UserErased:
        """Delete the user's data in `guild_id`, or everywhere when None (see the module's docstring)."""
        stories = _stories(guild_id)
        theirs = _their_turns(user_id, guild_id)
        facts = and_(PinnedFact.author_id == user_id, PinnedFact.story_id.in_(stories))
        authored = Persona.author_id == user_id
        if guild_id is not None:
            authored = and_(authored, Persona.guild_id == guild_id)
        async with self.session() as session:
            turns, attachments = (await session.execute(
                select(func.count(), func.coalesce(func.sum(func.json_array_length(Turn.attachments)), 0))
                .where(theirs))).one()
            touched = list(await session.scalars(select(Turn.story_id).where(theirs).distinct()))
            summaries = await session.execute(
                delete(Summary).where(Summary.story_id.in_(select(Turn.story_id).where(theirs))))
            art = await session.execute(delete(SceneArt).where(SceneArt.turn_id.in_(select(Turn.id).where(theirs))))
            await session.execute(delete(Turn).where(theirs))
            pinned = await session.execute(delete(PinnedFact).where(facts))
            personas = await session.execute(update(Persona).where(authored).values(author_id=None))
        for story_id in touched:
            self.forget_recall(story_id)
        self.forget(PERSONAS)
        self.forget(STORY_EXTRAS)  # their pinned facts
        return UserErased(turns=turns, attachments=int(attachments), facts=pinned.rowcount or 0,
                          summaries=summaries.rowcount or 0, scene_art=art.rowcount or 0,
                          personas_unlinked=personas.rowcount or 0)

    async def export_user(self, user_id: int) -> dict[str, Any]:
        """Everything kept about the user, in every guild, as JSON-ready data."""
        async with self.read() as session:
            rows = (await session.execute(
                select(Turn, Story.guild_id, Story.channel_id, Story.title).join(Story, Story.id == Turn.story_id)
                .where(Turn.author_kind == AuthorKind.USER, Turn.author_id == user_id)
                .order_by(Story.guild_id, Turn.story_id, Turn.position))).all()
            facts = (await session.execute(
                select(PinnedFact, Story.guild_id).join(Story, Story.id == PinnedFact.story_id)
                .where(PinnedFact.author_id == user_id).order_by(PinnedFact.id))).all()
            personas = (await session.execute(  # not the avatars
                select(Persona.id, Persona.guild_id, Persona.name).where(Persona.author_id == user_id)
                .order_by(Persona.id))).all()
        return {
            "user_id": user_id,
            "exported_at": datetime.now(UTC).isoformat(),
            "guilds": sorted({r.guild_id for r in rows} | {f.guild_id for f in facts} | {p.guild_id for p in personas}),
            "turns": [{"guild_id": guild, "channel_id": channel, "story_id": t.story_id, "story_title": title,
                       "position": t.position, "created_at": _iso(t.created_at), "author_name": t.author_name,
                       "text": t.text, "attachments": t.attachments} for t, guild, channel, title in rows],
            "pinned_facts": [{"guild_id": guild, "story_id": f.story_id, "text": f.text,
                              "created_at": _iso(f.created_at)} for f, guild in facts],
            "personas_authored": [{"guild_id": p.guild_id, "id": p.id, "name": p.name} for p in personas],
        }

    # ------------------------------------------------------------ a server

    async def erase_guild(self, guild_id: int) -> GuildErased:
        """Delete everything of a guild: stories (with their turns, memory and art), channels, its
        personas, lorebooks, settings and its departure record."""
        if guild_id == GLOBAL_GUILD:
            raise ValueError("guild 0 holds the built-in personas, not a server's data")
        stories = select(Story.id).where(Story.guild_id == guild_id)
        async with self.session() as session:
            story_ids = list(await session.scalars(stories))
            turns = await session.scalar(select(func.count()).where(Turn.story_id.in_(stories))) or 0
            await session.execute(delete(Story).where(Story.guild_id == guild_id))
            counts = {name: (await session.execute(delete(model).where(model.guild_id == guild_id))).rowcount or 0
                      for name, model in (("lorebooks", LorebookRecord), ("channels", ChannelState),
                                          ("personas", Persona), ("settings", GuildSettings))}
            await session.execute(delete(GuildDeparture).where(GuildDeparture.guild_id == guild_id))
        for story_id in story_ids:
            self.forget_recall(story_id)
        self.forget(ALL)  # its stories, channels, personas, lore and settings, in every process
        return GuildErased(stories=len(story_ids), turns=turns, **counts)

    # ------------------------------------------------------------ guilds the bot left

    async def guild_left(self, guild_id: int, when: datetime) -> None:
        """Record that the bot left the guild at `when` (kept: the first leave counts)."""
        async with self.session() as session:
            if await session.get(GuildDeparture, guild_id) is None:
                session.add(GuildDeparture(guild_id=guild_id, left_at=_aware(when)))

    async def guilds_back(self, guild_ids: list[int]) -> int:
        """The bot is in these guilds (again): their data stays. Returns how many had left."""
        if not guild_ids:
            return 0
        async with self.session() as session:
            result = await session.execute(delete(GuildDeparture).where(GuildDeparture.guild_id.in_(guild_ids)))
        return result.rowcount or 0

    async def guild_left_at(self, guild_id: int) -> datetime | None:
        async with self.read() as session:
            when = await session.scalar(select(GuildDeparture.left_at).where(GuildDeparture.guild_id == guild_id))
        return None if when is None else _aware(when)

    async def purge_departed_guilds(self, left_before: datetime) -> list[int]:
        """Erase every guild the bot left before `left_before`; returns their ids."""
        async with self.read() as session:
            due = list(await session.scalars(
                select(GuildDeparture.guild_id).where(GuildDeparture.left_at < _aware(left_before))))
        for guild_id in due:
            await self.erase_guild(guild_id)
        return due


def _stories(guild_id: int | None):
    query = select(Story.id)
    return query if guild_id is None else query.where(Story.guild_id == guild_id)


def _their_turns(user_id: int, guild_id: int | None):
    return and_(Turn.author_kind == AuthorKind.USER, Turn.author_id == user_id, Turn.story_id.in_(_stories(guild_id)))


def _iso(when: datetime | None) -> str | None:
    return None if when is None else _aware(when).isoformat()
