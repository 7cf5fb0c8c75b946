"""The role-play quality benchmark (bench/quality.py): its rule scores on hand-written replies, and a
smoke run on the real offline engine that reports every configuration. No score thresholds: the
figures are the benchmark's to report, not this test's to judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality import (
    BASELINE,
    JUDGE_PROMPT,
    QUICK_SCRIPTS,
    QUICK_TURNS,
    asked_words,
    assistant_speak,
    impersonates,
    load_scripts,
    loops,
    main,
    main_async,
    over_length,
    parse_args,
    parse_judge,
    score,
    unfinished,
    words,
    wrong_speaker,
)
from tests.fakes.fake_vllm import FakeVLLM

CLEAN = ('*Wren taps her pen against the desk and studies the photograph.* "Pretty girl. Singers at the Blue '
         'Heron make enemies the way sailors make debts." *She pockets it.* "Forty dollars buys you two days."')
OTHERS = ["Jonah", "Dex Okafor"]


def test_a_clean_reply_scores_clean() -> None:
    noir = load_scripts(["noir"])[0]
    assert score(CLEAN, previous="*She lights a cigarette.* \"Go on.\"", script=noir) == {
        "empty": False, "loop": False, "unfinished": False, "impersonation": False, "assistant": False,
        "wrong_speaker": None, "words": len(words(CLEAN)), "asked": 100, "over": False}


@pytest.mark.parametrize("reply", [
    "You're a noir noir. You're a noir noir.",  # a sentence said twice
    "the rain the rain the rain falls and the rain the rain keeps on falling down the rain",  # 3-gram x3
    "no no no no no no no no no no no no no no no no",  # distinct-2 near zero
])
def test_loops(reply: str) -> None:
    assert loops(reply)


def test_a_sentence_of_the_previous_reply_is_a_loop() -> None:
    previous = '*She pulls her hat lower.* "I have heard worse stories from better liars."'
    assert loops('"I have heard worse stories from better liars." *She shrugs.*', previous)
    assert not loops('"Better liars than you have sat in that chair." *She shrugs.*', previous)
    assert not loops("*She nods.* Fine. *She nods.*")  # short stock actions repeat naturally


@pytest.mark.parametrize(("reply", "expected"), [
    ("*She nods.*\nJonah: Thanks, Wren.", True),  # the user's line
    ("Fine.\nDex: Uh, Captain? The reactor...", True),  # the NPC's line
    ("She shrugs.\nYou say to her: let's go.", True),  # narrating the user's speech
    ('You reply, "I am not scared."', True),
    ("You say that like it's easy. *She laughs.*", False),  # the persona talking to the user
    (CLEAN, False),
])
def test_impersonation(reply: str, expected: bool) -> None:
    assert impersonates(reply, OTHERS) is expected


@pytest.mark.parametrize(("reply", "expected"), [
    ("She reaches for the door and", True),
    ('"Stay close," she says, and then', True),
    ("*She leans into the*", True),  # an action shaping closed after a cut
    ("*She nods.*", False), ('"Go."', False), ("*smiles*", False), ("Really?", False), ("", False),
])
def test_unfinished(reply: str, expected: bool) -> None:
    assert unfinished(reply) is expected


def test_length_against_the_cards_ask() -> None:
    assert asked_words("Keep replies under 80 words.") == 80
    assert asked_words("keep each reply under 200 words", "Keep replies under 100 words.") == 100  # the smallest
    assert asked_words("Be vivid.") is None
    assert over_length(89, 80) and not over_length(88, 80) and not over_length(500, None)


@pytest.mark.parametrize(("reply", "expected"), [
    ("As an AI language model, I cannot role-play this.", True),
    ("How can I assist you today?", True),
    ("I'm sorry, but I can't continue this story.", True),
    ("I'm happy to help with your writing.", True),
    ("Here's a translation of the User's text into a Python code snippet:", True),
    ('"Here\'s the deal, kid." *She taps the photograph.*', False),
    ('"Sorry, kid. I can\'t help you with that one." *She looks away.*', False),
    (CLEAN, False),
])
def test_assistant_speak(reply: str, expected: bool) -> None:
    assert assistant_speak(reply) is expected


def test_wrong_speaker() -> None:
    assert wrong_speaker("Dex Okafor: Reactor's hot!", "Dex Okafor")
    assert wrong_speaker('*Varga nods.* "Go."\n**Dex:** On it, Captain.', "Dex Okafor")
    assert not wrong_speaker('*Varga glances at Dex.* "Dex: report."', "Dex Okafor")  # mid-line: her words


def test_parse_judge() -> None:
    assert parse_judge("4") == 4 and parse_judge("Score: 5/5") == 5
    assert parse_judge("I'd say three.") is None and parse_judge("0") is None and parse_judge("") is None


async def test_any_server_and_the_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    """--engine-url/--model and MASQUE_JUDGE_URL against a fake vLLM whose story replies run on into the
    user's line: shaping cuts it from ours, the baseline shows it; every reply shown gets the judge's 4."""
    judge_opening = JUDGE_PROMPT.split("{", 1)[0]

    def reply(body: dict) -> str:
        if str(body["messages"][-1]["content"]).startswith(judge_opening):
            return "4 - in character"
        return '*A slow nod.* "Go on. I am listening."\nUser: Thanks.'

    fake = FakeVLLM(reply=reply, model="story-model")
    await fake.start()
    try:
        monkeypatch.setenv("MASQUE_JUDGE_URL", fake.url)
        monkeypatch.setenv("MASQUE_JUDGE_MODEL", "story-model")
        figures = await main_async(parse_args(["--engine-url", fake.url, "--model", "story-model", "--turns", "2"]))
    finally:
        await fake.stop()
    rows = figures["results"]["story-model"]
    assert figures["windows"]["story-model"] == fake.max_model_len
    assert rows["ours (roleplay)"]["impersonations"] == 0 and rows[BASELINE]["impersonations"] == 6
    for row in rows.values():
        assert row["replies"] == 6 and row["errors"] == 0 and row["judge_mean"] == 4.0 and row["judged"] == 6


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_reports_every_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASQUE_JUDGE_URL", raising=False)
    out = tmp_path / "quality.json"
    figures = main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    configs = ["ours (roleplay)", BASELINE]
    assert figures["plan"]["configs"] == configs and figures["plan"]["scripts"] == list(QUICK_SCRIPTS)
    assert all(config in printed for config in configs)
    replies = len(QUICK_SCRIPTS) * QUICK_TURNS
    for model, rows in figures["results"].items():
        assert model in printed and figures["windows"][model] > 0
        assert list(rows) == configs
        for row in rows.values():
            assert row["replies"] == replies and row["errors"] == 0
            assert row["group_replies"] == QUICK_TURNS  # one of the two scripts is the group scene
            for key in ("loops", "unfinished", "impersonations", "assistant_speak", "over_length", "empty"):
                assert isinstance(row[key], int) and 0 <= row[key] <= replies
            assert 0 <= row["wrong_speaker"] <= row["group_replies"]
            assert row["mean_words"] >= 0 and row["mean_asked"] > 0 and row["mean_latency_s"] > 0
            assert row["judge_mean"] is None
    assert len(figures["replies"]) == replies * len(configs) * len(figures["results"])
