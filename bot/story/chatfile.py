"""Story files that travel: SillyTavern chat JSONL (export and import) and Masque JSON (export).

SillyTavern's chat file (as 1.12 writes it: `saveChat` in public/script.js, `/api/chats/save`
in src/endpoints/chats.js) is JSON Lines joined by "\\n": line 1 is a header
`{user_name, character_name, create_date, chat_metadata}`, every further line one message
`{name, is_user, is_system, send_date, mes, extra, swipes?, swipe_id?, swipe_info?}`.
ST keeps `swipes[swipe_id] == mes` (saveReply, updateMessage) and shows `mes`; `is_system: true`
means "hidden from the prompt" (/hide, /comment, ST's own help notes); narrator messages
(/sys) are `is_system: false, extra.type: "narrator"`, named "System".

Masque JSON (`{"format": "masque.story", "version": 1, ...}`) is the lossless shape: every turn
with all swipes, attachment metadata and author ids. See `to_masque_json` for the fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from bot.story.prompt import render_turn

MAX_CHAT_FILE_BYTES = 20 * 1024 * 1024
MASQUE_FORMAT = "masque.story"
MASQUE_VERSION = 1
ST_NARRATOR_NAME = "System"  # NARRATOR_NAME_DEFAULT in ST's slash-commands.js
ST_SYSTEM_AVATAR = "img/five.png"  # system_avatar in ST's script.js; every ST install serves it
# extra.type of ST's own UI notes (system_message_types in script.js, less "narrator"):
# help pages, welcome screens, /comment. They were never part of the story, so import skips them.
ST_UI_MESSAGE_TYPES = frozenset({
    "help", "welcome", "group", "empty", "generic", "comment", "slash_commands",
    "formatting", "hotkeys", "macros", "welcome_prompt", "assistant_note",
})
_MONTHS = ("january", "february", "march", "april", "may", "june", "july",
           "august", "september", "october", "november", "december")


class ChatFileError(ValueError):
    """A chat file that cannot be read; says which file, which line (1-based), which field, and why."""

    def __init__(self, source: str, line: int | None, field: str | None, reason: str):
        self.source, self.line, self.field, self.reason = source, line, field, reason
        where = [source, *([f"line {line}"] if line is not None else []), *([field] if field else [])]
        super().__init__(f"{': '.join(where)}: {reason}")


class SwipeLike(Protocol):
    index: int
    text: str


class ChatTurn(Protocol):
    """What the exporters read from a turn (bot.store.Turn fits; tests pass plain dataclasses)."""

    position: int
    author_kind: str  # "user" | "persona" | "narrator" | "system"
    author_name: str
    author_id: int | None
    text: str  # the selected swipe's text
    swipes: Sequence[SwipeLike]
    selected_swipe: int  # a position in `swipes`
    attachments: list[dict[str, Any]]
    created_at: datetime


@dataclass
class ImportedTurn:
    author_kind: str  # "user" | "persona" | "narrator"
    author_name: str
    text: str  # the selected swipe's text
    swipes: list[str]  # persona turns: all alternatives ([] for users and narrators)
    selected_swipe: int
    created_at: datetime | None


@dataclass
class ImportedChat:
    user_name: str
    character_name: str
    turns: list[ImportedTurn]


# ---------------------------------------------------------------- SillyTavern export


def to_sillytavern_jsonl(turns: Sequence[ChatTurn], *, character_name: str, user_name: str,
                         created_at: datetime) -> bytes:
    """The story as a SillyTavern chat file (Import Chat in ST's chat menu reads it; swipes kept)."""
    header = {
        "user_name": user_name,
        "character_name": character_name,
        "create_date": _st_create_date(created_at),
        "chat_metadata": {},
    }
    messages = [_st_message(t, character_name, user_name) for t in turns]
    # Compact JSON joined by "\n" without a trailing newline: byte for byte how ST saves.
    return "\n".join(json.dumps(m, ensure_ascii=False, separators=(",", ":")) for m in [header, *messages]).encode()


def _st_message(turn: ChatTurn, character_name: str, user_name: str) -> dict[str, Any]:
    # Media notes go into `mes` (ST has no copy of the files; Discord links expire).
    mes = render_turn(turn) if turn.attachments else turn.text
    send_date = _st_send_date(turn.created_at)
    kind = str(turn.author_kind)
    if kind == "user":
        return {"name": turn.author_name or user_name, "is_user": True, "is_system": False,
                "send_date": send_date, "mes": mes, "extra": {"isSmallSys": False}}
    if kind == "persona":
        swipes, swipe_id = _st_swipes(turn, mes)
        return {"name": turn.author_name or character_name, "is_user": False, "is_system": False,
                "send_date": send_date, "mes": mes, "extra": {},
                "swipe_id": swipe_id, "swipes": swipes,
                "swipe_info": [{"send_date": send_date, "extra": {}} for _ in swipes]}
    # Narrator and system turns are both notes the prompt shows to the model: ST's /sys shape.
    return {"name": turn.author_name or ST_NARRATOR_NAME, "is_user": False, "is_system": False,
            "send_date": send_date, "mes": mes, "force_avatar": ST_SYSTEM_AVATAR,
            "extra": {"type": "narrator", "isSmallSys": False}}


def _st_swipes(turn: ChatTurn, mes: str) -> tuple[list[str], int]:
    texts = [s.text for s in sorted(turn.swipes, key=lambda s: s.index)]
    if not texts:
        return [mes], 0
    selected = max(0, min(turn.selected_swipe, len(texts) - 1))
    texts[selected] = mes  # ST's invariant: swipes[swipe_id] is what `mes` shows
    return texts, selected


# ---------------------------------------------------------------- SillyTavern dates


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _st_send_date(moment: datetime) -> str:
    """ST's "humanized" date, `2024-6-5 @14h 56m 50s 682ms` (humanizedISO8601DateTime in src/util.js).

    ST's server writes it into the messages of every chat it imports, and ST's parseTimestamp
    (public/scripts/utils.js) reads it as UTC, so the reader sees the right local time; the
    "June 19, 2023 2:20pm" form ST's browser writes is read as local time and drops seconds.
    """
    m = _utc(moment)
    return (f"{m.year}-{m.month}-{m.day} @{m.hour:02d}h {m.minute:02d}m {m.second:02d}s "
            f"{m.microsecond // 1000:03d}ms")


def _st_create_date(moment: datetime) -> str:
    """The header's date as ST's browser writes it: `2024-07-12@01h31m37s` (humanizedDateTime)."""
    return f"{_utc(moment):%Y-%m-%d@%Hh%Mm%Ss}"


_ST_HUMANIZED = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2}) ?@(\d{1,2})h ?(\d{1,2})m ?(\d{1,2})s(?: (\d{1,3})ms)?")
_ST_MERIDIEM = re.compile(r"(\w+)\s(\d{1,2}),\s(\d{4})\s(\d{1,2}):(\d{1,2})(am|pm)", re.IGNORECASE)


