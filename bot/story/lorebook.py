"""Lore activation as SillyTavern's World Info does it, so a book behaves here as it did there.

Behaviour follows `public/scripts/world-info.js` (checkWorldInfo and its helpers; read at commit
ba6f7b7, plus `ignore_budget` from later releases). One call is one scan:
  1 the books' entries in scan order: book by book (the card's own book first, as SillyTavern's
    default "character lore first"), each by insertion order, highest first;
  2 the timed effects carried over from the previous turn (sticky, cooldown, delay);
  3 passes: each entry's keys are matched against the newest messages (and, on recursion passes,
    the content of entries already active); the candidates go through inclusion groups, probability
    and the token budget; entries that came in feed the next pass, until a pass adds nothing, the
    budget is spent, or `max_recursion` passes have run;
  4 the hits per position, lowest order first (higher order sits closer to the end).
An entry's SillyTavern fields (in `entry.extensions`, the snake_case form SillyTavern writes when it
embeds a book in a card) are read by `bot.story.lore_entries`. Where SillyTavern has a global setting
its default is used, and the book's fields (scan_depth, token_budget, recursive_scanning, extensions)
may override it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.cards import Lorebook, LoreEntry
from bot.story.lore_entries import (
    AND_ALL,
    AND_ANY,
    DEFAULT_SCAN_DEPTH,
    NOT_ALL,
    NOT_ANY,
    POSITIONS,
    ROLES,
    Entry,
    as_flag,
    prepare,
)
from bot.story.tokens import estimate_tokens

_RNG = random.Random()  # lore's probability rolls when no rng is given (seeding one per prompt cost more than the scan)

DEFAULT_LORE_BUDGET = 1024  # tokens: SillyTavern's 25% of a 4k window, when the caller has no better figure
DEFAULT_MAX_RECURSION = 0  # SillyTavern's max recursion steps: 0 = until nothing new activates
MAX_SCAN_DEPTH = 1000  # SillyTavern's ceiling on any scan depth
MAX_PASSES = 64  # our guard for "unlimited": a pathological book must not stall the reply path


@dataclass(frozen=True)
class LoreHit:
    content: str
    position: str  # one of POSITIONS
    depth: int  # for at_depth
    role: str  # one of ROLES, for at_depth
    order: float  # higher order = closer to the end within a position
    book: str
    uid: str  # entry.id, else its index in the book


@dataclass
class LoreResult:
    hits: list[LoreHit]  # in insertion order per position
    timed: dict[str, dict]  # the timed-effect state to store for the next turn

    def at(self, position: str) -> list[str]:
        return [h.content for h in self.hits if h.position == position]


# ---------------------------------------------------------------- public API


def activate(books: Sequence[Lorebook], history: Sequence[str], *, turn: int, timed: Mapping[str, dict] | None = None,
             budget: int = DEFAULT_LORE_BUDGET, count_tokens: Callable[[str], int] = estimate_tokens,
             rng: random.Random | None = None, max_recursion: int = DEFAULT_MAX_RECURSION,
             macros: Callable[[str], str] | None = None) -> LoreResult:
    """The lore `history` activates.

    history: the chat messages as prompt text ("Name: text"), oldest first, the new message last.
    turn: the story's turn counter; it plays the part of SillyTavern's chat length, so sticky,
      cooldown and delay count in the same unit. timed: the state the previous call returned.
    max_recursion: SillyTavern's "max recursion steps", the first scan included (1 = no recursion).
    macros: expands {{char}}/{{user}} in keys and content, as SillyTavern does before matching.
    """
    entries = prepare(books, macros)
    clock = _Timed(timed or {}, entries, turn)
    scan = _Scan(entries, _Buffer(history), clock, rng or _RNG, count_tokens,
                 _budget(books, budget), max_recursion)
    active = _placed(scan.run())
    hits = [LoreHit(e.content, POSITIONS[e.position], e.depth, e.role, e.order, e.book, e.uid)
            for e in active if e.content and e.position is not None and e.position < len(POSITIONS)]
    return LoreResult(hits, clock.save(active))


def book_problems(book: Lorebook) -> list[str]:
    """What in an accepted book will not work as its author meant: bad regexes, wrong field types."""
    problems = [f"book: {name} {book.extensions[name]!r} is not true or false; ignored"
                for name in ("case_sensitive", "match_whole_words", "use_group_scoring")
                if book.extensions.get(name) is not None and as_flag(book.extensions[name]) is None]
    prepare([book], None, problems)
    return problems


def triggered_entries(book: Lorebook | None, scanned: Sequence[str], budget: int | None = None) -> list[LoreEntry]:
    """The older interface: one book, no timed effects; the active entries in insertion order."""
    if book is None:
        return []
    entries = prepare([book], None)
    scan = _Scan(entries, _Buffer(scanned), _Timed({}, entries, 0), _RNG, estimate_tokens,
                 _budget([book], DEFAULT_LORE_BUDGET if budget is None else budget), DEFAULT_MAX_RECURSION)
    return [e.source for e in _placed(scan.run())]


# ---------------------------------------------------------------- the scan


class _Buffer:
    """The text keys are matched against: the newest messages first, then what recursion added."""

    def __init__(self, history: Sequence[str]):
        self.messages = [m.strip() for m in reversed(history[-MAX_SCAN_DEPTH:])]
        self.recursed: list[str] = []
        self._cache: dict[int, tuple[str, str]] = {}

    def add(self, text: str) -> None:
        self.recursed.append(text)
        self._cache.clear()

    def text(self, depth: int) -> tuple[str, str]:
        """The text for a scan depth, as it is and lower-cased."""
        if depth <= 0:  # SillyTavern: a depth of 0 scans nothing, recursion included
            return "", ""
        if depth not in self._cache:
            # \x01 marks each message start, as SillyTavern's buffer does (regex keys may rely on it).
            text = "\x01" + "\n\x01".join([*self.messages[:min(depth, MAX_SCAN_DEPTH)], *self.recursed])
            self._cache[depth] = text, text.lower()
        return self._cache[depth]


class _Scan:
    def __init__(self, entries: list[Entry], buffer: _Buffer, clock: _Timed, rng: random.Random,
                 count: Callable[[str], int], budget: int, max_steps: int):
        self.entries, self.buffer, self.clock, self.rng = entries, buffer, clock, rng
        self.count, self.budget, self.max_steps = count, budget, max_steps
        self.active: list[Entry] = []
        self.done: set[Entry] = set()  # active, or failed their probability roll this scan
        self.used = 0

    def run(self) -> list[Entry]:
        levels = sorted({e.delay_level for e in self.entries if e.delay_level})
        level = levels.pop(0) if levels else 0
        recursion, passes = False, 0
        while passes < min(self.max_steps or MAX_PASSES, MAX_PASSES):
            passes += 1
            found = [e for e in self.entries if self._eligible(e, recursion, level)]
            found.sort(key=lambda e: (not self.clock.is_sticky(e), e.rank))  # sticky entries claim budget first
            admitted, overflow = self._admit(self._groups(found))
            feeders = [e for e in admitted if not e.prevent_recursion]
            if overflow:  # SillyTavern stops recursing once the budget is spent
                break
            if not feeders:
                if not levels:
                    break
                level = levels.pop(0)  # open the next "delay until recursion" level
            text = "\n".join(e.content for e in feeders if e.content)
            if text:
                self.buffer.add(text)
            recursion = True
        return self.active

    def _eligible(self, e: Entry, recursion: bool, level: int) -> bool:
        if e in self.done or not e.enabled or self.clock.is_delayed(e):
            return False
        sticky = self.clock.is_sticky(e)
        if not sticky:
            if self.clock.is_cooling(e):
                return False
            if e.delay_level and (not recursion or e.delay_level > level):
                return False
            if recursion and e.exclude_recursion:
                return False
        if e.decorator is not None:
            return e.decorator
        if e.constant or sticky:
            return True
        return self._matches(e)

    def _matches(self, e: Entry) -> bool:
        text, lower = self.buffer.text(e.scan_depth)
        if not any(k is not None and k.found(text, lower) for k in e.keys):
            return False
        if not (e.selective and e.secondary):
            return True
        found = [k is not None and k.found(text, lower) for k in e.secondary]
        return {AND_ANY: any(found), NOT_ALL: not all(found), NOT_ANY: not any(found),
                AND_ALL: all(found)}.get(e.logic, False)

    def _score(self, e: Entry) -> int:
        """How many keys matched: group scoring keeps the best-matching members."""
        text, lower = self.buffer.text(e.scan_depth)
        primary = sum(k is not None and k.found(text, lower) for k in e.keys)
        secondary = sum(k is not None and k.found(text, lower) for k in e.secondary)
        if not e.keys:
            return 0
        if e.secondary and (e.logic == AND_ANY or (e.logic == AND_ALL and secondary == len(e.secondary))):
            return primary + secondary
        return primary

    def _groups(self, found: list[Entry]) -> list[Entry]:
        """One winner per inclusion group: sticky members, else best score, else override, else a weighted roll."""
        groups: dict[str, list[Entry]] = {}
        for e in found:
            for name in e.groups:
                groups.setdefault(name, []).append(e)
        out: set[Entry] = set()
        for name, members in groups.items():
            sticky = [m for m in members if self.clock.is_sticky(m)]
            if sticky:
                out.update(m for m in members if m not in sticky)
                continue
            if any(name in a.groups for a in self.active):  # the group already has its winner
                out.update(members)
                continue
            if any(m.group_scoring for m in members):
                scores = [self._score(m) for m in members]
                out.update(m for m, s in zip(members, scores, strict=True) if m.group_scoring and s < max(scores))
            alive = [m for m in members if m not in out]
            if len(alive) > 1:
                winner = self._winner(alive)
                if winner is not None:
                    out.update(m for m in alive if m is not winner)
        return [e for e in found if e not in out]

    def _winner(self, members: list[Entry]) -> Entry | None:
        overrides = [m for m in members if m.group_override]
        if overrides:
            return max(overrides, key=lambda m: m.order)  # max keeps the first of equals, as SillyTavern's sort
        roll = self.rng.random() * sum(m.group_weight for m in members)
        total = 0.0
        for m in members:
            total += m.group_weight
            if roll <= total:
                return m
        return None

    def _admit(self, found: list[Entry]) -> tuple[list[Entry], bool]:
        """Probability, then the budget: an entry that would reach it is dropped, and so is the rest."""
        admitted: list[Entry] = []
        overflow = False
        for e in found:
            if overflow and not e.ignore_budget:
                continue
            if not self._lucky(e):
                self.done.add(e)  # a failed roll is not retried by later passes of this scan
                continue
            cost = self.count(e.content) if e.content else 0
            if not e.ignore_budget and self.used + cost >= self.budget:
                overflow = True
                continue
            self.used += cost
            self.done.add(e)
            self.active.append(e)
            admitted.append(e)
        return admitted, overflow

    def _lucky(self, e: Entry) -> bool:
        if not e.use_probability or e.probability >= 100 or self.clock.is_sticky(e):
            return True
        return self.rng.random() * 100 < e.probability


def _placed(active: list[Entry]) -> list[Entry]:
    """Prompt order: SillyTavern sorts by order (highest first, ties by activation) and prepends each."""
    ranked = sorted(range(len(active)), key=lambda i: (-active[i].order, i))
    return [active[i] for i in reversed(ranked)]


def _budget(books: Sequence[Lorebook], budget: int) -> int:
    # The caller's budget comes from the context window, so a book may lower it but never raise it.
    return min([budget, *(b.token_budget for b in books if b.token_budget and b.token_budget > 0)])


# ---------------------------------------------------------------- timed effects


class _Timed:
    """Sticky, cooldown and delay, as SillyTavern keeps them in its chat metadata.

    State per entry key: "<kind>_start", "<kind>_until" (and "<kind>_protected") for sticky and cooldown.
    An effect set on this very turn is dropped when the turn is replayed (a regenerated reply), unless
    it is the cooldown that follows a sticky run (protected).
    """

    def __init__(self, previous: Mapping[str, dict], entries: list[Entry], turn: int):
        self.turn = turn
        self.state = {k: dict(v) for k, v in previous.items() if isinstance(v, Mapping)}
        self.sticky: set[str] = set()
        self.cooling: set[str] = set()
        by_key = {e.key: e for e in entries}
        for kind, live in (("sticky", self.sticky), ("cooldown", self.cooling)):
            for key in list(self.state):
                if self._still_on(kind, key, by_key.get(key)):
                    live.add(key)

    def _still_on(self, kind: str, key: str, entry: Entry | None) -> bool:
        span = _span(self.state[key], kind)
        if span is None:
            return False
        start, until, protected = span
        if self.turn <= start and not protected:
            return self._drop(key, kind)  # the story did not advance: this turn is being replayed
        if entry is None:  # its book is not loaded now: keep the effect until it runs out
            return False if self.turn < until else self._drop(key, kind)
        if not getattr(entry, kind):
            return self._drop(key, kind)
        if self.turn >= until:
            self._drop(key, kind)
            if kind == "sticky" and entry.cooldown:
                self._set(key, "cooldown", entry.cooldown, protected=True)
            return False
        return True

    def _drop(self, key: str, kind: str) -> bool:
        for suffix in ("_start", "_until", "_protected"):
            self.state[key].pop(kind + suffix, None)
        if not self.state[key]:
            del self.state[key]
        return False

    def _set(self, key: str, kind: str, length: int, protected: bool = False) -> None:
        effect = self.state.setdefault(key, {})
        effect.update({f"{kind}_start": self.turn, f"{kind}_until": self.turn + length})
        if protected:
            effect[f"{kind}_protected"] = True

    def is_sticky(self, e: Entry) -> bool:
        return e.key in self.sticky

    def is_cooling(self, e: Entry) -> bool:
        return e.key in self.cooling

    def is_delayed(self, e: Entry) -> bool:
        return bool(e.delay) and self.turn < e.delay

    def save(self, active: list[Entry]) -> dict[str, dict]:
        for e in active:
            for kind in ("sticky", "cooldown"):
                if getattr(e, kind) and f"{kind}_until" not in self.state.get(e.key, {}):
                    self._set(e.key, kind, getattr(e, kind))
        return self.state


def _span(effect: Mapping[str, Any], kind: str) -> tuple[float, float, bool] | None:
    try:
        start, until = float(effect[f"{kind}_start"]), float(effect[f"{kind}_until"])
    except (KeyError, TypeError, ValueError):
        return None
    return start, until, bool(effect.get(f"{kind}_protected"))



__all__ = [
    "DEFAULT_LORE_BUDGET", "DEFAULT_MAX_RECURSION", "DEFAULT_SCAN_DEPTH", "POSITIONS", "ROLES", "LoreHit",
    "LoreResult", "activate", "book_problems", "triggered_entries",
]
