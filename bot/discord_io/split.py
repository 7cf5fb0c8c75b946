"""Split long text into Discord-sized messages without breaking words, code fences or inline markdown."""

from __future__ import annotations

import re

DISCORD_MESSAGE_LIMIT = 2000
FENCE = "```"
_FENCE_CLOSE = "\n" + FENCE
# Where a cut may fall, best first: a paragraph, a line, a sentence end, any space.
_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.!?…])\s"), re.compile(r"\s"))
_PAIRED_MARKERS = ("**", "__", "~~", "||")
_FLOORS = (2, 2, 3, 0)  # a cut of tier i must keep at least budget // floor characters (0: any)
_MARKER_RESERVE = sum(len(m) for m in _PAIRED_MARKERS) + 1  # room to close spans left open
_FENCED_BLOCK = re.compile(r"```.*?(```|$)", re.S)


def split_message(text: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[str]:
    """Cut `text` into pieces of at most `limit` characters.

    Cuts prefer paragraph, line, sentence and word boundaries (in that order),
    avoid leaving bold/strike/spoiler/inline-code spans open, and a code block
    cut in two is closed at the end of one piece and reopened (same language)
    at the start of the next. A single word longer than a piece is the only
    thing ever cut mid-word.
    """
    if limit < 2 * len(_FENCE_CLOSE) + 16:
        raise ValueError(f"limit {limit} is too small to split markdown")
    text = text.strip()
    pieces: list[str] = []
    fence: str | None = None  # the opening line of a code block still open at the cut
    while text:
        prefix = f"{fence}\n" if fence else ""
        if len(prefix) + len(text) <= limit:
            pieces.append(prefix + text)
            break
        budget = limit - len(prefix) - len(_FENCE_CLOSE) - _MARKER_RESERVE
        cut, skip = _find_cut(text, budget, inside_fence=fence is not None)
        piece, text = text[:cut], text[cut + skip:]
        fence = _open_fence_after(piece, fence)
        if fence:
            piece += _FENCE_CLOSE
            text = text.lstrip("\n")
        else:
            piece, text = piece.rstrip(), text.lstrip()
            # A span longer than a whole message: close it here, reopen it in the next piece.
            still_open = _open_markers(piece)
            piece += "".join(reversed(still_open))
            text = "".join(still_open) + text
        if piece.strip():
            pieces.append(prefix + piece)
    return pieces


def _find_cut(text: str, budget: int, *, inside_fence: bool) -> tuple[int, int]:
    """(cut position, separator length to drop) for the best break within `budget` characters."""
    window = text[: budget + 1]
    for require_balance in (True, False):
        for tier, pattern in enumerate(_BREAKS):
            floor = budget // _FLOORS[tier] if _FLOORS[tier] else 1
            for match in reversed(list(pattern.finditer(window))):
                start = match.start()
                if start < floor or start > budget:
                    continue
                if not require_balance or inside_fence or _inline_balanced(window[:start]):
                    return start, match.end() - match.start()
    return budget, 0  # one word longer than a whole message: the only mid-word cut


def _inline_balanced(text: str) -> bool:
    """True when no bold/underline/strike/spoiler/inline-code span is left open in `text`."""
    return not _open_markers(text)


def _open_markers(text: str) -> list[str]:
    """The inline markers left open at the end of `text`, in the order they were opened."""
    prose = _FENCED_BLOCK.sub("", text)
    markers = [m for m in _PAIRED_MARKERS if prose.count(m) % 2]
    if prose.count("`") % 2:
        markers.append("`")
    return sorted(markers, key=prose.rfind)


def _open_fence_after(piece: str, fence: str | None) -> str | None:
    """The fence opening line still open at the end of `piece` (given the one open at its start)."""
    for line in piece.split("\n"):
        stripped = line.strip()
        if not stripped.startswith(FENCE):
            continue
        if fence is None:
            fence = stripped if stripped.count(FENCE) == 1 else None
        elif stripped == FENCE or stripped.endswith(FENCE):
            fence = None
    return fence
