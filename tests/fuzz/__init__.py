"""Fuzz tests (hypothesis): parsers and request handlers meet junk and answer with their own clear error.

Every test uses `fuzz()` for its settings: a bounded, derandomized run in CI (same examples every
run, no example database), and more examples locally with MASQUE_FUZZ_EXAMPLES=2000 (then random
ones: derandomize is off when the count is raised, so each local run explores new ground).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_ENV = "MASQUE_FUZZ_EXAMPLES"


def fuzz(examples: int) -> settings:
    """Settings for one fuzz test: `examples` in CI, MASQUE_FUZZ_EXAMPLES when set."""
    local = int(os.environ.get(FUZZ_ENV, "0") or 0)
    return settings(
        max_examples=local or examples,
        deadline=None,
        derandomize=not local,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
