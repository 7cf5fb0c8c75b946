"""Lore activation behaves as SillyTavern's World Info: each case below is one of its rules."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bot.cards import Lorebook
from bot.story.lorebook import LoreResult, activate, book_problems, triggered_entries


def E(content: str, keys: list[str] | tuple[str, ...] = (), *, ext: dict[str, Any] | None = None,
      **fields: Any) -> dict[str, Any]:
    """One V3 entry; `ext` holds SillyTavern's fields, as it writes them into a card."""
    return {"keys": list(keys), "content": content, "extensions": ext or {}, **fields}


def book(*entries: dict[str, Any], name: str = "World", **extra: Any) -> Lorebook:
    return Lorebook.model_validate({"name": name, "entries": list(entries), **extra})


def scan(books: Lorebook | list[Lorebook], *history: str, turn: int = 0, **kw: Any) -> LoreResult:
    return activate(books if isinstance(books, list) else [books], list(history), turn=turn, **kw)


def got(result: LoreResult) -> list[str]:
    return [h.content for h in result.hits]


# ------------------------------------------------------------------ keys


def test_plain_keys_are_case_insensitive_whole_words_by_default():
    lore = book(E("dragon lore", ["Dragon"]))
    assert got(scan(lore, "Ann: a DRAGON, there!")) == ["dragon lore"]
    assert got(scan(lore, "Ann: a dragonfly")) == []


def test_a_key_of_several_words_matches_as_a_substring():
    # SillyTavern's whole-word rule only applies to one-word keys.
    lore = book(E("forest lore", ["magical forest"]))
    assert got(scan(lore, "the magical forests of the north")) == ["forest lore"]


def test_whole_word_boundaries_are_ascii_like_javascripts():
    # In JavaScript \W is any non-ASCII-word character, so é or Cyrillic letters are boundaries there.
    lore = book(E("cat", ["кот"]))
    assert got(scan(lore, "котлета")) == ["cat"]


@pytest.mark.parametrize(("logic", "text", "active"), [
    (0, "dragon fire", True), (0, "dragon", False),  # AND ANY
    (1, "dragon fire", True), (1, "dragon fire ice", False),  # NOT ALL
    (2, "dragon", True), (2, "dragon ice", False),  # NOT ANY
    (3, "dragon fire ice", True), (3, "dragon fire", False),  # AND ALL
])
def test_selective_logic(logic: int, text: str, active: bool):
    lore = book(E("lore", ["dragon"], secondary_keys=["fire", "ice"], selective=True, ext={"selectiveLogic": logic}))
    assert got(scan(lore, text)) == (["lore"] if active else [])


def test_secondary_keys_count_only_for_selective_entries():
    lore = book(E("lore", ["dragon"], secondary_keys=["fire"], selective=False, ext={"selectiveLogic": 3}))
    assert got(scan(lore, "a dragon")) == ["lore"]


def test_an_unknown_selective_logic_never_activates_and_is_reported():
    lore = book(E("lore", ["dragon"], secondary_keys=["fire"], selective=True, ext={"selectiveLogic": 9}))
    assert got(scan(lore, "dragon fire")) == []
    assert "selectiveLogic 9" in book_problems(lore)[0]


def test_a_slash_key_with_an_unescaped_slash_inside_is_plain_text():
    assert got(scan(book(E("p", ["/and/or/"])), "this /and/or/ that")) == ["p"]


def test_regex_keys_with_javascript_flags():
    lore = book(
        E("i", ["/dr[ao]gon/i"]), E("case", ["/Wyrm/"]), E("m", ["/run$/m"]), E("no m", ["/run$/"]),
        E("s", [r"/end.\x01Bo/s"]), E("no s", [r"/end.\x01Bo/"]), E("named", [r"/(?<w>ha)\k<w>/"]),
        E("y", [r"/\x01end/y"]), scan_depth=3,
    )
    assert set(got(scan(lore, "Ann: DRAGON wyrm haha start", "Bo: run", "end"))) == {"i", "m", "named", "s", "y"}
    # a regex ignores the entry's case setting: its own flags decide
    assert got(scan(book(E("case", ["/Wyrm/"], ext={"case_sensitive": False})), "wyrm")) == []
    # the scanned text is the newest message first, each message opened by \x01 (as in SillyTavern)
    assert got(scan(book(E("s", ["/start.end/s"])), "start", "end")) == []


