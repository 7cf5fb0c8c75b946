"""The card parser: Tavern cards V1/V2/V3 from JSON, PNG and CHARX; writers for each.

The single place that turns bytes into a `Card` (and back). Every failure is a
`CardError` that names the file, the field and the reason, so the CLI and the
`/persona import` command can show it as it is.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import lzma
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from bot.cards import png
from bot.cards.model import (
    LOREBOOK_SPEC,
    MAX_CARD_BYTES,
    MAX_LOREBOOK_ENTRIES,
    V1_FIELDS,
    V2_SPEC,
    V3_SPEC,
    Card,
    Lorebook,
)

CardFormat = Literal["json", "png", "charx"]
ZIP_SIGNATURE = b"PK\x03\x04"
# A binary card by its file's extension, and what to say when the bytes are neither that nor text.
_NOT_BINARY_CARD = {".png": "not a PNG file (it does not start with the PNG signature)",
                    ".charx": "not a CHARX file (it is not a zip archive)"}
# What `write_card` writes, by the output's extension (.v2.json is a JSON card in V2).
CARD_EXTENSIONS = (".png", ".charx", ".json", ".v2.json")
MAX_CHARX_UNPACKED = 4 * MAX_CARD_BYTES
_AVATAR_SIDE = 512
MAX_AVATAR_PIXELS = 8192 * 8192  # an avatar's declared size is checked before any pixel is decoded
_READ_SLICE = 1024 * 1024
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, zlib.error,
               lzma.LZMAError, EOFError, OSError, ValueError)
# What Pillow raises on a broken image (DecompressionBombError for a header declaring billions of pixels).
_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class CardError(ValueError):
    """A card or lorebook that cannot be read; says which file, which field, and why."""

    def __init__(self, source: str, field: str | None, reason: str):
        self.source, self.field, self.reason = source, field, reason
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {reason}")


@dataclass
class ParsedCard:
    card: Card
    avatar: bytes | None  # PNG bytes without card chunks, when the source had an image
    format: CardFormat
    source_spec: Literal["v1", "v2", "v3"]


# ---------------------------------------------------------------- reading


def read_file(path: str | Path, limit: int = MAX_CARD_BYTES) -> bytes:
    """Read a file, refusing it before reading when it is over `limit` bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise CardError(path.name, None, f"file is {_mib(size)}, over the {_mib(limit)} limit")
        return path.read_bytes()
    except OSError as exc:
        raise CardError(str(path), None, f"cannot read file: {exc.strerror or exc}") from exc


def load_card(path: str | Path) -> ParsedCard:
    """Parse the card in a file (JSON, PNG or CHARX, told apart by content)."""
    return parse_card(read_file(path), Path(path).name)


def parse_card(blob: bytes, source: str) -> ParsedCard:
    """Parse card bytes; `source` names the file in errors."""
    _check_size(blob, source)
    if blob.startswith(png.PNG_SIGNATURE):
        return _parse_png(blob, source)
    if blob.startswith(ZIP_SIGNATURE):
        return _parse_charx(blob, source)
    if (wrong := _NOT_BINARY_CARD.get(Path(source).suffix.lower())) and not _is_utf8(blob):
        raise CardError(source, None, wrong)  # not text either: a JSON card named .png is still read as JSON
    card, spec = card_from_json(_json(blob, source, None), source)
    return ParsedCard(card, None, "json", spec)


def card_from_json(obj: Any, source: str) -> tuple[Card, Literal["v1", "v2", "v3"]]:
    """Validate a decoded JSON object as a V1, V2 or V3 card."""
    if not isinstance(obj, dict):
        raise CardError(source, None, f"expected a JSON object, got {type(obj).__name__}")
    spec = obj.get("spec")
    if spec == LOREBOOK_SPEC or (spec is None and "entries" in obj and "name" not in obj):
        raise CardError(source, "spec", "this is a lorebook, not a character card")
    if spec in (V2_SPEC, V3_SPEC):
        if not isinstance(obj.get("data"), dict):
            raise CardError(source, "data", f"a {spec} card needs a `data` object")
        return _validate(Card, obj, source), ("v3" if spec == V3_SPEC else "v2")
    if spec is not None:
        raise CardError(source, "spec", f"unknown card spec {spec!r}")
    if "name" not in obj:
        raise CardError(source, "name", "missing (no `spec`, so this would be a V1 card)")
    # V1: the fields sit at the top level. They stay there as a mirror (that is
    # how SillyTavern writes cards too) and move into `data`.
    v1 = {**obj, "data": {k: obj[k] for k in V1_FIELDS if k in obj}}
    return _validate(Card, v1, source), "v1"


