"""Reading a lorebook entry: its SillyTavern fields, keys and regexes, into the one form the matcher uses.

`prepare` turns each book's `LoreEntry` objects into `Entry` objects in SillyTavern's scan order.
SillyTavern's own fields live in `entry.extensions`, in the snake_case form it writes when it embeds a
book in a card; the book's own extensions give defaults an entry may override. Keys become `_Key`s:
plain text (case-folded unless case-sensitive; a one-word key matches as a whole word unless
match_whole_words is off, a longer one as a substring) or /pattern/flags regexes translated from
JavaScript's dialect. Fields of the wrong type fall back to SillyTavern's
defaults and, when asked, are noted as problems (see `lorebook.book_problems`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, reduce
from operator import or_
from typing import Any

import regex

from bot.cards import Lorebook, LoreEntry

DEFAULT_SCAN_DEPTH = 2  # SillyTavern's world_info_depth: the newest two messages
DEFAULT_DEPTH = 4  # at-depth entries without a depth
DEFAULT_WEIGHT = 100  # inclusion-group weight without one
POSITIONS = ("before_char", "after_char", "an_top", "an_bottom", "at_depth", "em_top", "em_bottom")
OUTLET = 7  # later SillyTavern: content only reachable through an {{outlet}} macro, so never placed here
ROLES = ("system", "user", "assistant")
AND_ANY, NOT_ALL, NOT_ANY, AND_ALL = range(4)
# JavaScript's \w is ASCII-only, and SillyTavern's word boundaries are built on it.
_JS_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_REGEX_KEY = re.compile(r"/(.+?)/([gimsuy]*)", re.DOTALL)
_JS_FLAGS = {"i": regex.IGNORECASE, "m": regex.MULTILINE, "s": regex.DOTALL, "u": 0, "g": 0, "y": 0}
# Keys' regexes come from anyone's card; the `regex` engine (re's syntax) has a timeout, so a
# catastrophic one (`(a+)+$` and kin) cannot stall a reply. One that times out is dropped for good.
REGEX_TIMEOUT = 0.05  # seconds per search
_TIMED_OUT: set[regex.Pattern] = set()
# Fields only SillyTavern writes: their presence says the entry's keys follow its rules, whatever
# `use_regex` says (SillyTavern sets it on every export, yet treats only /.../ keys as regexes).
_ST_MARKERS = frozenset({"position", "display_index", "selectiveLogic", "useProbability", "exclude_recursion"})
_DECORATORS = ("@@activate", "@@dont_activate")


@dataclass(eq=False)  # compared by identity: one object per entry per scan
class Entry:
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


def _rank(value: int | float | None) -> float:
    """A sort key of an order or priority; an int past float's range (10**400) sorts as infinite."""
    try:
        return float(value or 0)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def prepare(books: Sequence[Lorebook], macros: Callable[[str], str] | None,
            problems: list[str] | None = None) -> list[Entry]:
    entries: list[Entry] = []
    for index, book in enumerate(books):
        name = book.name or f"book{index}"
        # SillyTavern sorts by order alone; V3's priority only breaks its ties.
        ranked = sorted(enumerate(book.entries), key=lambda p: (-_rank(p[1].insertion_order),
                                                               -_rank(p[1].priority), p[0]))
        entries += [_entry(book, name, i, raw, macros, problems) for i, raw in ranked]
    for rank, entry in enumerate(entries):
        entry.rank = rank
    return entries


def _entry(book: Lorebook, name: str, index: int, raw: LoreEntry, macros: Callable[[str], str] | None,
           problems: list[str] | None) -> Entry:
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
    entry = Entry(
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


def _placement(entry: Entry, raw: LoreEntry, read: _Reader) -> None:
    fallback = 0 if raw.position == "before_char" else 1  # SillyTavern puts anything else after the card
    entry.position = read.choice("position", fallback, OUTLET + 1, "it is not placed", None)
    entry.depth = int(read.number("depth", DEFAULT_DEPTH))
    entry.role = ROLES[read.choice("role", 0, len(ROLES), "using system", 0)]


def _behaviour(entry: Entry, read: _Reader, book: Lorebook) -> None:
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
        value = as_flag(self.ext.get(name))
        if value is None and self.ext.get(name) is not None:
            self._note(f"{name} {self.ext[name]!r} is not true or false; ignored")
        return value

    def book_flag(self, name: str) -> bool | None:
        return as_flag(self.book_ext.get(name))  # book_problems reports a bad one once, not per entry

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
        except (re.error, regex.error) as exc:
            self._note(f'key "{key}" is not a valid regex: {exc}')
            return None  # a broken regex in someone's card must not break the story


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def as_flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    return bool(value) if isinstance(value, int) and value in (0, 1) else None


@dataclass(frozen=True)
class _Key:
    """One key. /pattern/flags is a regex, which ignores the entry's case and whole-word settings;
    a plain key of one word matches as a whole word, a key of several words as a substring."""

    regex: regex.Pattern | None
    needle: str  # lower-cased unless case-sensitive
    case: bool
    whole: bool

    def found(self, text: str, lower: str) -> bool:
        if self.regex is not None:
            if self.regex in _TIMED_OUT:
                return False
            try:
                return self.regex.search(text, timeout=REGEX_TIMEOUT) is not None
            except TimeoutError:
                _TIMED_OUT.add(self.regex)
                return False
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
def _js_regex(source: str, flags: str) -> regex.Pattern:
    """A JavaScript regex in Python: named groups and [^] translated, flags mapped (y anchors at the start)."""
    if len(set(flags)) != len(flags):
        raise re.error(f"repeated flag in {flags!r}")
    source = re.sub(r"\(\?<(?![=!])", "(?P<", source)
    source = re.sub(r"\\k<(\w+)>", r"(?P=\1)", source).replace("[^]", r"[\s\S]")
    if "y" in flags:
        source = rf"\A(?:{source})"
    return regex.compile(source, reduce(or_, (_JS_FLAGS[f] for f in flags), 0))



__all__ = [
    "AND_ALL", "AND_ANY", "DEFAULT_SCAN_DEPTH", "NOT_ALL", "NOT_ANY", "POSITIONS", "ROLES", "Entry", "as_flag",
    "prepare",
]
