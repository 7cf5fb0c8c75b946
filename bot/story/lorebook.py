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
SillyTavern's own fields live in `entry.extensions`, in the snake_case form it writes when it embeds a
book in a card. Where SillyTavern has a global setting its default is used, and the book's fields
(scan_depth, token_budget, recursive_scanning, extensions) may override it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, reduce
from operator import or_
from typing import Any

from bot.cards import Lorebook, LoreEntry
from bot.story.tokens import estimate_tokens

DEFAULT_SCAN_DEPTH = 2  # SillyTavern's world_info_depth: the newest two messages
DEFAULT_LORE_BUDGET = 1024  # tokens: SillyTavern's 25% of a 4k window, when the caller has no better figure
DEFAULT_MAX_RECURSION = 0  # SillyTavern's max recursion steps: 0 = until nothing new activates
DEFAULT_DEPTH = 4  # at-depth entries without a depth
DEFAULT_WEIGHT = 100  # inclusion-group weight without one
MAX_SCAN_DEPTH = 1000  # SillyTavern's ceiling on any scan depth
MAX_PASSES = 64  # our guard for "unlimited": a pathological book must not stall the reply path

POSITIONS = ("before_char", "after_char", "an_top", "an_bottom", "at_depth", "em_top", "em_bottom")
OUTLET = 7  # later SillyTavern: content only reachable through an {{outlet}} macro, so never placed here
ROLES = ("system", "user", "assistant")
AND_ANY, NOT_ALL, NOT_ANY, AND_ALL = range(4)
# JavaScript's \w is ASCII-only, and SillyTavern's word boundaries are built on it.
_JS_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_REGEX_KEY = re.compile(r"/(.+?)/([gimsuy]*)", re.DOTALL)
_JS_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "u": 0, "g": 0, "y": 0}
# Fields only SillyTavern writes: their presence says the entry's keys follow its rules, whatever
# `use_regex` says (SillyTavern sets it on every export, yet treats only /.../ keys as regexes).
_ST_MARKERS = frozenset({"position", "display_index", "selectiveLogic", "useProbability", "exclude_recursion"})
_DECORATORS = ("@@activate", "@@dont_activate")


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


@dataclass(eq=False)  # compared by identity: one object per entry per scan
class _Entry:
    source: LoreEntry
    book: str
    uid: str
    content: str
    keys: list[_Key | None]  # None: a key that cannot match (a regex that does not compile)
    secondary: list[_Key | None]
    enabled: bool = True
    constant: bool = False
    decorator: bool | None = None  # @@activate: True, @@dont_activate: False
    selective: bool = False
    logic: int = AND_ANY
    order: float = 0
    position: int | None = 1  # None: not placed
    depth: int = DEFAULT_DEPTH
    role: str = "system"
    scan_depth: int = DEFAULT_SCAN_DEPTH
    exclude_recursion: bool = False
    prevent_recursion: bool = False
    delay_level: int = 0
    probability: float = 100
    use_probability: bool = True
    groups: tuple[str, ...] = ()
    group_override: bool = False
    group_weight: float = DEFAULT_WEIGHT
    group_scoring: bool = False
    ignore_budget: bool = False
    sticky: int = 0
    cooldown: int = 0
    delay: int = 0
    rank: int = 0  # place in scan order

    @property
    def key(self) -> str:
        return f"{self.book}/{self.uid}"


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
    entries = _prepare(books, macros)
    clock = _Timed(timed or {}, entries, turn)
    scan = _Scan(entries, _Buffer(history), clock, rng or random.Random(), count_tokens,
                 _budget(books, budget), max_recursion)
    active = _placed(scan.run())
    hits = [LoreHit(e.content, POSITIONS[e.position], e.depth, e.role, e.order, e.book, e.uid)
            for e in active if e.content and e.position is not None and e.position < len(POSITIONS)]
    return LoreResult(hits, clock.save(active))


def book_problems(book: Lorebook) -> list[str]:
    """What in an accepted book will not work as its author meant: bad regexes, wrong field types."""
    problems = [f"book: {name} {book.extensions[name]!r} is not true or false; ignored"
                for name in ("case_sensitive", "match_whole_words", "use_group_scoring")
                if book.extensions.get(name) is not None and _as_flag(book.extensions[name]) is None]
    _prepare([book], None, problems)
    return problems


