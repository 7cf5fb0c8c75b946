"""Smoke test of the memory benchmark (bench/memory.py): a quick run completes and reports every
section. No score thresholds: the figures are the benchmark's to report, not this test's to judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.memory import CONFIGS, main

SECTIONS = ("1. fact recall", "2. prompt build time", "3. memory work per turn")


def test_quick_run_reports_every_section(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASQUE_BENCH_ENGINE_URL", raising=False)  # the fakes only
    out = tmp_path / "memory.json"
    figures = main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert all(section in printed for section in SECTIONS)
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))

    assert list(figures["fact_recall"]) == list(CONFIGS)
    for run in figures["fact_recall"].values():
        assert run["asked"] == figures["plan"]["facts"] and 0 <= run["found"] <= run["asked"]
        assert run["turns_not_embedded"] >= 0  # reported, not judged (the newest reply may still wait)
    sqlite = figures["build_time"]["sqlite"]
    assert sqlite["builds"] == 40 and sqlite["cpu_p99_ms"] > 0
    assert "skipped" in figures["build_time"]["postgres"] or figures["build_time"]["postgres"]["cpu_p99_ms"] > 0
    for work in figures["memory_work"].values():
        assert work["embedding_inputs_per_turn"] > 0 and work["background_requests"] > 0
