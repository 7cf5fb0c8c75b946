"""Who speaks next in a group scene, and what each member knows (bot/story/cast.py, pure)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from bot.story.cast import (
    JOIN_TEXT,
    Member,
    Strategy,
    answered_by,
    choose_speaker,
    group_nudge,
    member_aliases,
    named_in,
    present_from,
    scene_members,
    talkativeness,
)

WREN = Member(1, "Wren", member_aliases("Wren", "Wren Halloway", "Wren"), 0.5, "A detective in a wet trench coat.")
ISOLDE = Member(2, "Captain Varga", member_aliases("Captain Varga", "Captain Isolde Varga", "Captain Varga"), 0.9)
MOSS = Member(3, "Old Mossback", member_aliases("Old Mossback", "Old Mossback", None), 0.0)
MARROW = Member(4, "Marrow", (), 1.0)
CAST = [WREN, ISOLDE, MOSS, MARROW]


def test_aliases_address_a_persona_by_first_name_or_past_its_title():
    assert "Isolde" in ISOLDE.names() and "Captain Isolde Varga" in ISOLDE.names()
    assert "Captain" not in ISOLDE.names() and "Old" not in MOSS.names()  # titles address nobody
    assert "Mossback" in MOSS.names() and "Wren Halloway" in WREN.names()


def test_named_in_finds_members_in_the_order_they_are_named():
    assert named_in("Mossback, what does Wren think?", CAST) == [MOSS, WREN]
    assert named_in("isolde!", CAST) == [ISOLDE]
    assert named_in("The wrench is on the table.", CAST) == []  # whole words only


def test_the_addressed_persona_speaks_whatever_the_strategy():
    for strategy in Strategy:
        assert choose_speaker(CAST, "Captain Varga, plot a course.", strategy=strategy, last_speaker=2) == ISOLDE
        assert choose_speaker(CAST, "and then?", reply_to=3, strategy=strategy) == MOSS  # a reply to its message
    # a reply to a persona's message beats a name in the text
    assert choose_speaker(CAST, "Wren says no.", reply_to=4) == MARROW


def test_round_robin_goes_in_cast_order_after_the_last_speaker():
    picks, last = [], None
    for _ in range(5):
        chosen = choose_speaker(CAST, "go on", last_speaker=last, strategy=Strategy.ROUND_ROBIN)
        picks.append(chosen.persona_id)
        last = chosen.persona_id
    assert picks == [1, 2, 3, 4, 1]


def test_random_never_picks_the_one_who_just_spoke():
    rng = random.Random(7)
    picks = Counter(choose_speaker(CAST, "go on", last_speaker=2, strategy=Strategy.RANDOM, rng=rng).persona_id
                    for _ in range(300))
    assert set(picks) == {1, 3, 4}


def test_natural_follows_talkativeness_and_skips_the_last_speaker():
    rng = random.Random(3)
    picks = Counter(choose_speaker(CAST, "go on", last_speaker=4, strategy=Strategy.NATURAL, rng=rng).persona_id
                    for _ in range(2000))
    assert 4 not in picks  # Marrow just spoke, however talkative
    assert picks[2] > picks[1] > picks[3]  # 0.9 beats 0.5 beats 0.0 (Mossback only when nobody passes)


def test_manual_waits_for_a_person_unless_someone_is_addressed():
    assert choose_speaker(CAST, "go on", strategy=Strategy.MANUAL) is None
    assert choose_speaker(CAST, "Wren?", strategy=Strategy.MANUAL) == WREN
    assert choose_speaker([WREN], "go on", strategy=Strategy.MANUAL) == WREN  # a story of one always answers


def test_personas_answer_each_other_within_the_limit_and_never_themselves():
    assert answered_by(CAST, "Isolde, is that true?", speaker=1, in_a_row=1, limit=2) == ISOLDE
    assert answered_by(CAST, "Isolde, is that true?", speaker=1, in_a_row=2, limit=2) is None
    assert answered_by(CAST, "I, Wren, say so.", speaker=1, in_a_row=1, limit=2) is None
    assert answered_by(CAST, "Nobody here.", speaker=1, in_a_row=1, limit=5) is None


@dataclass
class T:
    author_kind: str
    text: str
    persona_id: int | None = None


def test_a_persona_added_mid_story_knows_only_what_happened_since():
    turns = [T("persona", "Hello.", 1), T("user", "A secret."), T("system", JOIN_TEXT.format(name="Marrow"), 4),
             T("user", "Welcome, Marrow.")]
    assert present_from(turns, 4, "Marrow") == 2
    assert present_from(turns, 1, "Wren") == 0  # there from the start


def test_scene_members_and_the_group_nudge():
    text = scene_members(CAST, speaker=1)
    assert "- Captain Varga" in text and "- Marrow" in text and "Wren" not in text
    nudge = "[Write the next reply only as Wren. Do not write for Pip, Marrow.]"
    assert group_nudge("Wren", ["Pip", "Marrow"]) == nudge


def test_talkativeness_reads_sillytaverns_string():
    assert talkativeness({"talkativeness": "0.8"}) == 0.8
    assert talkativeness({"talkativeness": "loud"}) == 0.5 and talkativeness({}) == 0.5
    assert talkativeness({"talkativeness": 3}) == 1.0


def test_a_persona_s_card_is_parsed_once_and_again_when_its_card_changes():
    from bot.cast import persona_card
    from bot.store import Persona

    def v3(name: str) -> dict:
        return {"spec": "chara_card_v3", "spec_version": "3.0",
                "data": {"name": name, "description": "d", "first_mes": "hi"}}

    persona = Persona(name="Ada", card=v3("Ada"))
    card = persona_card(persona)
    assert card.data.name == "Ada"
    assert persona_card(persona) is card  # the same parse while the row is the same
    persona.card = v3("Bea")  # an updated row (as the store loads it after an edit)
    assert persona_card(persona).data.name == "Bea"
    assert persona_card(Persona(name="Ada", card=v3("Ada"))) is not card  # another row parses its own
