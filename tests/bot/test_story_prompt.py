"""Prompt building is pure: cards + turns in, OpenAI messages out (no database, no network)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bot.builtin import builtin_personas
from bot.cards import Card
from bot.story import Memory, PromptParts, build_messages, estimate_tokens
from bot.story.lorebook import triggered_entries
from bot.story.prompt import DEFAULT_SYSTEM_PROMPT, history_step, stop_sequences
from bot.story.scene import PROMPT_MAX_CHARS, clean_image_prompt, scene_prompt_messages
from bot.story.shaping import clean_header, may_become_name_prefix


@dataclass
class T:
    author_kind: str
    text: str
    author_name: str = ""
    attachments: list[dict[str, Any]] = field(default_factory=list)


def card(**data: Any) -> Card:
    base = {"name": "Wren Halloway", "nickname": "Wren", "description": "{{char}} is a detective.",
            "personality": "dry", "scenario": "{{user}} walks into {{char}}'s office."}
    return Card.model_validate({"data": {**base, **data}})


def book(*entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"entries": list(entries), **extra}


def system_of(messages: list[dict[str, Any]]) -> str:
    assert messages[0]["role"] == "system"
    return messages[0]["content"]


def test_card_fields_and_macros_go_into_the_system_message():
    messages = build_messages(PromptParts(card(), "Ann", [T("user", "hello", "Ann")]))
    system = system_of(messages)
    assert "Wren is a detective." in system
    assert "Wren's personality: dry" in system
    assert "Scenario: Ann walks into Wren's office." in system
    assert "{{" not in system
    assert messages[-1] == {"role": "user", "content": "Ann: hello"}


def test_card_system_prompt_replaces_the_default_and_keeps_original_macro():
    parts = PromptParts(card(system_prompt="Be terse. {{original}}"), "Ann", [T("user", "hi", "Ann")])
    messages = build_messages(parts)
    expected_default = DEFAULT_SYSTEM_PROMPT.replace("{{char}}", "Wren").replace("{{user}}", "Ann")
    assert system_of(messages).startswith("Be terse. " + expected_default)


def test_users_keep_their_display_names_and_persona_turns_are_assistant():
    turns = [T("persona", "Evening."), T("user", "I lost a cat", "Ann"), T("user", "me too", "Bo"),
             T("persona", "Two cats."), T("user", "yes", "Ann")]
    messages = build_messages(PromptParts(card(), "Ann", turns))
    assert [m["role"] for m in messages] == ["system", "assistant", "user", "assistant", "user"]
    # Consecutive user turns are merged so strict chat templates accept the alternation.
    assert messages[2]["content"] == "Ann: I lost a cat\n\nBo: me too"
    assert messages[-1]["content"] == "Ann: yes"


def test_post_history_instructions_come_last_with_the_newest_turn():
    messages = build_messages(PromptParts(card(post_history_instructions="Stay in 1947, {{user}}."), "Ann",
                                          [T("user", "hi", "Ann")]))
    assert messages[-1]["role"] == "user"
    assert messages[-1]["content"].endswith("Stay in 1947, Ann.")
    assert messages[-1]["content"].startswith("Ann: hi")


def test_history_is_trimmed_to_the_budget_keeping_the_newest_turns():
    turns = [T("user" if i % 2 else "persona", f"turn {i} " + "words " * 40, "Ann") for i in range(60)]
    messages = build_messages(PromptParts(card(), "Ann", turns, budget=800))
    text = "\n".join(str(m["content"]) for m in messages)
    assert "turn 59 " in text
    assert "turn 0 " not in text
    assert sum(estimate_tokens(str(m["content"])) for m in messages) <= 800
    # Without a budget problem every turn goes in.
    assert "turn 0 " in "\n".join(str(m["content"]) for m in build_messages(PromptParts(card(), "Ann", turns,
                                                                                        budget=100_000)))


def test_a_trimmed_history_starts_on_a_grid_so_the_prompt_prefix_holds_for_several_turns():
    def oldest_kept(count: int, budget: int) -> int:
        turns = [T("user" if i % 2 else "persona", f"turn {i} " + "words " * 40, "Ann") for i in range(count)]
        text = "\n".join(str(m["content"]) for m in build_messages(PromptParts(card(), "Ann", turns, budget=budget)))
        return min(i for i in range(count) if f"turn {i} " in text)

    starts = [oldest_kept(count, 6000) for count in range(100, 116)]  # ~60 turns fit: a grid of 4
    assert all(start % 4 == 0 for start in starts)
    assert starts == sorted(starts) and len(set(starts)) <= 16 // 4 + 1  # moves once per 4 turns
    tight = [oldest_kept(count, 800) for count in range(40, 46)]  # ~12 fit: no grid, nothing lost
    assert tight == list(range(tight[0], tight[0] + 6))
    assert [history_step(n) for n in (0, 15, 16, 31, 32, 64, 200)] == [1, 1, 2, 2, 4, 8, 16]


def test_the_newest_turn_is_kept_even_when_it_alone_is_over_budget():
    huge = "x" * 20_000
    messages = build_messages(PromptParts(card(), "Ann", [T("persona", "old"), T("user", huge, "Ann")], budget=300))
    assert messages[-1]["content"].endswith(huge)
    assert all(m["content"] != "old" for m in messages)


def test_example_dialogue_is_included_when_it_fits_and_dropped_when_not():
    example = "<START>\n{{user}}: Can you find him?\n{{char}}: I find everyone."
    with_room = system_of(build_messages(PromptParts(card(mes_example=example), "Ann", [T("user", "hi", "Ann")])))
    assert "Ann: Can you find him?\nWren: I find everyone." in with_room
    assert "<START>" not in with_room
    long_example = "<START>\n" + "{{char}}: blah " * 2000
    tight = system_of(build_messages(PromptParts(card(mes_example=long_example), "Ann", [T("user", "hi", "Ann")],
                                                 budget=1000)))
    assert "blah" not in tight


def test_media_parts_attach_to_the_newest_user_turn_only():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    older = T("user", "look", "Ann", [{"kind": "image", "filename": "a.png", "caption": "a grey cat"}])
    newest = T("user", "and this", "Ann", [{"kind": "image", "filename": "b.png", "width": 640, "height": 480}])
    messages = build_messages(PromptParts(card(), "Ann", [older, T("persona", "Hm."), newest], media=[image]))
    assert messages[1]["content"] == "Ann: look\n[image: a grey cat]"
    # the part carries no name: the note says what the image is, whether or not the server can see it
    assert messages[-1]["content"] == [
        {"type": "text", "text": "Ann: and this\n[an image was shared: b.png, 640×480]"}, image]


def test_past_voice_messages_appear_as_their_transcript():
    turn = T("user", "", "Ann", [{"kind": "audio", "filename": "v.ogg", "transcript": "where were you"}])
    messages = build_messages(PromptParts(card(), "Ann", [turn]))
    assert messages[-1]["content"] == "Ann: [voice message: where were you]"


def test_lorebook_entries_trigger_on_keywords_case_insensitively():
    entries = book(
        {"keys": ["Calloway"], "content": "The Calloway case ended badly.", "insertion_order": 2},
        {"keys": ["harbour"], "content": "Port Vesper's harbour smells of oil.", "insertion_order": 1},
        {"keys": ["moon"], "content": "Never shown.", "insertion_order": 0},
        {"keys": [], "content": "Always: it rains.", "constant": True, "insertion_order": 5},
        {"keys": ["calloway"], "content": "Disabled entry.", "enabled": False},
    )
    messages = build_messages(PromptParts(card(character_book=entries), "Ann",
                                          [T("user", "Tell me about the CALLOWAY job at the Harbour", "Ann")]))
    system = system_of(messages)
    assert "The Calloway case ended badly." in system
    assert "harbour smells of oil" in system
    assert "Always: it rains." in system
    assert "Never shown." not in system and "Disabled entry." not in system
    # insertion order decides placement
    assert system.index("harbour smells") < system.index("Calloway case") < system.index("Always: it rains.")


def test_lorebook_respects_case_sensitivity_selective_keys_whole_words_and_scan_depth():
    parsed = Card.model_validate({"data": {"name": "W", "character_book": book(
        {"keys": ["Ink"], "content": "case", "case_sensitive": True},
        {"keys": ["ship"], "secondary_keys": ["storm"], "selective": True, "content": "selective"},
        {"keys": ["cat"], "content": "whole word"},
        {"keys": ["old news"], "content": "deep", "insertion_order": 0},
        scan_depth=2)}}).data.character_book
    hits = triggered_entries(parsed, ["old news", "filler", "the ink dried on the ship, a concatenation"])
    assert [e.content for e in hits] == []
    hits = triggered_entries(parsed, ["old news", "filler", "Ink, a ship in a storm, my cat"])
    assert sorted(e.content for e in hits) == ["case", "selective", "whole word"]


def test_lorebook_budget_drops_low_priority_entries_first():
    parsed = Card.model_validate({"data": {"name": "W", "character_book": book(
        {"keys": ["a"], "content": "low " * 50, "priority": 1},
        {"keys": ["a"], "content": "high " * 50, "priority": 9},
    )}}).data.character_book
    kept = triggered_entries(parsed, ["a"], budget=70)
    assert len(kept) == 1 and kept[0].content.startswith("high")


def test_broken_regex_keys_do_not_break_the_prompt():
    parsed = Card.model_validate({"data": {"name": "W", "character_book": book(
        {"keys": ["(unclosed"], "use_regex": True, "content": "bad"},
        {"keys": [r"dr(a|o)gon"], "use_regex": True, "content": "good"},
    )}}).data.character_book
    assert [e.content for e in triggered_entries(parsed, ["a drogon!"])] == ["good"]


def test_summary_goes_into_the_system_message():
    parts = PromptParts(card(), "Ann", [T("user", "hi", "Ann")], memory=Memory(summary="Ann hired Wren."))
    messages = build_messages(parts)
    assert "The story so far: Ann hired Wren." in system_of(messages)


def test_stop_sequences_and_reply_cleaning():
    turns = [T("user", "a", "Bo"), T("persona", "b"), T("user", "c", "Ann")]
    assert stop_sequences(turns, "Ann") == ["\nAnn:", "\nBo:"]
    assert clean_header("Wren: *nods* Fine.", "Wren") == "*nods* Fine."
    assert clean_header("Fine, Wren: whatever.", "Wren") == "Fine, Wren: whatever."
    assert may_become_name_prefix("Wr", "Wren") and may_become_name_prefix(" Wren:", "Wren")
    assert not may_become_name_prefix("Wren: hi", "Wren") and not may_become_name_prefix("Well", "Wren")


def test_builtin_personas_build_prompts_with_no_macro_left():
    for parsed in builtin_personas():
        messages = build_messages(PromptParts(parsed.card, "Ann", [T("user", "hello", "Ann")]))
        assert all("{{" not in str(m["content"]) for m in messages), parsed.card.name


def test_scene_prompt_request_uses_style_appearance_and_recent_turns():
    styled = card(extensions={"masque": {"art_style": "ink noir", "appearance": "grey fedora"}})
    turns = [T("user", f"line {i}", "Ann") for i in range(10)]
    messages = scene_prompt_messages(styled, turns, "Ann")
    user = messages[1]["content"]
    assert "Art style: ink noir" in user and "grey fedora" in user
    assert "line 9" in user and "line 0" not in user
    assert clean_image_prompt('Prompt: "a wet street,\nneon"', "ink noir") == "ink noir, a wet street, neon"
    assert len(clean_image_prompt(" ".join(f"word{i}" for i in range(500)))) == PROMPT_MAX_CHARS
    assert clean_image_prompt("a noir noir Noir street, rain, a noir street, rain") == "a noir street, rain"