def parse_st_date(value: Any) -> datetime | None:
    """A `send_date` the way ST's parseTimestamp reads it, in UTC; None when ST could not read it either.

    Accepts unix milliseconds (number or digits), "June 19, 2023 2:20pm" (ST's browser; its
    zone is unknown, so taken as UTC), the humanized forms, and ISO 8601 (other tools).
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float) or value == "":
        return None
    try:
        if not isinstance(value, str) or value.isdigit():
            millis = float(value)
            return datetime.fromtimestamp(millis / 1000, UTC) if millis >= 0 else None
        if match := _ST_MERIDIEM.search(value):
            return _from_meridiem(*match.groups())
        if match := _ST_HUMANIZED.search(value):
            year, month, day, hour, minute, second, ms = match.groups()
            return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                            int((ms or "0").zfill(3)) * 1000, tzinfo=UTC)
        return _utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except (ValueError, OverflowError, OSError):
        return None


def _from_meridiem(month: str, day: str, year: str, hour: str, minute: str, meridiem: str) -> datetime | None:
    prefix = month.lower()  # moment reads "June" and "Jun" alike
    number = next((i for i, name in enumerate(_MONTHS, 1) if len(prefix) >= 3 and name.startswith(prefix)), None)
    if number is None:
        return None
    hour24 = int(hour) % 12 + (12 if meridiem.lower() == "pm" else 0)
    return datetime(int(year), number, int(day), hour24, int(minute), tzinfo=UTC)


# ---------------------------------------------------------------- Masque JSON


def to_masque_json(turns: Sequence[ChatTurn], *, title: str, persona_name: str, created_at: datetime,
                   summary: str = "", extra: dict[str, Any] | None = None) -> bytes:
    """The story as Masque JSON, version 1: nothing the store keeps as text is left out.

    Shape: {"format": "masque.story", "version": 1, "title", "persona_name", "created_at",
    "summary", "extra": {...caller's...}, "turns": [{"position", "author_kind", "author_name",
    "author_id", "text", "selected_swipe", "swipes": [{"index", "text"}], "attachments":
    [{kind, filename, url, content_type, size, transcript?, caption?}], "created_at"}]}.
    Dates are ISO 8601 in UTC. Author ids are strings, as Discord sends snowflakes, because
    they exceed the integers JavaScript reads exactly. Media bytes are never included.
    """
    document = {
        "format": MASQUE_FORMAT,
        "version": MASQUE_VERSION,
        "title": title,
        "persona_name": persona_name,
        "created_at": _utc(created_at).isoformat(),
        "summary": summary,
        "extra": dict(extra or {}),
        "turns": [_masque_turn(t) for t in turns],
    }
    return json.dumps(document, ensure_ascii=False, indent=2).encode()


def _masque_turn(turn: ChatTurn) -> dict[str, Any]:
    return {
        "position": turn.position,
        "author_kind": str(turn.author_kind),
        "author_name": turn.author_name,
        "author_id": None if turn.author_id is None else str(turn.author_id),
        "text": turn.text,
        "selected_swipe": turn.selected_swipe,
        "swipes": [{"index": s.index, "text": s.text} for s in sorted(turn.swipes, key=lambda s: s.index)],
        "attachments": [_attachment_meta(a) for a in turn.attachments],
        "created_at": _utc(turn.created_at).isoformat(),
    }


def _attachment_meta(item: dict[str, Any]) -> dict[str, Any]:
    # Plain values only: a file's bytes (should a caller keep them here) never travel.
    return {k: v for k, v in item.items() if v is None or isinstance(v, str | int | float | bool)}


# ---------------------------------------------------------------- SillyTavern import


def from_sillytavern_jsonl(blob: bytes, source: str) -> ImportedChat:
    """Read a SillyTavern chat file into turns for a new story; all or nothing.

    Raises ChatFileError (file, line, field) for a file over MAX_CHAT_FILE_BYTES, text that is
    not UTF-8, a line that is not a JSON object, a missing header, or a field of the wrong type.
    Skipped: ST's own UI notes (help, welcome, /comment). Kept: messages hidden with /hide
    (still part of the story; Masque's memory fits the prompt on its own).
    """
    if len(blob) > MAX_CHAT_FILE_BYTES:
        raise ChatFileError(source, None, None,
                            f"the file is {len(blob):,} bytes; the limit is {MAX_CHAT_FILE_BYTES:,}")
    rows = _json_lines(blob, source)
    if not rows or rows[0][0] != 1:
        raise ChatFileError(source, 1, None, "the first line must be the chat header (user_name, character_name)")
    _, header = rows[0]
    if "mes" in header or not ("user_name" in header or "character_name" in header):
        raise ChatFileError(source, 1, None,
                            "the first line is not a chat header (no user_name or character_name): "
                            "is this a SillyTavern chat file?")
    user_name = _optional_str(header, "user_name", source, 1) or ""
    character_name = _optional_str(header, "character_name", source, 1) or ""
    turns = [t for line, row in rows[1:] if (t := _turn(row, source, line, user_name, character_name))]
    return ImportedChat(user_name=user_name, character_name=character_name, turns=turns)


def _json_lines(blob: bytes, source: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line. Split on "\\n" only, as ST does:
    U+2028 and friends may sit raw inside JSON strings."""
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ChatFileError(source, blob[:e.start].count(b"\n") + 1, None, "the file is not UTF-8 text") from None
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue  # a trailing newline or blank line, which ST's reader drops too
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatFileError(source, number, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ChatFileError(source, number, None, f"expected a JSON object, got {_type_name(row)}")
        rows.append((number, row))
    return rows


def _turn(row: dict[str, Any], source: str, line: int, user_name: str,
          character_name: str) -> ImportedTurn | None:
    is_user = _optional_bool(row, "is_user", source, line)
    is_system = _optional_bool(row, "is_system", source, line)
    extra = row.get("extra") if isinstance(row.get("extra"), dict) else {}  # ST resets a bad extra to {}
    kind = extra.get("type") if isinstance(extra.get("type"), str) else ""
    if is_system and kind in ST_UI_MESSAGE_TYPES:
        return None
    if "mes" not in row:
        raise ChatFileError(source, line, "mes", "missing: every message needs its text")
    mes = _chub_text(row["mes"])
    if not isinstance(mes, str):
        raise ChatFileError(source, line, "mes", f"expected a string, got {_type_name(mes)}")
    name = _optional_str(row, "name", source, line)
    created_at = _send_date(row, source, line)
    if is_user:
        return ImportedTurn("user", name or user_name or "User", mes, [], 0, created_at)
    if kind:  # narrator, or an unhidden note of another type: not the character speaking
        return ImportedTurn("narrator", name or ST_NARRATOR_NAME, mes, [], 0, created_at)
    swipes, selected = _swipes(row, mes, source, line)
    return ImportedTurn("persona", name or character_name, mes, swipes, selected, created_at)


def _swipes(row: dict[str, Any], mes: str, source: str, line: int) -> tuple[list[str], int]:
    """The alternatives and the selected one, following ST: `mes` is what the chat shows."""
    raw, swipe_id = row.get("swipes"), row.get("swipe_id")
    if raw is not None and not isinstance(raw, list):
        raise ChatFileError(source, line, "swipes", f"expected a list of strings, got {_type_name(raw)}")
    swipes = [_chub_text(s) for s in raw or []]
    for i, swipe in enumerate(swipes):
        if not isinstance(swipe, str):
            raise ChatFileError(source, line, f"swipes[{i}]", f"expected a string, got {_type_name(swipe)}")
    if swipe_id is not None and not _is_integral(swipe_id):
        raise ChatFileError(source, line, "swipe_id", f"expected a whole number, got {swipe_id!r}")
    if swipe_id is None or not swipes:
        return [mes], 0  # ST ignores a swipes list without swipe_id (showSwipeButtons rebuilds it)
    index = int(swipe_id)
    if 0 <= index < len(swipes):
        swipes[index] = mes  # as ST's saveReply and message editor keep it
        return swipes, index
    # Out of range (a save made mid-generation, or a hand edit). ST shows `mes` anyway; select
    # the swipe holding it, else keep it as a new last swipe, so no alternative is lost.
    if mes in swipes:
        return swipes, swipes.index(mes)
    return [*swipes, mes], len(swipes)


def _chub_text(value: Any) -> Any:
    # Chub exports nest texts as {"message": ...}; ST's import flattens them (flattenChubChat).
    return value["message"] if isinstance(value, dict) and isinstance(value.get("message"), str) else value


def _send_date(row: dict[str, Any], source: str, line: int) -> datetime | None:
    value = row.get("send_date")
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
        raise ChatFileError(source, line, "send_date", f"expected a date string, got {_type_name(value)}")
    return parse_st_date(value)  # an unreadable date is no reason to refuse a story: None


def _optional_str(row: dict[str, Any], key: str, source: str, line: int) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise ChatFileError(source, line, key, f"expected a string, got {_type_name(value)}")
    return value


def _optional_bool(row: dict[str, Any], key: str, source: str, line: int) -> bool:
    value = row.get(key)
    if value is not None and not isinstance(value, bool):
        raise ChatFileError(source, line, key, f"expected true or false, got {_type_name(value)}")
    return bool(value)


def _is_integral(value: Any) -> bool:
    # JavaScript has one number type: ST may write 2 where Python would see 2.0.
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
