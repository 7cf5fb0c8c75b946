"""Smoke test of the bot benchmark (bench/bot.py): a tiny run comparing a one-persona story with a
two-persona scene completes, reports every section and asks each addressed persona to speak. No
thresholds: the figures are the benchmark's to report, not this test's to judge."""

from __future__ import annotations

import pytest

from bench.bot import main

SECTIONS = ("bot benchmark:", "bot added latency p99", "bot CPU per message", "prompt size per speaker",
            "store time per message", "scene art (1 persona)")


def test_compare_cast_reports_both_columns(capsys: pytest.CaptureFixture[str]) -> None:
    figures = main(["--channels", "2", "--rounds", "1", "--compare-cast", "2", "--scene-rounds", "1",
                    "--engine-delay", "0.01", "--breakdown"])
    printed = capsys.readouterr().out
    assert all(section in printed for section in SECTIONS)
    one, two = figures["1 persona"], figures["2 personas"]
    assert one["messages"] == two["messages"] == 2
    for column in (one, two):
        assert column["bot_cpu_ms"] > 0 and 0 <= column["p50_ms"] <= column["p99_ms"] <= column["max_ms"]
        assert 0 < column["memory_cpu_ms"] < column["bot_cpu_ms"]  # the memory work each round left
        # a post and its final edit (typing too only if nothing showed within a second: a slow machine)
        assert 2 <= column["rest_per_reply"] <= 3 and column["chats_per_message"] == 1  # no chained replies
        assert column["speaker_checked"] == 2 and column["speaker_wrong"] == []
    assert list(one["speakers"]) == ["Wren"]
    assert set(two["speakers"]) == {"Wren", "Captain Varga"}  # each addressed in turn, under its display name
    assert two["speakers"]["Wren"]["system_chars"] > one["speakers"]["Wren"]["system_chars"]  # the scene members
    assert figures["scene_art"]["hits"] + figures["scene_art"]["misses"] == 2
