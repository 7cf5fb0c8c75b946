"""Fuzzing World Info files and lore activation: a book or a CardError on import; activation never
crashes and never hangs, whatever the keys (invalid or catastrophic regexes included)."""

from __future__ import annotations

import json
import random
import time

from hypothesis import example, given
from hypothesis import strategies as st

from bot.cards import CardError, Lorebook, parse_lorebook
from bot.story.lorebook import activate, book_problems
from tests.fuzz import fuzz

ENTRY_FIELDS = ["uid", "key", "keysecondary", "content", "comment", "constant", "selective", "order", "disable",
                "position", "depth", "role", "selectiveLogic", "probability", "useProbability", "group",
                "groupOverride", "groupWeight", "useGroupScoring", "scanDepth", "caseSensitive", "matchWholeWords",
                "sticky", "cooldown", "delay", "excludeRecursion", "preventRecursion", "delayUntilRecursion",
                "ignoreBudget", "displayIndex", "vectorized", "keys", "use_regex", "enabled", "insertion_order",
                "extensions", "secondary_keys", "case_sensitive", "priority", "id", "name"]
REGEXES = ["/(a+)+$/", "/(a|aa)*b/i", "/([a-z]+)*!/", "/(.*a){20}/", "/[/", "/a/gg", "/(?<n>x)\\k<n>/", "/(?<=a)b/",
           "/a{99999}/", "/\\1(a)/", "/x/y", "/(/", "/[^]/s", "//", "/a/q", "(a+)+$"]
KEYS = st.one_of(st.sampled_from(REGEXES), st.text(max_size=12),
                 st.sampled_from(["a", "Wren", "the tower", "{{char}}"]))
NUMBERS = st.one_of(st.integers(-(2**64), 2**64), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([10**400, -1, 0, 1, 7, 8, "3", "1e999", "-5"]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=10), KEYS)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)


def field_value(name: str) -> st.SearchStrategy:
    if name in ("key", "keysecondary", "keys", "secondary_keys"):
        return st.lists(KEYS, max_size=4) | VALUES
    if name == "content":
        return st.text(max_size=60) | st.sampled_from(["@@activate\nhi", "@@dont_activate", "a aaaa Wren"]) | VALUES
    return SCALARS if name != "extensions" else VALUES


ENTRY = st.lists(st.sampled_from(ENTRY_FIELDS), unique=True, max_size=12).flatmap(
    lambda names: st.fixed_dictionaries({n: field_value(n) for n in names}))
BOOK_FIELDS = st.fixed_dictionaries({}, optional={
    "name": SCALARS, "scan_depth": NUMBERS, "token_budget": NUMBERS, "recursive_scanning": SCALARS,
    "extensions": st.dictionaries(st.sampled_from(["case_sensitive", "match_whole_words", "use_group_scoring",
                                                   "scan_depth"]), SCALARS, max_size=3) | VALUES,
})
WORLD_INFO = st.one_of(
    st.builds(lambda e, rest: {**rest, "entries": e},
              st.dictionaries(st.text(max_size=4), ENTRY | VALUES, max_size=6), BOOK_FIELDS),
    st.builds(lambda e, rest: {**rest, "entries": e}, st.lists(ENTRY | VALUES, max_size=6), BOOK_FIELDS),
    st.builds(lambda data: {"spec": "lorebook_v3", "data": data},
              st.builds(lambda e, rest: {**rest, "entries": e}, st.lists(ENTRY, max_size=6), BOOK_FIELDS) | VALUES),
    VALUES,
)
TEXTS = st.sampled_from(["a" * 40 + "!", "a" * 30 + "b", "a" * 60, "abcdefghij" * 5, "Wren: the tower", ""])
HISTORY = st.lists(st.text(max_size=80) | TEXTS, min_size=1, max_size=4)
SECONDS_PER_EXAMPLE = 2.0


def imported(doc: object) -> Lorebook | None:
    try:
        book = parse_lorebook(json.dumps(doc, allow_nan=True).encode(), "world.json")
    except CardError as exc:
        assert str(exc).strip() and exc.reason
        return None
    assert isinstance(book, Lorebook)
    return book


@fuzz(200)
@given(WORLD_INFO)
@example({"entries": {"0": {"order": 10**400}}})
@example({"entries": [{"insertion_order": 1e308, "keys": ["a"]}, {"insertion_order": -1e308}]})
@example({"spec": "lorebook_v3", "data": {"entries": [{"uid": None, "priority": 10**400}]}})  # CI found it
def test_world_info_import(doc: object) -> None:
    book = imported(doc)
    if book is not None:
        assert all(isinstance(p, str) for p in book_problems(book))


@fuzz(200)
@given(WORLD_INFO, HISTORY, st.integers(0, 50), st.integers(0, 4096), st.integers(0, 3))
@example({"entries": [{"key": ["/(a+)+$/"], "content": "x"}]}, ["a" * 40 + "!"], 0, 100, 0)
@example({"entries": {"1": {"key": ["/(a|aa)*b/"], "content": "x"}}}, ["a" * 60], 0, 100, 0)
@example({"entries": [{"keys": ["(a+)+$"], "use_regex": True, "content": "x"}]}, ["a" * 40 + "!"], 0, 100, 0)
def test_activation_never_crashes_or_hangs(doc: object, history: list[str], turn: int, budget: int,
                                           recursion: int) -> None:
    book = imported(doc)
    if book is None:
        return
    start = time.perf_counter()
    result = activate([book], history, turn=turn, budget=budget, rng=random.Random(0), max_recursion=recursion)
    again = activate([book], history, turn=turn + 1, timed=result.timed, budget=budget, rng=random.Random(1))
    assert time.perf_counter() - start < SECONDS_PER_EXAMPLE
    assert all(isinstance(hit.content, str) for hit in [*result.hits, *again.hits])
