"""SQL tables: guild settings, personas, channels, stories, turns, swipes, summaries, scene art,
and the memory layers (pinned facts, turn embeddings for recall, lorebooks); guilds the bot left.

The schema is owned by alembic (`migrations/`); these models are its
`target_metadata`, and a test proves the two agree.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations behave the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
GLOBAL_GUILD = 0  # guild_id of personas every guild can use (the built-ins)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class AuthorKind(enum.StrEnum):
    USER = "user"
    PERSONA = "persona"
    NARRATOR = "narrator"
    SYSTEM = "system"


class StoryStatus(enum.StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"


class PersonaScope(enum.StrEnum):
    BUILTIN = "builtin"
    GUILD = "guild"


class EmbeddingVector(TypeDecorator):
    """A float vector: pgvector's `vector` on PostgreSQL (searched in SQL), float32 bytes elsewhere
    (searched in the bot with numpy). Values are lists of floats either way."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            from pgvector.sqlalchemy import VECTOR  # the `postgres` extra installs it

            return dialect.type_descriptor(VECTOR())
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name == "postgresql":
            return value
        import numpy as np

        return np.asarray(value, dtype=np.float32).tobytes()

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        import numpy as np

        if dialect.name == "postgresql":
            return [float(x) for x in value]
        return np.frombuffer(value, dtype=np.float32).tolist()


HNSW_DIM = 384  # the offline embedding model's size (MiniLM); PostgreSQL's HNSW index covers this size


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings (native_enum=False): adding a value needs no ALTER TYPE.
    return Enum(cls, name=name, native_enum=False, length=16,
                values_callable=lambda e: [m.value for m in e])


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class GuildSettings(Timestamps, Base):
    __tablename__ = "guild_settings"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # Free-form settings (reply mode, scene-art cadence, cooldowns): the bot's
    # settings model validates them, so a new setting needs no migration.
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Persona(Timestamps, Base):
    __tablename__ = "personas"
    __table_args__ = (UniqueConstraint("guild_id", "name_key", name="uq_personas_guild_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    guild_id: Mapped[int] = mapped_column(BigInteger, index=True)  # GLOBAL_GUILD for built-ins
    scope: Mapped[PersonaScope] = mapped_column(_enum(PersonaScope, "persona_scope"))
    name: Mapped[str] = mapped_column(String(100))
    name_key: Mapped[str] = mapped_column(String(100))  # casefolded name, for lookups
    card: Mapped[dict[str, Any]]  # the full V3 card, unknown keys included
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary)
    avatar_mime: Mapped[str | None] = mapped_column(String(64))
    art_style: Mapped[str] = mapped_column(Text, default="")
    voice: Mapped[str] = mapped_column(String(100), default="")
    author_id: Mapped[int | None] = mapped_column(BigInteger)


class ChannelState(Timestamps, Base):
    __tablename__ = "channels"

    channel_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    guild_id: Mapped[int] = mapped_column(BigInteger, index=True)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    personas: Mapped[list[ChannelPersona]] = relationship(
        order_by="ChannelPersona.position", cascade="all, delete-orphan", lazy="raise"
    )


class ChannelPersona(Base):
    """The personas bound to a channel, in order (one today; group scenes later)."""

    __tablename__ = "channel_personas"

    channel_id: Mapped[int] = mapped_column(
        ForeignKey("channels.channel_id", ondelete="CASCADE"), primary_key=True
    )
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)


