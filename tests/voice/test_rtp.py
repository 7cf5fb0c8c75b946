"""bot/voice/rtp.py against packets built here the way Discord builds them (real PyNaCl)."""

from __future__ import annotations

import os
import struct

import pytest
from nacl.bindings import crypto_aead_aes256gcm_encrypt, crypto_aead_xchacha20poly1305_ietf_encrypt

from bot.voice import rtp
from bot.voice.rtp import RtpError, classify, decrypt, parse_header

KEY = bytes(range(32))
MODE = "aead_xchacha20_poly1305_rtpsize"


def build_packet(payload: bytes, *, key: bytes = KEY, seq: int = 1, ts: int = 960, ssrc: int = 1234,
                 csrcs: tuple[int, ...] = (), ext_words: bytes | None = None, padding: int = 0,
                 counter: int = 7, marker: bool = False, payload_type: int = 0x78) -> bytes:
    """An rtpsize XChaCha20-Poly1305 RTP packet: AAD = header + CSRCs + extension preamble."""
    b0 = 0x80 | len(csrcs) | (0x10 if ext_words is not None else 0) | (0x20 if padding else 0)
    b1 = payload_type | (0x80 if marker else 0)
    aad = struct.pack(">BBHII", b0, b1, seq, ts, ssrc) + b"".join(struct.pack(">I", c) for c in csrcs)
    plain = payload
    if ext_words is not None:
        assert len(ext_words) % 4 == 0
        aad += struct.pack(">HH", 0xBEDE, len(ext_words) // 4)
        plain = ext_words + plain
    if padding:
        plain += bytes(padding - 1) + bytes([padding])
    tail = struct.pack(">I", counter)
    nonce = tail + bytes(20)
    return aad + crypto_aead_xchacha20poly1305_ietf_encrypt(plain, aad, nonce, key) + tail


OPUS = bytes([0xFC]) + os.urandom(60)


def test_parse_header_plain():
    h = parse_header(build_packet(OPUS, seq=65535, ts=123456, ssrc=0xDEADBEEF, marker=True))
    assert (h.version, h.padding, h.extension, h.csrc_count) == (2, False, False, 0)
    assert (h.marker, h.payload_type, h.sequence, h.timestamp, h.ssrc) == (True, 0x78, 65535, 123456, 0xDEADBEEF)
    assert h.size == 12


def test_parse_header_csrcs_and_extension():
    h = parse_header(build_packet(OPUS, csrcs=(1, 2, 3), ext_words=bytes(8), padding=4))
    assert h.csrc_count == 3 and h.size == 24
    assert h.extension and h.padding


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"ext_words": b"\x10\x01\x02\x03" + bytes(4)},
        {"csrcs": (99, 100)},
        {"padding": 1},
        {"padding": 7},
        {"ext_words": bytes(12), "csrcs": (5,), "padding": 3},
    ],
    ids=["plain", "extension", "csrc", "padding1", "padding7", "all"],
)
def test_decrypt_round_trip(kwargs):
    header, frame = decrypt(build_packet(OPUS, seq=42, **kwargs), MODE, KEY)
    assert frame == OPUS
    assert header.sequence == 42


def test_decrypt_empty_extension_body():
    _, frame = decrypt(build_packet(OPUS, ext_words=b""), MODE, KEY)
    assert frame == OPUS


def test_wrong_key_is_rtp_error():
    with pytest.raises(RtpError):
        decrypt(build_packet(OPUS), MODE, bytes(32))


def test_tampered_header_fails_authentication():
    packet = bytearray(build_packet(OPUS, ext_words=bytes(4)))
    packet[4] ^= 1  # timestamp is authenticated
    with pytest.raises(RtpError):
        decrypt(bytes(packet), MODE, KEY)


def test_bad_padding_is_rtp_error():
    # P bit set but the last plaintext byte claims more padding than there is
    b0 = 0xA0
    aad = struct.pack(">BBHII", b0, 0x78, 1, 0, 5)
    tail = struct.pack(">I", 1)
    for plain in (b"\x01\x02\xff", b"\x01\x02\x00"):
        packet = aad + crypto_aead_xchacha20poly1305_ietf_encrypt(plain, aad, tail + bytes(20), KEY) + tail
        with pytest.raises(RtpError, match="padding"):
            decrypt(packet, MODE, KEY)


def test_unknown_mode_is_rtp_error():
    with pytest.raises(RtpError, match="unsupported"):
        decrypt(build_packet(OPUS), "xsalsa20_poly1305", KEY)


def test_aes_gcm_rtpsize_decrypts_where_the_cpu_has_it():
    if not rtp.aes_gcm_available():
        pytest.skip("libsodium has no AES-256-GCM on this CPU (no AES instructions)")
    header = struct.pack(">BBHII", 0x90, 0x78, 5, 960, 1234) + struct.pack(">HH", 0xBEDE, 1)
    tail = struct.pack(">I", 9)
    body = crypto_aead_aes256gcm_encrypt(b"\x10\x7f\x00\x00" + OPUS, header, tail + bytes(8), KEY)
    parsed, frame = decrypt(header + body + tail, "aead_aes256_gcm_rtpsize", KEY)
    assert frame == OPUS and parsed.sequence == 5


def test_aes_gcm_without_support_is_unsupported():
    if rtp.aes_gcm_available():
        pytest.skip("this PyNaCl/CPU has AES-GCM")
    with pytest.raises(RtpError, match="unsupported"):
        decrypt(build_packet(OPUS), "aead_aes256_gcm_rtpsize", KEY)


@pytest.mark.parametrize("cut", [0, 5, 11, 12 + 4 + 16 - 1])
def test_truncated_is_rtp_error(cut):
    with pytest.raises(RtpError):
        decrypt(build_packet(OPUS)[:cut], MODE, KEY)


def test_truncated_csrc_list_and_extension():
    with pytest.raises(RtpError):
        parse_header(build_packet(OPUS, csrcs=(1, 2, 3))[:20])
    packet = build_packet(b"", ext_words=bytes(4))
    with pytest.raises(RtpError):
        decrypt(packet[:14], MODE, KEY)


def test_not_version_2():
    packet = bytearray(build_packet(OPUS))
    packet[0] = 0x40
    with pytest.raises(RtpError):
        parse_header(bytes(packet))


def test_classify():
    assert classify(build_packet(OPUS)) == "audio"
    assert classify(build_packet(OPUS, marker=True)) == "audio"
    # RTCP receiver/sender reports: second byte 200-204
    for pt in (200, 201, 202, 203, 204):
        assert classify(bytes([0x81, pt]) + bytes(30)) == "rtcp"
    # video (payload type 0x65 = VP8 / H264 etc.)
    assert classify(build_packet(OPUS, payload_type=0x65)) == "other"
    # IP discovery reply: type 0x0002, length 70, 74 bytes
    reply = bytearray(74)
    struct.pack_into(">HHI", reply, 0, 2, 70, 1234)
    reply[8:17] = b"127.0.0.1"
    struct.pack_into(">H", reply, 72, 50000)
    assert classify(bytes(reply)) == "ip_discovery"
    assert classify(b"") == "other"
    assert classify(b"\x80") == "other"
    assert classify(b"hello world, not rtp") == "other"
    assert classify(bytes([0x80, 0x78])) == "other"  # too short for a header
