"""Fuzzing the card parser: whatever the bytes, a parsed card or a CardError with a message."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import tracemalloc
import zipfile
import zlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from bot.cards import MAX_CARD_BYTES, Card, CardError, ParsedCard, parse_card, parse_lorebook, png
from tests.fuzz import fuzz

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # duplicate members are a case here

NAMES = st.sampled_from(["card.png", "card.json", "card.charx", "card", "CARD.PNG", "x.v2.json"])
KEYS = ["spec", "spec_version", "data", "name", "description", "personality", "scenario", "first_mes",
        "mes_example", "alternate_greetings", "character_book", "tags", "extensions", "assets", "nickname",
        "creator_notes_multilingual", "source", "creation_date", "group_only_greetings", "entries", "keys",
        "content", "uri", "type", "use_regex", "insertion_order", "enabled", "id"]
SPECS = st.sampled_from(["chara_card_v2", "chara_card_v3", "lorebook_v3", "", None, 3, "chara_card_v1"])
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.sampled_from(["embeded://icon.png", "ccdefault:", "main", "icon"]))
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5),
                                                               inner, max_size=5),
    max_leaves=25,
)


def card_like() -> st.SearchStrategy[dict]:
    """Objects shaped like Tavern V1/V2/V3 cards, with a wrong type wherever hypothesis likes."""
    data = st.dictionaries(st.sampled_from(KEYS), JSONISH, max_size=10)
    return st.fixed_dictionaries({"spec": SPECS, "data": data | JSONISH},
                                 optional={"name": JSONISH, "spec_version": JSONISH, "entries": JSONISH})


def check(blob: bytes, name: str) -> ParsedCard | None:
    """The property every fuzz test here asserts."""
    try:
        parsed = parse_card(blob, name)
    except CardError as exc:
        assert str(exc).strip() and exc.reason
        return None
    assert isinstance(parsed.card, Card) and parsed.card.name.strip()
    return parsed


def tiny_png(width: int = 2, height: int = 2) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


TINY = png.read_chunks(tiny_png())
GOOD = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {"name": "Wren"}}


def png_with(chunks: list[png.Chunk]) -> bytes:
    body = [c for c in TINY if c.type != b"IEND"]
    return png.encode([*body, *chunks, png.Chunk(b"IEND", b"")])


def text_chunk(keyword: bytes, value: bytes) -> png.Chunk:
    return png.Chunk(b"tEXt", keyword + b"\0" + value)


@fuzz(200)
@given(st.binary(max_size=2048), NAMES)
@example(b"\x89PNG\r\n\x1a\n", "card.png")
@example(b"PK\x03\x04", "card.charx")
@example(b"\xff\xfe{}", "card.png")
def test_random_bytes(blob: bytes, name: str) -> None:
    check(blob, name)


@fuzz(60)
@given(st.binary(max_size=256), st.sampled_from([png.PNG_SIGNATURE, b"PK\x03\x04", b"{", b"\xef\xbb\xbf"]))
def test_random_bytes_after_a_signature(tail: bytes, head: bytes) -> None:
    check(head + tail, "card.png")


@fuzz(150)
@given(
    keyword=st.sampled_from([b"chara", b"ccv3"]),
    payload=st.one_of(
        card_like().map(lambda o: base64.b64encode(json.dumps(o).encode())),
        JSONISH.map(lambda o: base64.b64encode(json.dumps(o).encode())),
        st.binary(max_size=300).map(base64.b64encode),
        st.binary(max_size=300),
        st.text(max_size=200).map(lambda t: t.encode("latin-1", "replace")),
    ),
    itxt=st.booleans(),
    compressed=st.booleans(),
)
@example(keyword=b"ccv3", payload=b"not base64!", itxt=False, compressed=False)
@example(keyword=b"chara", payload=b"\xff\xfe", itxt=True, compressed=False)  # iTXt text that is not UTF-8
@example(keyword=b"chara", payload=b"junk", itxt=True, compressed=True)  # iTXt 'compressed' with broken zlib
def test_png_text_chunks(keyword: bytes, payload: bytes, itxt: bool, compressed: bool) -> None:
    if itxt:
        body = zlib.compress(payload) if compressed and len(payload) % 2 else payload
        chunk = png.Chunk(b"iTXt", keyword + b"\0" + bytes([compressed, 0]) + b"\0\0" + body)
    else:
        chunk = text_chunk(keyword, payload)
    check(png_with([chunk]), "card.png")


@fuzz(60)
@given(st.lists(st.tuples(st.sampled_from([b"tEXt", b"iTXt", b"zTXt", b"IHDR", b"IDAT", b"abcd"]),
                          st.binary(max_size=64)), max_size=5))
@example([(b"iTXt", b"ccv3\0")])  # an iTXt chunk that ends after its keyword
@example([(b"iTXt", b"ccv3\0\1")])
def test_png_random_chunks(chunks: list[tuple[bytes, bytes]]) -> None:
    ccv3 = text_chunk(b"ccv3", base64.b64encode(json.dumps(GOOD).encode()))
    check(png_with([*(png.Chunk(t, d) for t, d in chunks), ccv3]), "card.png")


@fuzz(40)
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
@example(100_000, 100_000)  # declared in a 2x2 PNG's header: the parser must not allocate it
def test_png_huge_declared_dimensions(width: int, height: int) -> None:
    ihdr = struct.pack(">II", width, height) + TINY[0].data[8:]
    chunks = [png.Chunk(b"IHDR", ihdr), *TINY[1:-1],
              text_chunk(b"ccv3", base64.b64encode(json.dumps(GOOD).encode())), png.Chunk(b"IEND", b"")]
    start = time.perf_counter()
    check(png.encode(chunks), "card.png")
    assert time.perf_counter() - start < 2


def test_png_huge_text_chunk_is_refused_by_size() -> None:
    blob = png_with([text_chunk(b"ccv3", b"A" * (MAX_CARD_BYTES + 1))])
    try:
        parse_card(blob, "big.png")
    except CardError as exc:
        assert "limit" in str(exc)
    else:
        raise AssertionError("a card over the size limit was read")


@fuzz(200)
@given(card_like())
@example({"spec": "chara_card_v3", "data": {"name": "x", "assets": [{"type": "icon", "uri": 3}]}})
@example({"spec": "chara_card_v2", "data": {"name": "x", "character_book": {"entries": {"a": 1}}}})
def test_json_cards(obj: dict) -> None:
    check(json.dumps(obj).encode(), "card.json")


@fuzz(80)
@given(JSONISH)
def test_any_json(obj: object) -> None:
    check(json.dumps(obj).encode(), "card.json")
    try:
        parse_lorebook(json.dumps(obj).encode(), "book.json")
    except CardError as exc:
        assert str(exc).strip()


# ---------------------------------------------------------------- CHARX

MEMBER_NAMES = st.one_of(
    st.sampled_from(["card.json", "../card.json", "/card.json", "../../etc/passwd", "assets/icon/images/main.png",
                     "C:\\card.json", "card.json/", "./card.json", "assets/../card.json", "icon.png"]),
    st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
)


def zip_of(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def card_with_icon(uri: str) -> bytes:
    body = {**GOOD, "data": {"name": "Wren", "assets": [{"type": "icon", "uri": uri, "name": "main", "ext": "png"}]}}
    return json.dumps(body).encode()


@fuzz(120)
@given(
    members=st.lists(st.tuples(MEMBER_NAMES, st.one_of(
        st.binary(max_size=200),
        card_like().map(lambda o: json.dumps(o).encode()),
        MEMBER_NAMES.map(lambda p: card_with_icon(f"embeded://{p}")),
        st.just(tiny_png()),
    )), max_size=6),
    method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
)
@example(members=[("card.json", b"{not json")], method=zipfile.ZIP_DEFLATED)
@example(members=[("card.json", card_with_icon("embeded://icon.png")), ("icon.png", b"GIF89a junk")],
         method=zipfile.ZIP_STORED)
@example(members=[("card.json", json.dumps(GOOD).encode()), ("card.json", b"[]")], method=zipfile.ZIP_STORED)
def test_charx_archives(members: list[tuple[str, bytes]], method: int) -> None:
    check(zip_of(members, method), "card.charx")


@fuzz(60)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 400))
@example(b"@", 269)  # zip version 6.4: NotImplementedError
@example(b" ", 271)  # "compressed patched data": NotImplementedError
@example(b"\x01", 273)  # unknown compression method: NotImplementedError
@example(b"\x01", 271)  # encrypted member: RuntimeError
@example(b"\x00", 39)  # broken deflate stream: zlib.error
def test_charx_corrupted(noise: bytes, at: int) -> None:
    """A good CHARX with bytes overwritten somewhere: bad CRCs, bad headers, bad deflate streams."""
    blob = bytearray(zip_of([("card.json", card_with_icon("embeded://icon.png")), ("icon.png", tiny_png())]))
    at %= len(blob)
    blob[at:at + len(noise)] = noise
    check(bytes(blob), "card.charx")


def _patch_sizes(blob: bytes, size: int) -> bytes:
    """Rewrite every declared uncompressed size (local headers and central directory) to `size`."""
    out = bytearray(blob)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = out.find(signature)
        while at >= 0:
            out[at + offset:at + offset + 4] = struct.pack("<I", size)
            at = out.find(signature, at + 4)
    return bytes(out)


@fuzz(30)
@given(st.integers(0, 2**32 - 1))
@example(2**32 - 1)
@example(0)
def test_charx_declared_sizes_lie(size: int) -> None:
    check(_patch_sizes(zip_of([("card.json", json.dumps(GOOD).encode())]), size), "card.charx")


def _measure(blob: bytes) -> tuple[float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        check(blob, "bomb.charx")
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return seconds, peak


def test_charx_zip_bomb_refused_before_inflating() -> None:
    """A member that inflates to 128 MiB (a tiny archive): refused by its declared size, not inflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("card.json", json.dumps(GOOD))
        with archive.open("pad.bin", "w", force_zip64=True) as member:
            chunk = b"\0" * (1 << 20)
            for _ in range(128):
                member.write(chunk)
    seconds, peak = _measure(buffer.getvalue())
    assert seconds < 2 and peak < 64 * 1024 * 1024


