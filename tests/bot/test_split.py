"""Splitting replies at Discord's 2000-character limit."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.discord_io.split import DISCORD_MESSAGE_LIMIT, split_message

WORDS = st.text(alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters=".,!?'-"),
                min_size=1, max_size=30)


def _words(text: str) -> list[str]:
    return text.split()


def test_short_text_is_one_piece():
    assert split_message("  Hello there.  ") == ["Hello there."]
    assert split_message("") == []


def test_prefers_paragraph_breaks():
    first, second = "a" * 60 + " " + "b" * 60, "c" * 50
    pieces = split_message(f"{first}\n\n{second}", limit=140)
    assert pieces == [first, second]


def test_prefers_sentence_end_over_a_mid_sentence_space():
    text = "One two three four. Five six seven eight nine ten eleven twelve"
    assert split_message(text, limit=50)[0] == "One two three four."


@settings(max_examples=150, deadline=None)
@given(st.lists(WORDS, min_size=1, max_size=400), st.sampled_from([" ", "\n", "\n\n", ". "]))
def test_pieces_fit_and_keep_every_word_whole(words, sep):
    text = sep.join(words)
    pieces = split_message(text, limit=120)
    assert all(0 < len(p) <= 120 for p in pieces)
    assert _words(" ".join(pieces)) == _words(text)


def test_only_an_overlong_word_is_cut():
    word = "x" * 250
    pieces = split_message(f"short {word} end", limit=100)
    assert all(len(p) <= 100 for p in pieces)
    assert "".join(pieces).replace(" ", "") == f"short{word}end"


def test_code_block_is_closed_and_reopened_with_its_language():
    code = "\n".join(f"    line_{i} = {i}" for i in range(200))
    text = f"Here is code:\n```python\n{code}\n```\nDone."
    pieces = split_message(text)
    assert len(pieces) > 1
    for piece in pieces:
        assert len(piece) <= DISCORD_MESSAGE_LIMIT
        assert len(re.findall(r"^```", piece, re.M)) % 2 == 0, piece[-80:]
    assert all(p.startswith("```python\n") for p in pieces[1:-1])
    # Indentation inside the block survives the cut.
    assert "\n    line_1 = 1" in pieces[0]
    body = [line for p in pieces for line in p.split("\n") if line.startswith("    line_")]
    assert body == code.split("\n")


def test_does_not_leave_bold_or_spoilers_open_when_it_can_avoid_it():
    text = "intro " * 5 + "**" + "bold words " * 8 + "end**" + " tail" * 5
    pieces = split_message(text, limit=80)
    for piece in pieces:
        assert piece.count("**") % 2 == 0, pieces


def test_limit_too_small_is_refused():
    with pytest.raises(ValueError):
        split_message("abc", limit=10)