def triggered_entries(book: Lorebook | None, scanned: Sequence[str], budget: int | None = None) -> list[LoreEntry]:
    """The older interface: one book, no timed effects; the active entries in insertion order."""
    if book is None:
        return []
    entries = _prepare([book], None)
    scan = _Scan(entries, _Buffer(scanned), _Timed({}, entries, 0), random.Random(), estimate_tokens,
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
    def __init__(self, entries: list[_Entry], buffer: _Buffer, clock: _Timed, rng: random.Random,
                 count: Callable[[str], int], budget: int, max_steps: int):
        self.entries, self.buffer, self.clock, self.rng = entries, buffer, clock, rng
        self.count, self.budget, self.max_steps = count, budget, max_steps
        self.active: list[_Entry] = []
        self.done: set[_Entry] = set()  # active, or failed their probability roll this scan
        self.used = 0

    def run(self) -> list[_Entry]:
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

    def _eligible(self, e: _Entry, recursion: bool, level: int) -> bool:
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

    def _matches(self, e: _Entry) -> bool:
        text, lower = self.buffer.text(e.scan_depth)
        if not any(k is not None and k.found(text, lower) for k in e.keys):
            return False
        if not (e.selective and e.secondary):
            return True
        found = [k is not None and k.found(text, lower) for k in e.secondary]
        return {AND_ANY: any(found), NOT_ALL: not all(found), NOT_ANY: not any(found),
                AND_ALL: all(found)}.get(e.logic, False)

    def _score(self, e: _Entry) -> int:
        """How many keys matched: group scoring keeps the best-matching members."""
        text, lower = self.buffer.text(e.scan_depth)
        primary = sum(k is not None and k.found(text, lower) for k in e.keys)
        secondary = sum(k is not None and k.found(text, lower) for k in e.secondary)
        if not e.keys:
            return 0
        if e.secondary and (e.logic == AND_ANY or (e.logic == AND_ALL and secondary == len(e.secondary))):
            return primary + secondary
        return primary

    def _groups(self, found: list[_Entry]) -> list[_Entry]:
        """One winner per inclusion group: sticky members, else best score, else override, else a weighted roll."""
        groups: dict[str, list[_Entry]] = {}
        for e in found:
            for name in e.groups:
                groups.setdefault(name, []).append(e)
        out: set[_Entry] = set()
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

    def _winner(self, members: list[_Entry]) -> _Entry | None:
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

    def _admit(self, found: list[_Entry]) -> tuple[list[_Entry], bool]:
        """Probability, then the budget: an entry that would reach it is dropped, and so is the rest."""
        admitted: list[_Entry] = []
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

    def _lucky(self, e: _Entry) -> bool:
        if not e.use_probability or e.probability >= 100 or self.clock.is_sticky(e):
            return True
        return self.rng.random() * 100 < e.probability


def _placed(active: list[_Entry]) -> list[_Entry]:
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

    def __init__(self, previous: Mapping[str, dict], entries: list[_Entry], turn: int):
        self.turn = turn
        self.state = {k: dict(v) for k, v in previous.items() if isinstance(v, Mapping)}
        self.sticky: set[str] = set()
        self.cooling: set[str] = set()
        by_key = {e.key: e for e in entries}
        for kind, live in (("sticky", self.sticky), ("cooldown", self.cooling)):
            for key in list(self.state):
                if self._still_on(kind, key, by_key.get(key)):
                    live.add(key)

    def _still_on(self, kind: str, key: str, entry: _Entry | None) -> bool:
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

    def is_sticky(self, e: _Entry) -> bool:
        return e.key in self.sticky

    def is_cooling(self, e: _Entry) -> bool:
        return e.key in self.cooling

    def is_delayed(self, e: _Entry) -> bool:
        return bool(e.delay) and self.turn < e.delay

    def save(self, active: list[_Entry]) -> dict[str, dict]:
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


# ---------------------------------------------------------------- reading entries


def _prepare(books: Sequence[Lorebook], macros: Callable[[str], str] | None,
             problems: list[str] | None = None) -> list[_Entry]:
    entries: list[_Entry] = []
    for index, book in enumerate(books):
        name = book.name or f"book{index}"
        # SillyTavern sorts by order alone; V3's priority only breaks its ties.
        ranked = sorted(enumerate(book.entries), key=lambda p: (-float(p[1].insertion_order),
                                                               -float(p[1].priority or 0), p[0]))
        entries += [_entry(book, name, i, raw, macros, problems) for i, raw in ranked]
    for rank, entry in enumerate(entries):
        entry.rank = rank
    return entries


def _entry(book: Lorebook, name: str, index: int, raw: LoreEntry, macros: Callable[[str], str] | None,
           problems: list[str] | None) -> _Entry:
    uid = str(raw.id) if raw.id is not None else str(index)
    title = raw.comment or raw.name or next((k for k in raw.keys if k.strip()), "")
    read = _Reader(raw.extensions, book.extensions, f"entry {uid}" + (f" ({title})" if title else ""), problems)
    found, content = _decorators(raw.content)
    expand = macros or (lambda text: text)
    case = read.flag("case_sensitive")
    case = case if case is not None else raw.case_sensitive
    case = case if case is not None else read.book_flag("case_sensitive") is True
    whole = read.flag("match_whole_words")
    whole = whole if whole is not None else read.book_flag("match_whole_words") is not False
    bare = raw.use_regex and not (raw.extensions.keys() & _ST_MARKERS)
    keys = [k for k in (expand(k).strip() for k in raw.keys) if k]
    secondary = [k for k in (expand(k).strip() for k in raw.secondary_keys or []) if k]
    entry = _Entry(
        raw, name, uid, expand(content),
        [read.key(k, case, whole, bare) for k in keys], [read.key(k, case, whole, bare) for k in secondary],
        enabled=raw.enabled, constant=bool(raw.constant), selective=bool(raw.selective),
        decorator=True if "@@activate" in found else False if "@@dont_activate" in found else None,
        order=float(raw.insertion_order), scan_depth=_scan_depth(book, read),
    )
    _placement(entry, raw, read)
    _behaviour(entry, read, book)
    if problems is not None and entry.enabled and not (keys or entry.constant or entry.decorator):
        problems.append(f"{read.label}: has no keys and is not constant, so it never activates")
    return entry


def _placement(entry: _Entry, raw: LoreEntry, read: _Reader) -> None:
    fallback = 0 if raw.position == "before_char" else 1  # SillyTavern puts anything else after the card
    entry.position = read.choice("position", fallback, OUTLET + 1, "it is not placed", None)
    entry.depth = int(read.number("depth", DEFAULT_DEPTH))
    entry.role = ROLES[read.choice("role", 0, len(ROLES), "using system", 0)]


def _behaviour(entry: _Entry, read: _Reader, book: Lorebook) -> None:
    entry.logic = read.choice("selectiveLogic", AND_ANY, 4, "the entry never activates by its keys", -1)
    entry.exclude_recursion = bool(read.flag("exclude_recursion"))
    entry.prevent_recursion = bool(read.flag("prevent_recursion"))
    entry.delay_level = read.level("delay_until_recursion")
    if book.recursive_scanning is False:  # this book takes no part in recursion
        entry.prevent_recursion = True
        entry.exclude_recursion = entry.exclude_recursion or not entry.delay_level
    entry.probability = read.number("probability", 100)
    use = read.flag("useProbability")
    entry.use_probability = True if use is None else use
    groups = read.ext.get("group")
    entry.groups = tuple(g.strip() for g in groups.split(",") if g.strip()) if isinstance(groups, str) else ()
    entry.group_override = bool(read.flag("group_override"))
    entry.group_weight = read.number("group_weight", DEFAULT_WEIGHT)
    scoring = read.flag("use_group_scoring")
    entry.group_scoring = read.book_flag("use_group_scoring") is True if scoring is None else scoring
    entry.ignore_budget = bool(read.flag("ignore_budget"))
    timers = (max(0, int(read.number(k, 0))) for k in ("sticky", "cooldown", "delay"))  # negative: off
    entry.sticky, entry.cooldown, entry.delay = timers


def _scan_depth(book: Lorebook, read: _Reader) -> int:
    if read.ext.get("scan_depth") is not None:
        return int(read.number("scan_depth", DEFAULT_SCAN_DEPTH))
    # A book-level 0 is what many editors write for "not set", so only a positive one counts.
    return book.scan_depth if book.scan_depth and book.scan_depth > 0 else DEFAULT_SCAN_DEPTH


def _decorators(content: str) -> tuple[set[str], str]:
    """SillyTavern's leading @@ lines; an @@@ line is the fallback for an unknown decorator above it."""
    if not content.startswith("@@"):
        return set(), content
    found: set[str] = set()
    fallback = False
    lines = content.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("@@"):
            return found, "\n".join(lines[i:])
        if line.startswith("@@@") and not fallback:
            continue
        name = line.removeprefix("@").strip() if line.startswith("@@@") else line.strip()
        fallback = not name.startswith(_DECORATORS)
        if not fallback:
            found.add(name)
    return found, ""


class _Reader:
    """Reads one entry's SillyTavern fields. Cards from the wild carry wrong types, which must not
    break a story: each falls back to SillyTavern's default and is noted for book_problems."""

    def __init__(self, ext: Mapping[str, Any], book_ext: Mapping[str, Any], label: str, problems: list[str] | None):
        self.ext, self.book_ext, self.label, self.problems = ext, book_ext, label, problems

    def _note(self, text: str) -> None:
        if self.problems is not None:
            self.problems.append(f"{self.label}: {text}")

    def number(self, name: str, default: float) -> float:
        value = self.ext.get(name)
        if value is None:
            return default
        number = _as_number(value)
        if number is None:
            self._note(f"{name} {value!r} is not a number; using {default:g}")
            return default
        return number

    def choice(self, name: str, default: int, limit: int, otherwise: str, bad: Any) -> Any:
        """One of SillyTavern's numbered options (0..limit-1); `bad` when set to anything else."""
        value = self.ext.get(name)
        if value is None:
            return default
        number = _as_number(value)
        if number is None or number != int(number) or not 0 <= number < limit:
            self._note(f"{name} {value!r} is not one SillyTavern knows; {otherwise}")
            return bad
        return int(number)

    def flag(self, name: str) -> bool | None:
        value = _as_flag(self.ext.get(name))
        if value is None and self.ext.get(name) is not None:
            self._note(f"{name} {self.ext[name]!r} is not true or false; ignored")
        return value

    def book_flag(self, name: str) -> bool | None:
        return _as_flag(self.book_ext.get(name))  # book_problems reports a bad one once, not per entry

    def level(self, name: str) -> int:
        value = self.ext.get(name)
        if value is None or value is False:
            return 0
        return 1 if value is True else max(0, int(self.number(name, 0)))

    def key(self, key: str, case: bool, whole: bool, bare: bool) -> _Key | None:
        literal = _REGEX_KEY.fullmatch(key)
        if literal and re.search(r"(^|[^\\])/", literal[1]):
            literal = None  # an unescaped slash inside: SillyTavern reads the key as plain text
        if literal is None and not bare:
            return _Key(None, key if case else key.lower(), case, whole and len(key.split()) == 1)
        source, flags = (literal[1], literal[2]) if literal else (key, "" if case else "i")
        try:
            return _Key(_js_regex(source, flags), key, case, False)
        except re.error as exc:
            self._note(f'key "{key}" is not a valid regex: {exc}')
            return None  # a broken regex in someone's card must not break the story


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    return bool(value) if isinstance(value, int) and value in (0, 1) else None


@dataclass(frozen=True)
class _Key:
    """One key. /pattern/flags is a regex, which ignores the entry's case and whole-word settings;
    a plain key of one word matches as a whole word, a key of several words as a substring."""

    regex: re.Pattern | None
    needle: str  # lower-cased unless case-sensitive
    case: bool
    whole: bool

    def found(self, text: str, lower: str) -> bool:
        if self.regex is not None:
            return self.regex.search(text) is not None
        hay = text if self.case else lower
        if not self.whole:
            return self.needle in hay
        at = hay.find(self.needle)
        while at >= 0:
            end = at + len(self.needle)
            if (at == 0 or hay[at - 1] not in _JS_WORD) and (end == len(hay) or hay[end] not in _JS_WORD):
                return True
            at = hay.find(self.needle, at + 1)
        return False


@lru_cache(maxsize=1024)
def _js_regex(source: str, flags: str) -> re.Pattern:
    """A JavaScript regex in Python: named groups and [^] translated, flags mapped (y anchors at the start)."""
    if len(set(flags)) != len(flags):
        raise re.error(f"repeated flag in {flags!r}")
    source = re.sub(r"\(\?<(?![=!])", "(?P<", source)
    source = re.sub(r"\\k<(\w+)>", r"(?P=\1)", source).replace("[^]", r"[\s\S]")
    if "y" in flags:
        source = rf"\A(?:{source})"
    return re.compile(source, reduce(or_, (_JS_FLAGS[f] for f in flags), 0))


__all__ = [
    "DEFAULT_LORE_BUDGET", "DEFAULT_MAX_RECURSION", "DEFAULT_SCAN_DEPTH", "POSITIONS", "ROLES", "LoreHit",
    "LoreResult", "activate", "book_problems", "triggered_entries",
]