def test_a_regex_that_does_not_compile_is_skipped_and_reported():
    lore = book(E("bad only", ["/[a-/i"], comment="Dragon", id=3), E("mixed", ["/(unclosed/", "dragon"]))
    assert got(scan(lore, "a dragon [a-")) == ["mixed"]
    problems = book_problems(lore)
    assert problems[0].startswith('entry 3 (Dragon): key "/[a-/i" is not a valid regex: ')
    assert any('key "/(unclosed/"' in p for p in problems)


def test_v3_use_regex_keys_are_regexes_unless_sillytavern_wrote_the_entry():
    # SillyTavern sets use_regex on every entry it exports yet only treats /.../ keys as regexes.
    assert got(scan(book(E("v3", [r"dr(a|o)gon"], use_regex=True)), "a DROGON")) == ["v3"]
    st = E("st", ["c++"], use_regex=True, ext={"position": 1})
    assert got(scan(book(st), "I write c++ daily")) == ["st"]


def test_case_sensitivity_per_entry_then_book():
    sensitive = {"extensions": {"case_sensitive": True}}
    assert got(scan(book(E("a", ["Ink"]), **sensitive), "ink")) == []
    assert got(scan(book(E("a", ["Ink"], ext={"case_sensitive": False}), **sensitive), "ink")) == ["a"]
    assert got(scan(book(E("a", ["Ink"], case_sensitive=True)), "ink")) == []  # V3's own field
    assert got(scan(book(E("a", ["Ink"], case_sensitive=True)), "Ink")) == ["a"]


def test_whole_words_per_entry_then_book():
    loose = {"extensions": {"match_whole_words": False}}
    assert got(scan(book(E("a", ["cat"]), **loose), "concatenate")) == ["a"]
    assert got(scan(book(E("a", ["cat"], ext={"match_whole_words": True}), **loose), "concatenate")) == []
    assert got(scan(book(E("a", ["cat"], ext={"match_whole_words": False})), "concatenate")) == ["a"]


def test_empty_keys_are_never_scanned():
    assert got(scan(book(E("blank", ["", "   "])), "anything at all")) == []


def test_macros_expand_in_keys():
    lore = book(E("about her", ["{{char}}"]))
    assert got(scan(lore, "Ann: where is Wren?", macros=lambda t: t.replace("{{char}}", "Wren"))) == ["about her"]


# ------------------------------------------------------------------ constant, disabled, probability, depth


def test_constant_and_disabled_entries():
    lore = book(E("always", constant=True), E("off", ["x"], constant=True, enabled=False), E("x", ["x"]))
    assert got(scan(lore, "nothing")) == ["always"]


@pytest.mark.parametrize(("probability", "use", "expected"), [(0, True, []), (100, True, ["p"]), (0, False, ["p"])])
def test_probability(probability: int, use: bool, expected: list[str]):
    lore = book(E("p", ["dragon"], ext={"probability": probability, "useProbability": use}))
    for seed in range(20):
        assert got(scan(lore, "dragon", rng=random.Random(seed))) == expected


def test_probability_rolls_with_the_given_rng():
    lore = book(E("p", ["dragon"], ext={"probability": 50, "useProbability": True}))
    runs = [bool(got(scan(lore, "dragon", rng=random.Random(seed)))) for seed in range(200)]
    assert 60 < sum(runs) < 140
    assert runs == [bool(got(scan(lore, "dragon", rng=random.Random(seed)))) for seed in range(200)]


def test_scan_depth_reads_the_newest_messages():
    history = ["old dragon", "filler", "newest"]
    assert got(scan(book(E("d", ["dragon"])), *history)) == []  # SillyTavern's default: the newest 2
    assert got(scan(book(E("d", ["dragon"]), scan_depth=3), *history)) == ["d"]
    assert got(scan(book(E("d", ["dragon"], ext={"scan_depth": 1}), scan_depth=3), "dragon", "newest")) == []
    assert got(scan(book(E("d", ["dragon"], ext={"scan_depth": 0})), "dragon")) == []


