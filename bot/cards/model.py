"""Typed Tavern card model (V3 shape) that keeps every unknown key.

Every model allows extra fields: real cards carry keys no spec names
(SillyTavern's top-level `avatar`, `chat`, `fav`, tool-specific entry fields),
and a card must export exactly what it imported plus our edits.
Fields absent from the source stay absent on export (we dump with
``exclude_unset``); the fields V3 requires are filled in before validation so
they are always written.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Size limits (documented in the README). A card is a few KB of text and one
# avatar; anything far beyond these is a mistake or an attack.
MAX_CARD_BYTES = 16 * 1024 * 1024
MAX_NAME_CHARS = 100
MAX_TEXT_CHARS = 200_000
MAX_LOREBOOK_ENTRIES = 5_000
MAX_GREETINGS = 100

V3_SPEC = "chara_card_v3"
V3_VERSION = "3.0"
V2_SPEC = "chara_card_v2"
V2_VERSION = "2.0"
LOREBOOK_SPEC = "lorebook_v3"

# Fields V2 and V3 both require in `data`, with the value used when missing.
REQUIRED_DATA_DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "personality": "",
    "scenario": "",
    "first_mes": "",
    "mes_example": "",
    "creator_notes": "",
    "system_prompt": "",
    "post_history_instructions": "",
    "alternate_greetings": [],
    "tags": [],
    "creator": "",
    "character_version": "",
    "extensions": {},
}
# V3 adds these; a V2 export leaves them out.
V3_ONLY_DATA_FIELDS = (
    "group_only_greetings",
    "assets",
    "nickname",
    "creator_notes_multilingual",
    "source",
    "creation_date",
    "modification_date",
)
# The V1 fields SillyTavern mirrors at the top level of V2/V3 cards.
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")


class _Open(BaseModel):
    """Base: strict about known fields' types, keeps unknown ones."""

    model_config = ConfigDict(extra="allow", strict=False, validate_assignment=True)

    def dump(self) -> dict[str, Any]:
        """JSON-ready dict of what was set, unknown keys included."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


class LoreEntry(_Open):
    keys: list[str] = Field(default_factory=list)
    content: str = Field(default="", max_length=MAX_TEXT_CHARS)
    extensions: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    insertion_order: int | float = 0
    case_sensitive: bool | None = None
    use_regex: bool = False
    constant: bool | None = None
    name: str | None = None
    priority: int | float | None = None
    id: int | str | None = None
    comment: str | None = None
    selective: bool | None = None
    secondary_keys: list[str] | None = None
    position: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _required(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)  # never mutate the caller's data
            for key, default in (("keys", []), ("content", ""), ("extensions", {}),
                                 ("enabled", True), ("insertion_order", 0)):
                value.setdefault(key, default)
        return value


class Lorebook(_Open):
    name: str | None = None
    description: str | None = None
    scan_depth: int | None = None
    token_budget: int | None = None
    recursive_scanning: bool | None = None
    extensions: dict[str, Any] = Field(default_factory=dict)
    entries: list[LoreEntry] = Field(default_factory=list, max_length=MAX_LOREBOOK_ENTRIES)

    @model_validator(mode="before")
    @classmethod
    def _required(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)  # never mutate the caller's data
            value.setdefault("extensions", {})
            value.setdefault("entries", [])
        return value


class Asset(_Open):
    type: str
    uri: str
    name: str = ""
    ext: str = ""


class CardData(_Open):
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    description: str = Field(default="", max_length=MAX_TEXT_CHARS)
    personality: str = Field(default="", max_length=MAX_TEXT_CHARS)
    scenario: str = Field(default="", max_length=MAX_TEXT_CHARS)
    first_mes: str = Field(default="", max_length=MAX_TEXT_CHARS)
    mes_example: str = Field(default="", max_length=MAX_TEXT_CHARS)
    creator_notes: str = Field(default="", max_length=MAX_TEXT_CHARS)
    system_prompt: str = Field(default="", max_length=MAX_TEXT_CHARS)
    post_history_instructions: str = Field(default="", max_length=MAX_TEXT_CHARS)
    alternate_greetings: list[str] = Field(default_factory=list, max_length=MAX_GREETINGS)
    character_book: Lorebook | None = None
    tags: list[str] = Field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = Field(default_factory=dict)
    # V3 additions
    group_only_greetings: list[str] = Field(default_factory=list, max_length=MAX_GREETINGS)
    assets: list[Asset] | None = None
    nickname: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    creator_notes_multilingual: dict[str, str] | None = None
    source: list[str] | None = None
    creation_date: int | None = None
    modification_date: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _required(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)  # never mutate the caller's data
            for key, default in REQUIRED_DATA_DEFAULTS.items():
                if key != "name":
                    value.setdefault(key, default.copy() if hasattr(default, "copy") else default)
            value.setdefault("group_only_greetings", [])
        return value

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @property
    def masque(self) -> dict[str, Any]:
        """Our own extension block: art style, voice."""
        block = self.extensions.get("masque")
        return block if isinstance(block, dict) else {}


class Card(_Open):
    """A character card, normalised to V3. ``data`` holds everything that matters."""

    spec: str = V3_SPEC
    spec_version: str = V3_VERSION
    data: CardData

    @model_validator(mode="before")
    @classmethod
    def _required(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)  # never mutate the caller's data
            value["spec"] = V3_SPEC
            value["spec_version"] = V3_VERSION
        return value

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def display_name(self) -> str:
        """What `{{char}}` expands to: the nickname when set (V3)."""
        return self.data.nickname or self.data.name

    @property
    def art_style(self) -> str:
        return str(self.data.masque.get("art_style", ""))

    @property
    def voice(self) -> str:
        return str(self.data.masque.get("voice", ""))

    def greetings(self) -> list[str]:
        """The first message followed by the alternate greetings (the swipes)."""
        return [g for g in [self.data.first_mes, *self.data.alternate_greetings] if g.strip()]

    def to_v3(self) -> dict[str, Any]:
        """The card as V3 JSON, unknown keys kept; V1 mirrors refreshed from `data`."""
        out = self.dump()
        data = out["data"]
        for key in V1_FIELDS:
            if key in out:  # the source mirrored V1 fields: keep the mirror in step
                out[key] = data.get(key, "")
        return out

    def to_v2(self) -> dict[str, Any]:
        """The card as V2 JSON (for the `chara` PNG chunk): V3-only fields dropped."""
        out = self.to_v3()
        out["spec"], out["spec_version"] = V2_SPEC, V2_VERSION
        for key in V3_ONLY_DATA_FIELDS:
            out["data"].pop(key, None)
        book = out["data"].get("character_book")
        if isinstance(book, dict):
            for entry in book.get("entries", []):
                entry.pop("use_regex", None)
                entry.pop("case_sensitive", None)
        return out
