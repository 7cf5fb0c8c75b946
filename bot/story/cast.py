"""Group scenes: a story's cast, who speaks next, and what each member knows.

Pure functions of the cast, the message and the recent turns, so Discord, the console and the
tests share them. Who speaks after a human message (`choose_speaker`):
1 the persona the message addresses: the author of the message it replies to, else the first cast
  member it names (full name, first name or nickname);
2 otherwise the story's strategy: natural (as SillyTavern's: each member but the one who just spoke
  rolls its card's talkativeness, in random order; the first to pass speaks; if none does, a random
  one of them), round robin (the next in cast order after the last speaker), random (never the last
  speaker), or manual (nobody: `/story next` chooses).
After a persona speaks, another may answer it (`answered_by`): the cast member its reply names,
never itself, within the story's limit of persona replies in a row.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_TALKATIVENESS = 0.5  # SillyTavern's default
JOIN_TEXT = "{name} joins the scene."
LEAVE_TEXT = "{name} leaves the scene."
SCENE_MEMBER_CHARS = 240  # how much of another member's description the speaker reads
MIN_ALIAS_CHARS = 3  # a first name shorter than this ("Al") matches too much ordinary text


class Strategy(enum.StrEnum):
    NATURAL = "natural"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    MANUAL = "manual"


@dataclass(frozen=True)
class Member:
    """One persona of the cast, as the choice sees it."""

    persona_id: int
    name: str  # the display name the persona speaks under
    aliases: tuple[str, ...] = ()  # other names that address it (its card name, its first name)
    talkativeness: float = DEFAULT_TALKATIVENESS
    description: str = ""  # a short description, for the other members' prompts

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n in (self.name, *self.aliases) if n))


def member_aliases(name: str, card_name: str, nickname: str | None) -> tuple[str, ...]:
    """The names that address a persona besides its display name: card name, nickname, first names."""
    names = [card_name, nickname or ""]
    for full in (name, card_name, nickname or ""):
        first = full.split()[0] if full.split() else ""
        if len(first) >= MIN_ALIAS_CHARS and first.lower() not in _TITLES:
            names.append(first)
        elif len(full.split()) > 1:  # "Captain Isolde Varga" is addressed as "Isolde"
            second = full.split()[1]
            if len(second) >= MIN_ALIAS_CHARS:
                names.append(second)
    return tuple(n for n in dict.fromkeys(names) if n and n != name)


_TITLES = {"captain", "old", "lady", "lord", "sir", "doctor", "dr.", "mr.", "mrs.", "ms.", "miss", "the", "professor"}


def talkativeness(extensions: dict) -> float:
    """A card's talkativeness (SillyTavern keeps it as a string in `extensions`), 0..1."""
    try:
        value = float(extensions.get("talkativeness", DEFAULT_TALKATIVENESS))
    except (TypeError, ValueError):
        return DEFAULT_TALKATIVENESS
    return min(max(value, 0.0), 1.0)


def named_in(text: str, cast: Sequence[Member]) -> list[Member]:
    """Cast members named in `text`, in the order they are first named."""
    found: list[tuple[int, Member]] = []
    for member in cast:
        positions = [m.start() for name in member.names()
                     for m in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE)]
        if positions:
            found.append((min(positions), member))
    return [member for _, member in sorted(found, key=lambda pair: pair[0])]


def choose_speaker(cast: Sequence[Member], text: str, *, reply_to: int | None = None,
                   last_speaker: int | None = None, strategy: Strategy = Strategy.NATURAL,
                   rng: random.Random | None = None) -> Member | None:
    """Who answers a human message (see the module docstring); None when nobody should (manual)."""
    if not cast:
        return None
    if len(cast) == 1:
        return cast[0]
    addressed = next((m for m in cast if m.persona_id == reply_to), None)
    if addressed is None:
        addressed = next(iter(named_in(text, cast)), None)
    if addressed is not None:
        return addressed
    rng = rng or random.Random()
    others = [m for m in cast if m.persona_id != last_speaker] or list(cast)
    if strategy == Strategy.MANUAL:
        return None
    if strategy == Strategy.ROUND_ROBIN:
        ids = [m.persona_id for m in cast]
        after = ids.index(last_speaker) + 1 if last_speaker in ids else 0
        return cast[after % len(cast)]
    if strategy == Strategy.RANDOM:
        return rng.choice(others)
    shuffled = others[:]
    rng.shuffle(shuffled)
    return next((m for m in shuffled if rng.random() < m.talkativeness), None) or rng.choice(others)


def answered_by(cast: Sequence[Member], reply: str, speaker: int, in_a_row: int, limit: int) -> Member | None:
    """The cast member a persona's reply addresses, who answers next, while fewer than `limit` persona
    replies came in a row (`in_a_row` counts the one just made); never the speaker itself."""
    if in_a_row >= limit:
        return None
    return next((m for m in named_in(reply, cast) if m.persona_id != speaker), None)


def present_from(turns: Sequence, persona_id: int, name: str) -> int:
    """The index of the first turn `persona_id` was present for: after its latest "joins the scene"
    note (a persona that never joined was there from the start)."""
    joined = JOIN_TEXT.format(name=name)
    for index in range(len(turns) - 1, -1, -1):
        turn = turns[index]
        same = getattr(turn, "persona_id", persona_id) == persona_id
        if turn.author_kind == "system" and turn.text == joined and same:
            return index
    return 0


def scene_members(cast: Sequence[Member], speaker: int) -> str:
    """The rest of the cast as the speaker's prompt names them, with short descriptions."""
    lines = []
    for member in cast:
        if member.persona_id == speaker:
            continue
        about = " ".join(member.description.split())
        if len(about) > SCENE_MEMBER_CHARS:
            about = about[:SCENE_MEMBER_CHARS].rsplit(" ", 1)[0] + "…"
        lines.append(f"- {member.name}" + (f": {about}" if about else ""))
    return "Also in this scene (played by others; never write their lines):\n" + "\n".join(lines) if lines else ""


def group_nudge(speaker: str, others: Sequence[str]) -> str:
    """The last instruction of a group prompt (as SillyTavern's group nudge)."""
    names = ", ".join(others)
    return f"[Write the next reply only as {speaker}. Do not write for {names}.]" if names else ""