# ------------------------------------------------------------------ recursion

CHAIN = (E("A: the king lives here", ["castle"], insertion_order=3), E("B: he wears the crown", ["king"],
         insertion_order=2), E("C: made of gold", ["crown"], insertion_order=1))


def chain(*changes: dict[str, Any], **extra: Any) -> Lorebook:
    entries = [dict(e) for e in CHAIN]
    for entry, ext in zip(entries, changes, strict=False):
        entry["extensions"] = ext
    return book(*entries, **extra)


def test_active_entries_trigger_others_recursively():
    assert got(scan(chain(), "to the castle")) == ["C: made of gold", "B: he wears the crown", "A: the king lives here"]


def test_exclude_recursion_entries_are_not_found_by_recursion():
    assert got(scan(chain({}, {"exclude_recursion": True}), "to the castle")) == ["A: the king lives here"]
    assert len(got(scan(chain({}, {"exclude_recursion": True}), "the castle king"))) == 3  # the chat still finds it


def test_prevent_recursion_content_triggers_nothing():
    assert got(scan(chain({"prevent_recursion": True}), "to the castle")) == ["A: the king lives here"]


def test_delay_until_recursion_waits_for_a_recursion_pass():
    lore = book(E("D: delayed", ["king"], ext={"delay_until_recursion": True}))
    assert got(scan(lore, "the king")) == []  # no recursion pass without something active
    lore = book(E("A: the king", ["castle"]), E("D: delayed", ["castle"], ext={"delay_until_recursion": True}))
    assert sorted(got(scan(lore, "the castle"))) == ["A: the king", "D: delayed"]


def test_delay_until_recursion_levels_open_one_after_another():
    lore = book(E("L1: opens the gate", ["castle"], ext={"delay_until_recursion": 1}),
                E("L2: sees the gate", ["gate"], ext={"delay_until_recursion": 2}))
    assert set(got(scan(lore, "the castle"))) == {"L1: opens the gate", "L2: sees the gate"}
    assert got(scan(lore, "the castle", max_recursion=2)) == ["L1: opens the gate"]


def test_recursion_depth_limit():
    assert got(scan(chain(), "castle", max_recursion=1)) == ["A: the king lives here"]
    assert got(scan(chain(), "castle", max_recursion=2)) == ["B: he wears the crown", "A: the king lives here"]
    assert len(got(scan(chain(), "castle", max_recursion=0))) == 3


def test_a_book_without_recursive_scanning_takes_no_part_in_recursion():
    assert got(scan(chain(recursive_scanning=False), "castle")) == ["A: the king lives here"]


# ------------------------------------------------------------------ budget and order


def test_budget_keeps_higher_order_first_and_stops_at_the_first_overflow():
    lore = book(E("x" * 160, ["a"], insertion_order=300), E("y" * 160, ["a"], insertion_order=200),
                E("z" * 160, ["a"], insertion_order=100), E("w" * 4, ["a"], insertion_order=50))
    kept = got(scan(lore, "a", budget=100))  # 40 tokens each: the third would make 120
    assert kept == ["y" * 160, "x" * 160]  # and the small fourth is dropped too: SillyTavern stops there
    assert got(scan(lore, "a", budget=80)) == ["x" * 160]  # reaching the budget exactly is over it


def test_the_budget_stops_recursion():
    lore = book(E("A: the king " + "x" * 150, ["castle"]), E("B: big " + "y" * 400, ["king"]),
                E("C: never", ["king"], ext={"probability": 0, "useProbability": True}))
    assert got(scan(lore, "castle", budget=100)) == ["A: the king " + "x" * 150]


def test_ignore_budget_entries_still_come_in():
    lore = book(E("x" * 400, ["a"], insertion_order=9), E("free", ["a"], insertion_order=1,
                                                           ext={"ignore_budget": True}))
    assert got(scan(lore, "a", budget=50)) == ["free"]


