"""The only place with SQL: personas, story state, settings (SQLAlchemy 2, async).

Open one `Store` per process, call `await store.upgrade()` at start (alembic
migrations, never create_all), and use its methods; each runs in its own
transaction and returns detached rows (`expire_on_commit=False`).
"""

from bot.store.db import Database, default_database_url
from bot.store.guilds import GuildRepo
from bot.store.memory import MAX_FACT_CHARS, MAX_FACTS
from bot.store.models import (
    GLOBAL_GUILD,
    AuthorKind,
    LorebookRecord,
    Persona,
    PersonaScope,
    PinnedFact,
    SceneArt,
    Story,
    StoryStatus,
    Summary,
    Swipe,
    Turn,
)
from bot.store.notify import DatabaseInUse
from bot.store.personas import PersonaExists, PersonaRepo
from bot.store.privacy import GuildErased, PrivacyRepo, UserErased
from bot.store.stories import DuplicateMessage, NewTurn, SceneKey, StoryRepo


class Store(PersonaRepo, StoryRepo, PrivacyRepo, GuildRepo, Database):
    """Everything the bot keeps, behind one object."""


__all__ = [
    "GLOBAL_GUILD", "MAX_FACTS", "MAX_FACT_CHARS", "AuthorKind", "Database", "DatabaseInUse", "DuplicateMessage",
    "GuildErased",
    "LorebookRecord",
    "NewTurn",
    "Persona", "PersonaExists", "PersonaScope", "PinnedFact",
    "SceneArt", "SceneKey", "Store", "Story", "StoryStatus", "Summary", "Swipe", "Turn", "UserErased",
    "default_database_url",
]