class Story(Timestamps, Base):
    __tablename__ = "stories"
    __table_args__ = (
        # At most one active story per channel, enforced by the database.
        Index(
            "uq_stories_active_channel", "channel_id", unique=True,
            sqlite_where=text("status = 'active'"), postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel_id: Mapped[int] = mapped_column(BigInteger, index=True)
    guild_id: Mapped[int] = mapped_column(BigInteger)
    persona_id: Mapped[int | None] = mapped_column(ForeignKey("personas.id", ondelete="SET NULL"))
    status: Mapped[StoryStatus] = mapped_column(_enum(StoryStatus, "story_status"), default=StoryStatus.ACTIVE)
    title: Mapped[str] = mapped_column(String(200), default="")
    # Counter for turn positions: `UPDATE ... SET turn_seq = turn_seq + 1 RETURNING`
    # is atomic on both databases, so concurrent turns never share a position.
    turn_seq: Mapped[int] = mapped_column(Integer, default=0)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The author's note (/story note), inserted `author_note_depth` messages from the end.
    author_note: Mapped[str] = mapped_column(Text, default="", server_default="")
    author_note_depth: Mapped[int] = mapped_column(Integer, default=4, server_default="4")
    # Lore's timed effects (sticky, cooldown) between prompts: {"book/uid": {...}}.
    lore_state: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")


class Turn(Timestamps, Base):
    __tablename__ = "turns"
    __table_args__ = (UniqueConstraint("story_id", "position", name="uq_turns_story_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    story_id: Mapped[int] = mapped_column(ForeignKey("stories.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    author_kind: Mapped[AuthorKind] = mapped_column(_enum(AuthorKind, "author_kind"))
    author_id: Mapped[int | None] = mapped_column(BigInteger)  # Discord user id, or None
    author_name: Mapped[str] = mapped_column(String(100), default="")
    persona_id: Mapped[int | None] = mapped_column(ForeignKey("personas.id", ondelete="SET NULL"))
    # The text the story keeps: for persona turns, the selected swipe's text
    # (denormalised so prompt building reads turns without a join).
    text: Mapped[str] = mapped_column(Text, default="")
    # [{kind, filename, url, content_type, size, transcript?, caption?}]
    attachments: Mapped[list[Any]] = mapped_column(default=list)
    selected_swipe: Mapped[int] = mapped_column(Integer, default=0)
    token_count: Mapped[int] = mapped_column(Integer, default=0)
    swipes: Mapped[list[Swipe]] = relationship(
        order_by="Swipe.index", cascade="all, delete-orphan", lazy="raise", passive_deletes=True
    )
    messages: Mapped[list[TurnMessage]] = relationship(
        order_by="TurnMessage.part", cascade="all, delete-orphan", lazy="raise", passive_deletes=True
    )


class TurnMessage(Base):
    """A Discord message that shows a turn (a long reply spans several).

    Its own table, keyed by message id, because edits, deletes and button
    presses arrive as a message id and must find their turn fast.
    """

    __tablename__ = "turn_messages"

    message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    part: Mapped[int] = mapped_column(Integer, default=0)  # order within the turn


class Swipe(Base):
    """One alternative text of a persona turn (regenerate adds one)."""

    __tablename__ = "swipes"
    __table_args__ = (UniqueConstraint("turn_id", "index", name="uq_swipes_turn_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text, default="")
    token_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Summary(Base):
    __tablename__ = "summaries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    story_id: Mapped[int] = mapped_column(ForeignKey("stories.id", ondelete="CASCADE"), index=True)
    through_position: Mapped[int] = mapped_column(Integer)  # the last turn position it covers
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SceneArt(Base):
    __tablename__ = "scene_art"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    story_id: Mapped[int] = mapped_column(ForeignKey("stories.id", ondelete="CASCADE"), index=True)
    turn_id: Mapped[int | None] = mapped_column(ForeignKey("turns.id", ondelete="SET NULL"))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int | None] = mapped_column(BigInteger)
    embedding: Mapped[list[Any] | None] = mapped_column(JSON)  # the prompt's embedding, for reuse
    image_url: Mapped[str | None] = mapped_column(Text)  # where it was posted (Discord CDN)
    image: Mapped[bytes | None] = mapped_column(LargeBinary)  # the PNG, when kept locally
    width: Mapped[int] = mapped_column(Integer, default=0)
    height: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PinnedFact(Base):
    """A fact always in the story's prompt (/memory add)."""

    __tablename__ = "pinned_facts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    story_id: Mapped[int] = mapped_column(ForeignKey("stories.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    author_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TurnEmbedding(Base):
    """A turn's embedding, for recall. Made in the background; deleted when the turn's text changes."""

    __tablename__ = "turn_embeddings"
    __table_args__ = (Index("ix_turn_embeddings_story_position", "story_id", "position"),)

    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True,
                                         autoincrement=False)
    story_id: Mapped[int] = mapped_column(ForeignKey("stories.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(100), default="")
    dim: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[list[Any]] = mapped_column(EmbeddingVector())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LorebookRecord(Timestamps, Base):
    """A standalone lorebook (/lore import): the guild's (story_id None) or one story's."""

    __tablename__ = "lorebooks"
    __table_args__ = (UniqueConstraint("guild_id", "scope_key", "name_key", name="uq_lorebooks_scope_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    guild_id: Mapped[int] = mapped_column(BigInteger, index=True)
    story_id: Mapped[int | None] = mapped_column(ForeignKey("stories.id", ondelete="CASCADE"), index=True)
    scope_key: Mapped[int] = mapped_column(BigInteger, default=0)  # story_id, or 0 for guild-wide (unique)
    name: Mapped[str] = mapped_column(String(100))
    name_key: Mapped[str] = mapped_column(String(100))
    book: Mapped[dict[str, Any]]  # the V3 lorebook, unknown keys kept


class GuildDeparture(Base):
    """A guild the bot left, and when: its data is deleted MASQUE_GUILD_RETENTION_DAYS later, unless the
    bot is added back first (bot/store/privacy.py)."""

    __tablename__ = "guild_departures"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    left_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def include_in_schema_compare(obj: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic's `include_object`: the HNSW index exists only on PostgreSQL, made by the migration
    (an expression index on a pgvector cast that the models cannot describe portably)."""
    return not (kind == "index" and name == "ix_turn_embeddings_hnsw")
