"""Tavern character cards (V1/V2/V3) and lorebooks: model, parser, macros."""

from bot.cards.macros import expand
from bot.cards.model import (
    MAX_CARD_BYTES,
    MAX_LOREBOOK_ENTRIES,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    Card,
    CardData,
    Lorebook,
    LoreEntry,
)
from bot.cards.parser import (
    CardError,
    ParsedCard,
    card_from_json,
    load_card,
    load_lorebook,
    parse_card,
    parse_lorebook,
    to_charx,
    to_json,
    to_png_card,
    write_card,
)

__all__ = [
    "MAX_CARD_BYTES", "MAX_LOREBOOK_ENTRIES", "MAX_NAME_CHARS", "MAX_TEXT_CHARS",
    "Card", "CardData", "CardError", "LoreEntry", "Lorebook", "ParsedCard",
    "card_from_json", "expand", "load_card", "load_lorebook", "parse_card", "parse_lorebook",
    "to_charx", "to_json", "to_png_card", "write_card",
]