def test_a_books_token_budget_can_only_lower_the_callers():
    lore = book(E("x" * 160, ["a"]), token_budget=20)
    assert got(scan(lore, "a", budget=1000)) == []
    assert got(scan(book(E("x" * 160, ["a"]), token_budget=5000), "a", budget=30)) == []


def test_equal_orders_come_out_in_reverse_activation_order():
    # SillyTavern sorts by order, highest first, and prepends each entry to its position.
    lore = book(E("first", ["a"]), E("second", ["a"]))
    assert got(scan(lore, "a")) == ["second", "first"]


def test_hits_come_in_insertion_order_per_position():
    lore = book(E("late", ["a"], insertion_order=9), E("early", ["a"], insertion_order=1),
                E("middle", ["a"], insertion_order=5, position="before_char"))
    result = scan(lore, "a")
    assert result.at("after_char") == ["early", "late"] and result.at("before_char") == ["middle"]


def test_books_are_scanned_in_order_for_the_budget_and_hits_say_where_they_come_from():
    card = book(E("c" * 160, ["a"], insertion_order=1), name="Card")
    world = book(E("w" * 160, ["a"], insertion_order=99, id="dragon"), name="World")
    result = scan([card, world], "a", budget=60)
    assert [(h.book, h.uid) for h in result.hits] == [("Card", "0")]
    assert [(h.book, h.uid) for h in scan([world], "a").hits] == [("World", "dragon")]


# ------------------------------------------------------------------ inclusion groups


def test_group_override_picks_the_highest_order():
    lore = book(E("low", ["a"], insertion_order=1, ext={"group": "weather", "group_override": True}),
                E("high", ["a"], insertion_order=7, ext={"group": "weather", "group_override": True}),
                E("plain", ["a"], insertion_order=9, ext={"group": "weather"}), E("other", ["a"]))
    assert sorted(got(scan(lore, "a"))) == ["high", "other"]


def test_group_winner_is_a_weighted_roll_with_the_given_rng():
    lore = book(E("rare", ["a"], ext={"group": "g", "group_weight": 1}),
                E("common", ["a"], ext={"group": "g", "group_weight": 99}))
    winners = [got(scan(lore, "a", rng=random.Random(seed))) for seed in range(200)]
    assert all(len(w) == 1 for w in winners)
    assert sum(w == ["common"] for w in winners) > 180
    assert winners == [got(scan(lore, "a", rng=random.Random(seed))) for seed in range(200)]


def test_an_entry_may_belong_to_several_groups_and_a_won_group_stays_closed():
    lore = book(E("A: the king", ["castle"], ext={"group": "royals"}),
                E("B: a king too", ["king"], ext={"group": "royals, men"}))
    assert got(scan(lore, "castle")) == ["A: the king"]


def test_group_scoring_keeps_the_best_match():
    lore = book(E("one", ["dragon"], ext={"group": "g", "use_group_scoring": True}),
                E("two", ["dragon", "red"], ext={"group": "g", "use_group_scoring": True}))
    assert got(scan(lore, "a red dragon", rng=random.Random(0))) == ["two"]


# ------------------------------------------------------------------ timed effects


def turns(lore: Lorebook, said: dict[int, str], last: int, start: int = 10) -> list[int]:
    """The turns on which the entry is active, passing the state along as the caller does."""
    state: dict[str, dict] = {}
    active = []
    for turn in range(start, last + 1):
        result = scan(lore, said.get(turn, "nothing"), turn=turn, timed=state)
        state = result.timed
        if result.hits:
            active.append(turn)
    return active


def test_sticky_stays_active_after_its_trigger():
    lore = book(E("s", ["dragon"], ext={"sticky": 3}))
    assert turns(lore, {10: "dragon"}, 15) == [10, 11, 12]
    assert scan(lore, "dragon", turn=10).timed == {"World/0": {"sticky_start": 10, "sticky_until": 13}}


