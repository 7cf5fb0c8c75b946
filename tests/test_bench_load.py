"""Smoke test of the load benchmark (bench/load.py) on PostgreSQL: a tiny run (4 guilds x 2 channels, 2 shards
in 2 bot processes, 1 round) completes with exactly one reply per message, none lost or duplicated, each
channel answered by the process running its guild's shard, and both processes answering. No thresholds on
the figures: they are the benchmark's to report, not this test's to judge."""

from __future__ import annotations

import pytest

from bench.load import main, shard_ids_setting, shard_split
from tests.conftest import require_postgres

pytestmark = pytest.mark.timeout(120)


def test_shards_are_split_in_runs_over_the_processes() -> None:
    assert shard_split(4, 2) == [[0, 1], [2, 3]]
    assert shard_split(3, 2) == [[0], [1, 2]]
    assert [shard_ids_setting(ids) for ids in shard_split(4, 2)] == ["0-1", "2-3"]
    assert shard_ids_setting([1]) == "1" and shard_ids_setting([0, 2]) == "0,2"


def test_a_tiny_load_run_answers_every_message_once_from_its_shards_process(
        capsys: pytest.CaptureFixture[str]) -> None:
    require_postgres()  # the benchmark makes its own fresh database on that server, and drops it
    figures = main(["--shards", "2", "--processes", "2", "--guilds", "4", "--channels", "8", "--rounds", "1",
                    "--engine-delay", "0.05"])
    printed = capsys.readouterr().out
    assert "load benchmark: 8 channels in 4 guilds, 2 shards in 2 bot processes" in printed
    assert figures["messages"] == 16  # the warm-up round and the measured one, 8 channels each
    assert figures["lost"] == [] and figures["duplicated"] == [] and figures["wrong_process"] == []
    assert figures["replies_per_message"] == {1: 16}
    first, second = figures["per_process"]
    assert first["shards"] == [0] and second["shards"] == [1]
    assert set(first["shard_channels"]) == {0} and set(second["shard_channels"]) == {1}  # only their own shard
    assert first["shard_channels"][0] + second["shard_channels"][1] == 16  # both answered, every message once
    assert first["shard_channels"][0] > 0 and second["shard_channels"][1] > 0
    assert first["cpu_ms_per_message"] > 0 and second["cpu_ms_per_message"] > 0
    assert 0 <= figures["p50_ms"] <= figures["p99_ms"] and figures["msg_per_s"] > 0
