"""Fuzzing what the bot reads from outside: SillyTavern chat files, RTP datagrams from the voice
gateway, attachment content types. Each answers with its own error type, never another one."""

from __future__ import annotations

import json
from types import SimpleNamespace

from hypothesis import example, given
from hypothesis import strategies as st

from bot.cogs.chat import attachment_kind
from bot.story.chatfile import ChatFileError, from_sillytavern_jsonl
from bot.voice import rtp
from tests.fuzz import fuzz

ROW_KEYS = ["user_name", "character_name", "create_date", "chat_metadata", "name", "is_user", "is_system", "mes",
            "send_date", "swipes", "swipe_id", "swipe_info", "extra", "force_avatar", "gen_started", "title"]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["2024-01-05T10:00:00.000Z", "January 5, 2024 10:00am", "2024-1-5 @10h 00m 00s 000ms", "x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(ROW_KEYS) | st.text(max_size=4),
                                                               inner, max_size=3),
    max_leaves=10,
)
ROW = st.dictionaries(st.sampled_from(ROW_KEYS), VALUES, max_size=8)
HEADER = st.fixed_dictionaries({"user_name": VALUES | st.just("You"), "character_name": VALUES | st.just("Wren")})


def read(blob: bytes) -> None:
    try:
        chat = from_sillytavern_jsonl(blob, "chat.jsonl")
    except ChatFileError as exc:
        assert str(exc).strip()
    else:
        assert all(isinstance(turn.text, str) and 0 <= turn.selected_swipe <= max(len(turn.swipes) - 1, 0)
                   for turn in chat.turns)


@fuzz(150)
@given(HEADER | ROW, st.lists(ROW, max_size=5))
@example({"user_name": "You", "character_name": "Wren"}, [{"mes": "hi", "swipes": ["a"], "swipe_id": 10**30}])
@example({"user_name": "You", "character_name": "Wren"}, [{"mes": "hi", "send_date": 1e300}])
@example({"user_name": "You", "character_name": "Wren"}, [{"mes": "hi", "send_date": -(2**70)}])
def test_chat_jsonl(header: dict, rows: list[dict]) -> None:
    read("\n".join(json.dumps(r) for r in [header, *rows]).encode())


@fuzz(80)
@given(st.binary(max_size=300))
@example(b"\xef\xbb\xbf{}")
@example(b"{}\n[]\n")
def test_chat_jsonl_random_bytes(blob: bytes) -> None:
    read(blob)


@fuzz(200)
@given(st.binary(max_size=120))
@example(b"\x90\x78" + b"\0" * 10)  # extension bit, too short for its preamble
@example(b"\xa0\x78" + b"\0" * 14)  # padding bit
def test_rtp_datagrams(datagram: bytes) -> None:
    assert rtp.classify(datagram) in ("audio", "rtcp", "ip_discovery", "other")
    try:
        header = rtp.parse_header(datagram)
    except rtp.RtpError as exc:
        assert str(exc)
    else:
        assert header.size <= len(datagram)


@fuzz(150)
@given(st.binary(max_size=120), st.sampled_from([rtp.XCHACHA, rtp.AES_GCM, "xsalsa20_poly1305", ""]),
       st.binary(min_size=32, max_size=32) | st.binary(max_size=40), st.integers(0, 255), st.booleans())
def test_rtp_decrypt(tail: bytes, mode: str, key: bytes, first: int, extension: bool) -> None:
    head = bytes([0x80 | (0x10 if extension else 0) | (first & 0x2F), 0x78]) + b"\0" * 10
    try:
        header, payload = rtp.decrypt(head + tail, mode, key)
    except rtp.RtpError as exc:
        assert str(exc)
    else:
        assert isinstance(payload, bytes)


@fuzz(60)
@given(st.none() | st.text(max_size=30) | st.sampled_from(["audio/ogg; codecs=opus", "image/png", "IMAGE/PNG", ";"]),
       st.booleans(), st.text(max_size=12))
def test_attachment_kind(content_type: str | None, voice: bool, filename: str) -> None:
    attachment = SimpleNamespace(content_type=content_type, is_voice_message=lambda: voice, filename=filename,
                                 size=10, url="https://cdn.invalid/x", waveform=None, duration=None)
    assert attachment_kind(attachment) in ("image", "audio", "other")
