"""The built-in personas: ordinary cards shipped in `personas/` (bot.builtin_personas)."""

from __future__ import annotations

from importlib import resources

from bot.cards import ParsedCard, parse_card

_CARD_SUFFIXES = (".json", ".png", ".charx")


def builtin_personas() -> list[ParsedCard]:
    """Parse every card in the built-in folder, sorted by file name."""
    folder = resources.files("bot.builtin_personas")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(_CARD_SUFFIXES)), key=lambda f: f.name)
    return [parse_card(f.read_bytes(), f.name) for f in files]