def _parse_png(blob: bytes, source: str) -> ParsedCard:
    try:
        chunks = png.read_chunks(blob)
        texts = png.text_chunks(chunks, MAX_CARD_BYTES)
    except png.PngError as exc:
        raise CardError(source, None, str(exc)) from exc
    keyword = next((k for k in ("ccv3", "chara") if k in texts), None)
    if keyword is None:
        raise CardError(source, None, "PNG has no character card inside (no `ccv3` or `chara` text chunk)")
    try:
        raw = base64.b64decode(texts[keyword].strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CardError(source, f"{keyword} chunk", f"invalid base64 ({exc})") from exc
    card, spec = card_from_json(_json(raw, source, f"{keyword} chunk"), source)
    avatar = png.encode(png.without_card_chunks(chunks))
    _check_image(avatar, source)
    return ParsedCard(card, avatar, "png", spec)


def _parse_charx(blob: bytes, source: str) -> ParsedCard:
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
            if unpacked > MAX_CHARX_UNPACKED:
                raise CardError(source, None, f"CHARX unpacks to {_mib(unpacked)}, over the "
                                              f"{_mib(MAX_CHARX_UNPACKED)} limit")
            if "card.json" not in archive.namelist():
                raise CardError(source, "card.json", "missing from the CHARX archive")
            card, spec = card_from_json(_json(_read_member(archive, "card.json"), source, "card.json"), source)
            avatar = _charx_icon(card, archive)
    except CardError:
        raise
    except _ZIP_ERRORS as exc:  # zipfile raises these for encrypted members, unknown methods, broken streams
        raise CardError(source, None, f"not a valid CHARX (zip) file: {exc}") from exc
    if avatar is not None:
        avatar = to_png(avatar, source)
    return ParsedCard(card, avatar, "charx", spec)


def _charx_icon(card: Card, archive: zipfile.ZipFile) -> bytes | None:
    """The main icon asset embedded in the archive, if the card names one."""
    icons = [a for a in card.data.assets or [] if a.type == "icon"]
    icons.sort(key=lambda a: a.name != "main")
    for asset in icons:
        if asset.uri.startswith("embeded://"):
            path = asset.uri.removeprefix("embeded://")
            if path in archive.namelist():
                return _read_member(archive, path)
    return None


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes, inflated a slice at a time. `ZipFile.read` inflates a member's whole stream
    before cutting it to the size its header declares, so a header that lies about a bomb would cost
    gigabytes; this way the cost stays within the declared size (checked against the limit)."""
    parts = []
    with archive.open(name) as member:
        while part := member.read(_READ_SLICE):
            parts.append(part)
    return b"".join(parts)


# ---------------------------------------------------------------- lorebooks


def load_lorebook(path: str | Path) -> Lorebook:
    return parse_lorebook(read_file(path), Path(path).name)


def parse_lorebook(blob: bytes, source: str) -> Lorebook:
    """A standalone lorebook: V3 `lorebook_v3`, a bare character_book, or SillyTavern world info."""
    _check_size(blob, source)
    obj = _json(blob, source, None)
    if not isinstance(obj, dict):
        raise CardError(source, None, f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("spec") == LOREBOOK_SPEC:
        if not isinstance(obj.get("data"), dict):
            raise CardError(source, "data", "a lorebook_v3 file needs a `data` object")
        return _validate(Lorebook, obj["data"], source, prefix="data")
    entries = obj.get("entries")
    if isinstance(entries, dict):
        try:
            return _validate(Lorebook, _from_world_info(obj, source), source)
        except CardError as exc:  # name the entry by its key in the file, not its place in our list
            raise CardError(source, _world_info_field(exc.field, list(entries)), exc.reason) from exc
    if isinstance(entries, list):
        return _validate(Lorebook, obj, source)
    raise CardError(source, "entries", "not a lorebook: expected `spec: lorebook_v3` or an `entries` list/object")


# SillyTavern world-info entry field -> (its place in a V3 entry, its type). "ext." fields go into the
# entry's `extensions` under the snake_case names SillyTavern itself writes when it embeds a book in a
# card (convertWorldInfoToCharacterBook), so one matcher reads both. Unknown fields go to `extensions` as they are.
_WORLD_INFO_KEYS: dict[str, tuple[str, str]] = {
    "uid": ("id", "id"), "key": ("keys", "strings"), "keysecondary": ("secondary_keys", "strings"),
    "content": ("content", "text"), "comment": ("comment", "text"), "constant": ("constant", "flag"),
    "selective": ("selective", "flag"), "order": ("insertion_order", "number"), "disable": ("enabled", "flag"),
    "position": ("ext.position", "number"), "depth": ("ext.depth", "number"), "role": ("ext.role", "number"),
    "selectiveLogic": ("ext.selectiveLogic", "number"), "displayIndex": ("ext.display_index", "number"),
    "excludeRecursion": ("ext.exclude_recursion", "flag"), "preventRecursion": ("ext.prevent_recursion", "flag"),
    "delayUntilRecursion": ("ext.delay_until_recursion", "level"), "probability": ("ext.probability", "number"),
    "useProbability": ("ext.useProbability", "flag"), "group": ("ext.group", "text"),
    "groupOverride": ("ext.group_override", "flag"), "groupWeight": ("ext.group_weight", "number"),
    "useGroupScoring": ("ext.use_group_scoring", "flag"), "scanDepth": ("ext.scan_depth", "number"),
    "caseSensitive": ("ext.case_sensitive", "flag"), "matchWholeWords": ("ext.match_whole_words", "flag"),
    "automationId": ("ext.automation_id", "text"), "vectorized": ("ext.vectorized", "flag"),
    "sticky": ("ext.sticky", "number"), "cooldown": ("ext.cooldown", "number"), "delay": ("ext.delay", "number"),
    "ignoreBudget": ("ext.ignore_budget", "flag"),
}
_WORLD_INFO_TYPES = {"id": "a number or a string", "strings": "a list of strings", "text": "a string",
                     "flag": "true or false", "number": "a number", "level": "true, false or a number"}


def _from_world_info(obj: dict[str, Any], source: str) -> dict[str, Any]:
    """SillyTavern world info -> lorebook dict, in the form SillyTavern gives a book it embeds in a card."""
    raw_entries = obj["entries"]
    if len(raw_entries) > MAX_LOREBOOK_ENTRIES:
        raise CardError(source, "entries", f"{len(raw_entries)} entries, over the limit of {MAX_LOREBOOK_ENTRIES}")
    entries = []
    for uid, raw in raw_entries.items():
        if not isinstance(raw, dict):
            raise CardError(source, f"entries.{uid}", f"expected an object, got {_json_type(raw)}")
        entries.append(_world_info_entry(raw, source, f"entries.{uid}"))
    rest = {k: v for k, v in obj.items() if k != "entries"}
    name = Path(source).name.split(".")[0]  # SillyTavern names a world by its file
    return {**({"name": name} if name else {}), **rest, "entries": entries}


def _world_info_entry(raw: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"extensions": {}}
    for key, value in raw.items():
        if key not in _WORLD_INFO_KEYS:
            entry["extensions"][key] = value
            continue
        target, kind = _WORLD_INFO_KEYS[key]
        if value is None:  # SillyTavern's "not set": keep it where it means "use the default"
            if target.startswith("ext."):
                entry["extensions"][target[4:]] = None
            continue
        value = _world_info_value(value, kind, source, f"{where}.{key}")
        if key == "disable":
            value = not value
        if target.startswith("ext."):
            entry["extensions"][target[4:]] = value
        else:
            entry[target] = value
    position = entry["extensions"].get("position")
    if position is not None:  # SillyTavern's own V3 mirror: anything but 0 is after the card
        entry["position"] = "before_char" if position == 0 else "after_char"
    return entry


def _world_info_value(value: Any, kind: str, source: str, field: str) -> Any:
    """The value if it has the field's type (numbers may come as numeric strings); else a CardError."""
    ok = {
        "id": isinstance(value, (int, str)) and not isinstance(value, bool),
        "strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "text": isinstance(value, str),
        "flag": isinstance(value, bool) or value in (0, 1) and isinstance(value, int),
        "number": _number(value) is not None,
        "level": isinstance(value, bool) or _number(value) is not None,
    }[kind]
    if not ok:
        raise CardError(source, field, f"expected {_WORLD_INFO_TYPES[kind]}, got {_json_type(value)} {value!r:.40}")
    if kind == "flag":
        return bool(value)
    if kind in ("number", "level") and not isinstance(value, bool):
        return _number(value)
    return value


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return value if math.isfinite(value) else None
        except OverflowError:  # an int past float's range (10**400): no field of a book means that
            return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return (int(number) if number.is_integer() else number) if math.isfinite(number) else None
    return None


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _world_info_field(field: str | None, uids: list[str]) -> str | None:
    """entries.3.content (our list index) -> entries.<the key of that entry in the file>.content."""
    parts = (field or "").split(".")
    if len(parts) > 1 and parts[0] == "entries" and parts[1].isdigit() and int(parts[1]) < len(uids):
        parts[1] = uids[int(parts[1])]
    return ".".join(parts) or None


# ---------------------------------------------------------------- writing


def to_json(card: Card, spec: Literal["v2", "v3"] = "v3") -> bytes:
    body = card.to_v3() if spec == "v3" else card.to_v2()
    return json.dumps(body, ensure_ascii=False, indent=2).encode("utf-8")


def to_png_card(card: Card, avatar: bytes | None = None) -> bytes:
    """A PNG card: the avatar (or a plain placeholder) with `chara` (V2) and `ccv3` (V3) chunks."""
    image = to_png(avatar, card.name) if avatar else placeholder_avatar(card.name)
    texts = {
        "chara": base64.b64encode(to_json(card, "v2")).decode("ascii"),
        "ccv3": base64.b64encode(to_json(card, "v3")).decode("ascii"),
    }
    return png.with_text(png.read_chunks(image), texts)


def to_charx(card: Card, avatar: bytes | None = None) -> bytes:
    """A CHARX archive: card.json plus the avatar as the main icon asset."""
    body = card.to_v3()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        if avatar:
            path = "assets/icon/images/main.png"
            archive.writestr(path, to_png(avatar, card.name))
            assets = [a for a in body["data"].get("assets", []) if a.get("type") != "icon"]
            assets.append({"type": "icon", "uri": f"embeded://{path}", "name": "main", "ext": "png"})
            body["data"]["assets"] = assets
        archive.writestr("card.json", json.dumps(body, ensure_ascii=False, indent=2))
    return buffer.getvalue()


def write_card(card: Card, path: str | Path, avatar: bytes | None = None) -> None:
    """Write by extension: .png, .charx, .json (V3) or .v2.json (V2); any other extension is a CardError."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".png"):
        blob = to_png_card(card, avatar)
    elif name.endswith(".charx"):
        blob = to_charx(card, avatar)
    elif name.endswith(".json"):
        blob = to_json(card, "v2" if name.endswith(".v2.json") else "v3")
    else:
        raise CardError(path.name, None, f"unknown card extension {path.suffix or '(none)'!r}: "
                                         f"write to a file ending {', '.join(CARD_EXTENSIONS)}")
    path.write_bytes(blob)


def to_png(image: bytes, source: str) -> bytes:
    """Any image Pillow reads, as PNG bytes (PNGs pass through untouched)."""
    if image.startswith(png.PNG_SIGNATURE):
        return image
    try:
        with Image.open(io.BytesIO(image)) as img:
            _check_pixels(img, source, "avatar")
            out = io.BytesIO()
            img.convert("RGBA").save(out, "PNG")
            return out.getvalue()
    except _IMAGE_ERRORS as exc:
        raise CardError(source, "avatar", f"not a readable image ({exc})") from exc


def placeholder_avatar(name: str) -> bytes:
    """A plain square in a colour derived from the name, for cards without an image."""
    seed = sum(name.encode("utf-8")) * 2654435761 & 0xFFFFFF
    colour = (seed >> 16 & 0xFF, seed >> 8 & 0xFF, seed & 0xFF)
    out = io.BytesIO()
    Image.new("RGB", (_AVATAR_SIDE, _AVATAR_SIDE), colour).save(out, "PNG")
    return out.getvalue()


# ---------------------------------------------------------------- helpers


def _check_size(blob: bytes, source: str) -> None:
    if len(blob) > MAX_CARD_BYTES:
        raise CardError(source, None, f"file is {_mib(len(blob))}, over the {_mib(MAX_CARD_BYTES)} limit")
    if not blob.strip():
        raise CardError(source, None, "file is empty")


def _check_image(image: bytes, source: str) -> None:
    try:
        with Image.open(io.BytesIO(image)) as img:
            _check_pixels(img, source, "image")
            img.verify()
    except _IMAGE_ERRORS as exc:
        raise CardError(source, "image", f"the PNG image data is broken ({exc})") from exc


def _check_pixels(img: Image.Image, source: str, field: str) -> None:
    if img.width * img.height > MAX_AVATAR_PIXELS:
        raise CardError(source, field, f"the image is {img.width}x{img.height} pixels, over the limit of "
                                       f"{MAX_AVATAR_PIXELS} pixels")


def _is_utf8(blob: bytes) -> bool:
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _json(raw: bytes, source: str, field: str | None) -> Any:
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise CardError(source, field, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise CardError(source, field, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc


def _validate(model: type[Card] | type[Lorebook], obj: dict[str, Any], source: str, prefix: str = ""):
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
        more = exc.error_count() - 1
        reason = first["msg"] + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")
        raise CardError(source, field or None, reason) from exc


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"