def test_charx_zip_bomb_with_a_lying_header() -> None:
    """A bomb declaring a tiny size: inflating stops near the declared size (a CRC error), never 128 MiB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("card.json", "w", force_zip64=False) as member:
            member.write(json.dumps(GOOD).encode() + b" " * (128 << 20))
    seconds, peak = _measure(_patch_sizes(buffer.getvalue(), 64))
    assert seconds < 2 and peak < 64 * 1024 * 1024


def test_charx_many_members() -> None:
    members = [("card.json", json.dumps(GOOD).encode())] + [(f"m/{i}", b"") for i in range(20_000)]
    seconds, peak = _measure(zip_of(members, zipfile.ZIP_STORED))
    assert seconds < 5


def test_png_compressed_text_bomb_is_stopped_at_the_limit() -> None:
    """An iTXt chunk of 64 KiB that would inflate to 1 GiB: stopped at the card size limit."""
    inflater = zlib.compressobj(9)
    bomb = b"".join(inflater.compress(b"A" * (1 << 20)) for _ in range(1024)) + inflater.flush()
    blob = png_with([png.Chunk(b"iTXt", b"ccv3\0\1\0\0\0" + bomb)])
    seconds, peak = _measure(blob)
    assert seconds < 3 and peak < 2 * MAX_CARD_BYTES + 16 * 1024 * 1024
