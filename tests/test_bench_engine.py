"""Smoke test of the engine benchmark's sampler mode (``bench/engine.py --samplers``): a tiny
run on the offline model completes and prints a row for every sampler set. No thresholds: the
figures are the benchmark's to report, not this test's to judge."""

from __future__ import annotations

import re

import pytest
import torch

from bench.engine import SAMPLER_SETS, main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_sampler_mode_prints_every_set(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()  # --threads sets them for the whole process
    try:
        main(["--samplers", "--max-tokens", "2", "--levels", "1,2", "--rounds", "1",
              "--dtype", "float32", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    table = printed[printed.index("Samplers:"):]
    for name in SAMPLER_SETS:
        row = re.search(rf"^ *{re.escape(name)} \|(.*)$", table, re.MULTILINE)
        assert row, name
        figures = [float(cell) for cell in row.group(1).split("|")]
        assert len(figures) == 4 and all(figure > 0 for figure in figures)  # 2 levels x 2 columns
