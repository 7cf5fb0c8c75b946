"""The memory layers of a prompt, as pure text: their budget shares and how each one reads.

A prompt's budget is split into caps, cheapest memory first; what a layer does
not use goes to the recent turns (see the README, "Memory"):

  card, scenario, post-history instructions   always (they are the character)
  pinned facts                                 FACTS_SHARE (more is refused when pinned)
  triggered lore                               LORE_SHARE (or the book's own smaller budget)
  rolling summary                              SUMMARY_SHARE
  recalled older turns                         RECALL_SHARE (reserved: the window is chosen first)
  example dialogue                             EXAMPLES_SHARE, when it still fits
  recent turns                                 everything left; the newest turn always
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

FACTS_SHARE = 0.15
LORE_SHARE = 0.25  # SillyTavern's default World Info budget is 25% of the context
SUMMARY_SHARE = 0.15
RECALL_SHARE = 0.10
EXAMPLES_SHARE = 0.25
DEFAULT_NOTE_DEPTH = 4  # SillyTavern's default author's note depth
# Recalled older turns go this many messages from the end, not into the system text: they change
# with every new message, and anything that changes early in the prompt makes a server's prefix
# cache (our engine's, vLLM's, llama.cpp's) re-read everything after it. There the system text
# and the older history stay the same from one turn to the next.
RECALL_DEPTH = 2
RECALL_CHARS = 600  # a recalled turn is quoted up to this long


@dataclass
class DepthNote:
    """Text inserted `depth` messages from the end of the history (0: after the last one)."""

    depth: int
    role: str  # "system" | "user" | "assistant"
    text: str


@dataclass
class Memory:
    """What the memory layers bring to one prompt (all optional)."""

    summary: str = ""
    facts: Sequence[str] = ()
    recalled: Sequence[str] = ()  # older turns as "Name: text", oldest first
    note: str = ""  # the author's note
    note_depth: int = DEFAULT_NOTE_DEPTH
    lore_timed: dict[str, dict] = field(default_factory=dict)  # lore's sticky/cooldown state, as stored


def cap(text: str, limit: int, count: Callable[[str], int], keep: str = "end") -> str:
    """`text` cut to at most `limit` tokens at a line or word boundary; `keep` says which end survives."""
    if count(text) <= limit:
        return text
    if limit <= 0:
        return ""
    ratio = limit / max(count(text), 1)
    size = max(int(len(text) * ratio * 0.95), 0)
    cut = text[-size:] if keep == "end" else text[:size]
    boundary = cut.find(" ") if keep == "end" else cut.rfind(" ")
    if 0 < boundary < len(cut) - 1:
        cut = cut[boundary + 1:] if keep == "end" else cut[:boundary]
    return ("…" + cut) if keep == "end" else (cut + "…")


def facts_block(facts: Sequence[str], limit: int, count: Callable[[str], int]) -> str:
    """Pinned facts as a list, newest dropped first when over the cap (the oldest are the story's base)."""
    lines: list[str] = []
    for fact in facts:
        line = f"- {' '.join(fact.split())}"
        if count("\n".join([*lines, line])) > limit:
            break
        lines.append(line)
    return "Facts to remember:\n" + "\n".join(lines) if lines else ""


def summary_block(summary: str, limit: int, count: Callable[[str], int]) -> str:
    if not summary.strip():
        return ""
    return f"The story so far: {cap(summary.strip(), limit, count, keep='end')}"


def recall_block(recalled: Sequence[str], limit: int, count: Callable[[str], int]) -> str:
    """Older turns that bear on the new message, quoted in story order, within the cap."""
    lines: list[str] = []
    for text in recalled:
        line = cap(" ".join(text.split()), RECALL_CHARS, len, keep="start")
        if count("\n".join([*lines, line])) > limit:
            break
        lines.append(line)
    return "Earlier in the story:\n" + "\n".join(lines) if lines else ""


def note_text(note: str, top: Sequence[str], bottom: Sequence[str]) -> str:
    """The author's note with the lore SillyTavern places at its top and bottom."""
    return "\n".join(p for p in [*top, note.strip(), *bottom] if p and p.strip())


def insert_at_depth(history: list[dict], notes: Sequence[DepthNote]) -> list[dict]:
    """History messages with each note inserted `depth` messages from the end.

    A system-role note becomes a bracketed user-side message: strict chat templates
    (Mistral, Gemma) refuse a system message inside the conversation.
    """
    out = list(history)
    # Deepest first, so inserting one does not shift where a shallower one goes.
    for note in sorted(notes, key=lambda n: -n.depth):
        depth = min(max(note.depth, 0), len(out))
        role = note.role if note.role in ("user", "assistant") else "user"
        text = note.text if role != "user" or note.role == "user" else f"[{note.text}]"
        out.insert(len(out) - depth, {"role": role, "content": text})
    return out
