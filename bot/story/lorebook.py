"""Lorebook triggering: which entries of a card's character book enter the prompt.

An entry is in when it is enabled and either constant or one of its keys
appears in the scanned text (the last few turns); a selective entry also needs
one of its secondary keys. Keys match case-insensitively unless the entry says
otherwise, as whole words, or as regular expressions when `use_regex` is set.
When the chosen entries exceed the token budget, lower-priority ones go first;
the rest are returned in insertion order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bot.cards import Lorebook, LoreEntry
from bot.story.tokens import estimate_tokens

DEFAULT_SCAN_DEPTH = 4  # turns scanned for keys when the book does not say
DEFAULT_LORE_BUDGET = 512  # tokens, when the book does not say


def triggered_entries(book: Lorebook | None, scanned: Sequence[str], budget: int | None = None) -> list[LoreEntry]:
    """The entries `scanned` (recent texts, oldest first) triggers, within the token budget."""
    if book is None:
        return []
    depth = book.scan_depth if book.scan_depth and book.scan_depth > 0 else DEFAULT_SCAN_DEPTH
    text = "\n".join(scanned[-depth:])
    hits = [e for e in book.entries if e.enabled and e.content.strip() and _matches(e, text)]
    limit = budget if budget is not None else (book.token_budget or DEFAULT_LORE_BUDGET)
    kept = _within_budget(hits, limit)
    return sorted(kept, key=lambda e: e.insertion_order)


def _matches(entry: LoreEntry, text: str) -> bool:
    if entry.constant:
        return True
    if not _any_key(entry, entry.keys, text):
        return False
    if entry.selective and entry.secondary_keys:
        return _any_key(entry, entry.secondary_keys, text)
    return True


def _any_key(entry: LoreEntry, keys: Sequence[str], text: str) -> bool:
    flags = 0 if entry.case_sensitive else re.IGNORECASE
    for key in keys:
        if not key.strip():
            continue
        pattern = key if entry.use_regex else rf"(?<!\w){re.escape(key.strip())}(?!\w)"
        try:
            if re.search(pattern, text, flags):
                return True
        except re.error:
            continue  # a broken regex in someone's card must not break the story
    return False


def _within_budget(entries: list[LoreEntry], budget: int) -> list[LoreEntry]:
    # Constant entries first, then by priority (higher kept first), then insertion order.
    ranked = sorted(entries, key=lambda e: (not e.constant, -(e.priority or 0), e.insertion_order))
    kept, used = [], 0
    for entry in ranked:
        cost = estimate_tokens(entry.content)
        if used + cost <= budget:
            kept.append(entry)
            used += cost
    return kept
