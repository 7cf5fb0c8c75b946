"""Card macros: `{{char}}`, `{{user}}`, `{{random:a,b}}`, `{{pick:a,b}}`, `{{roll:d20}}`.

Expanded when a prompt or greeting is built, never stored expanded, so a card
keeps working when the user's name or the persona's nickname changes.
"""

from __future__ import annotations

import random
import re
import zlib

_MACRO = re.compile(r"\{\{\s*(char|user|random|pick|roll)\s*(?::(.*?))?\}\}", re.IGNORECASE | re.DOTALL)
_LEGACY = {"<BOT>": "{{char}}", "<USER>": "{{user}}"}
_DICE = re.compile(r"^\s*(\d*)\s*d?\s*(\d+)\s*$", re.IGNORECASE)
_MAX_DICE = 100
_RNG = random.Random()  # when the caller passes none (seeding a new one per call costs more than the rest)


def expand(text: str, *, char: str, user: str, seed: int = 0, rng: random.Random | None = None) -> str:
    """Expand the macros in `text`.

    `{{pick}}` is stable for a given `seed` and position (a story shows the same
    pick every time its prompt is rebuilt); `{{random}}` and `{{roll}}` use `rng`.
    Unknown macros are left as they are.
    """
    rng = rng or _RNG
    for legacy, macro in _LEGACY.items():
        text = text.replace(legacy, macro)

    def substitute(match: re.Match[str]) -> str:
        name, arg = match.group(1).lower(), match.group(2)
        if name == "char":
            return char
        if name == "user":
            return user
        if arg is None:
            return match.group(0)
        if name == "random":
            return rng.choice(_options(arg))
        if name == "pick":
            picker = random.Random(zlib.crc32(f"{seed}:{match.start()}:{arg}".encode()))
            return picker.choice(_options(arg))
        return _roll(arg, rng) or match.group(0)

    return _MACRO.sub(substitute, text)


def _options(arg: str) -> list[str]:
    # `::` separates options when an option itself contains commas.
    parts = arg.split("::") if "::" in arg else arg.split(",")
    return [p.strip() for p in parts] or [""]


def _roll(arg: str, rng: random.Random) -> str | None:
    match = _DICE.match(arg)
    if not match:
        return None
    count = min(int(match.group(1) or 1), _MAX_DICE)
    sides = int(match.group(2))
    if sides < 1:
        return None
    return str(sum(rng.randint(1, sides) for _ in range(count)))