def test_cooldown_blocks_the_entry_after_it_triggered():
    lore = book(E("c", ["dragon"], ext={"cooldown": 2}))
    assert turns(lore, dict.fromkeys(range(10, 16), "dragon"), 15) == [10, 12, 14]


def test_cooldown_starts_when_sticky_ends():
    lore = book(E("sc", ["dragon"], ext={"sticky": 2, "cooldown": 2}))
    assert turns(lore, dict.fromkeys(range(10, 18), "dragon"), 17) == [10, 11, 14, 15]


def test_delay_holds_an_entry_back_until_that_turn():
    lore = book(E("d", ["dragon"], ext={"delay": 5}))
    assert turns(lore, dict.fromkeys(range(0, 8), "dragon"), 7, start=0) == [5, 6, 7]


def test_a_replayed_turn_does_not_keep_its_own_effects():
    lore = book(E("s", ["dragon"], ext={"sticky": 3}))
    first = scan(lore, "dragon", turn=10).timed
    assert scan(lore, "nothing", turn=10, timed=first).hits == []  # a regenerated reply, the key gone
    assert scan(lore, "nothing", turn=11, timed=first).hits != []
    assert first == {"World/0": {"sticky_start": 10, "sticky_until": 13}}  # the caller's state is never changed


def test_effects_of_books_not_loaded_now_are_kept_until_they_run_out():
    state = {"Other/1": {"sticky_start": 10, "sticky_until": 13}}
    assert scan(book(), "x", turn=12, timed=state).timed == state
    assert scan(book(), "x", turn=13, timed=state).timed == {}


# ------------------------------------------------------------------ positions


@pytest.mark.parametrize(("number", "name"), list(enumerate(
    ["before_char", "after_char", "an_top", "an_bottom", "at_depth", "em_top", "em_bottom"])))
def test_sillytavern_positions(number: int, name: str):
    assert scan(book(E("p", constant=True, ext={"position": number})), "x").at(name) == ["p"]


def test_v3_positions_and_the_default():
    result = scan(book(E("b", constant=True, position="before_char"), E("a", constant=True, position="after_char"),
                       E("none", constant=True, insertion_order=1)), "x")
    assert result.at("before_char") == ["b"] and result.at("after_char") == ["a", "none"]


def test_at_depth_carries_depth_and_role():
    result = scan(book(E("deep", constant=True, ext={"position": 4, "depth": 2, "role": 2}),
                       E("default", constant=True, ext={"position": 4})), "x")
    assert {(h.content, h.depth, h.role) for h in result.hits} == {("deep", 2, "assistant"), ("default", 4, "system")}


def test_unplaceable_positions_are_left_out_and_reported():
    lore = book(E("outlet", constant=True, ext={"position": 7}), E("bad", constant=True, ext={"position": 12}))
    assert scan(lore, "x").hits == []
    assert [p for p in book_problems(lore) if "position 12" in p]


def test_decorators_force_or_forbid_activation():
    lore = book(E("@@activate\nalways", ["zzz"]), E("@@dont_activate\nnever", ["x"], constant=True))
    assert got(scan(lore, "x")) == ["always"]


# ------------------------------------------------------------------ problems and the older interface


def test_book_problems_name_wrong_types_and_dead_entries():
    lore = book(E("p", ["a"], ext={"probability": "x", "sticky": [1]}, comment="Odd"), E("dead"),
                extensions={"case_sensitive": "yes"})
    problems = book_problems(lore)
    assert 'entry 0 (Odd): probability \'x\' is not a number; using 100' in problems
    assert any(p.startswith("entry 0 (Odd): sticky") for p in problems)
    assert any(p.startswith("entry 1: has no keys") for p in problems)
    assert any(p.startswith("book: case_sensitive") for p in problems)
    assert got(scan(lore, "a")) == ["p"]  # and the book still works


def test_triggered_entries_keeps_the_older_interface():
    lore = book(E("low " * 50, ["a"], priority=1), E("high " * 50, ["a"], priority=9))
    kept = triggered_entries(lore, ["a"], budget=70)
    assert [e.content[:4] for e in kept] == ["high"]
    assert triggered_entries(None, ["a"]) == []
