"""Smoke test of the voice benchmark (bench/voice.py): a quick run completes and reports every section
it runs. No thresholds: the figures are the benchmark's to report, not this test's to judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.voice import main

pytestmark = pytest.mark.timeout(180)


def test_quick_run_reports_the_receive_path_and_the_bots_own_latency(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "voice.json"
    figures = main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "1. receive path" in printed and "2. reply latency" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    receive = figures["receive"]
    assert receive["packets"] == 10 * 100 and receive["transport_failures"] == 0
    assert figures["dave"]["dave_failures"] == 0  # every DAVE frame decrypted
    latency = figures["latency_fake_engine"]
    assert latency["utterances"] == 2 and latency["wait_p50_s"] > latency["silence_window_s"] * 0.5
