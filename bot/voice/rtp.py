"""RTP packets of a Discord voice connection: classify, parse and transport-decrypt.

Pure packet code (no discord imports); it runs for every 20 ms packet of every
speaker on the socket reader thread, so it sticks to ``struct.unpack_from`` and
slices.

Discord's ``*_rtpsize`` modes authenticate the fixed RTP header, the CSRC list and
the 4-byte extension preamble (profile + length) as additional data; the
extension *body* is encrypted along with the payload. The nonce is a 32-bit
counter appended to the packet, zero-padded to the cipher's nonce size. After
decryption the extension body (``length * 4`` bytes) is dropped from the front of
the plaintext and, if the P bit is set, the RTP padding from its end (the last
byte is the padding's length, itself included).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nacl import bindings as _nacl
from nacl.exceptions import CryptoError as _CryptoError

__all__ = [
    "AES_GCM",
    "OPUS_PAYLOAD_TYPE",
    "XCHACHA",
    "RtpError",
    "RtpHeader",
    "aes_gcm_available",
    "classify",
    "decrypt",
    "parse_header",
]

OPUS_PAYLOAD_TYPE = 0x78
XCHACHA = "aead_xchacha20_poly1305_rtpsize"
AES_GCM = "aead_aes256_gcm_rtpsize"

_TAG = 16  # Poly1305 and GCM tags are both 16 bytes
_NONCE_TAIL = 4
_XCHACHA_PAD = bytes(20)  # 4-byte counter + 20 zero bytes = 24-byte nonce
_GCM_PAD = bytes(8)  # 4-byte counter + 8 zero bytes = 12-byte nonce

_HEADER = struct.Struct(">BBHII")
_U16 = struct.Struct(">H")
_xchacha_decrypt = _nacl.crypto_aead_xchacha20poly1305_ietf_decrypt


class RtpError(ValueError):
    """A datagram that is not a usable RTP packet (short, malformed, or failing authentication)."""


@dataclass(frozen=True, slots=True)
class RtpHeader:
    version: int
    padding: bool
    extension: bool
    csrc_count: int
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int

    @property
    def size(self) -> int:
        """Bytes of fixed header plus CSRC list (the extension preamble not included)."""
        return 12 + 4 * self.csrc_count


def classify(datagram: bytes) -> str:
    """``"audio"``, ``"rtcp"``, ``"ip_discovery"`` or ``"other"`` (video, junk)."""
    n = len(datagram)
    if n < 2:
        return "other"
    second = datagram[1]
    if n == 74 and datagram[0] == 0 and second == 0x02:
        return "ip_discovery"
    if datagram[0] >> 6 != 2:
        return "other"
    if 200 <= second <= 204:
        return "rtcp"
    if n >= 12 and (second & 0x7F) == OPUS_PAYLOAD_TYPE:
        return "audio"
    return "other"


def parse_header(datagram: bytes) -> RtpHeader:
    """The RTP header of ``datagram``; RtpError when too short or not RTP version 2."""
    if len(datagram) < 12:
        raise RtpError(f"datagram too short for RTP ({len(datagram)} bytes)")
    b0, b1, seq, ts, ssrc = _HEADER.unpack_from(datagram, 0)
    version = b0 >> 6
    if version != 2:
        raise RtpError(f"not RTP version 2 (version {version})")
    cc = b0 & 0x0F
    if len(datagram) < 12 + 4 * cc:
        raise RtpError("datagram too short for its CSRC list")
    return RtpHeader(version, bool(b0 & 0x20), bool(b0 & 0x10), cc, bool(b1 & 0x80), b1 & 0x7F, seq, ts, ssrc)


_aes_ok: bool | None = None


def aes_gcm_available() -> bool:
    """Whether libsodium can run AES-256-GCM here (it needs the CPU's AES instructions).

    PyNaCl has no "is available" call; a round trip on a test block tells.
    """
    global _aes_ok
    if _aes_ok is None:
        try:
            key, nonce = bytes(32), bytes(12)
            sealed = _nacl.crypto_aead_aes256gcm_encrypt(b"probe", b"", nonce, key)
            _aes_ok = _nacl.crypto_aead_aes256gcm_decrypt(sealed, b"", nonce, key) == b"probe"
        except Exception:  # noqa: BLE001 - missing binding, or libsodium refusing on this CPU
            _aes_ok = False
    return _aes_ok


def decrypt(datagram: bytes, mode: str, secret_key: bytes) -> tuple[RtpHeader, bytes]:
    """Transport-decrypt an rtpsize RTP packet; returns its header and the Opus frame."""
    header = parse_header(datagram)
    aad_end = header.size
    ext_words = 0
    if header.extension:
        if len(datagram) < aad_end + 4:
            raise RtpError("datagram too short for its extension preamble")
        ext_words = _U16.unpack_from(datagram, aad_end + 2)[0]
        aad_end += 4
    n = len(datagram)
    if n < aad_end + _TAG + _NONCE_TAIL:
        raise RtpError("datagram too short for an encrypted payload")
    view = memoryview(datagram)
    aad = bytes(view[:aad_end])
    ciphertext = bytes(view[aad_end : n - _NONCE_TAIL])
    tail = bytes(view[n - _NONCE_TAIL :])
    try:
        if mode == XCHACHA:
            plain = _xchacha_decrypt(ciphertext, aad, tail + _XCHACHA_PAD, secret_key)
        elif mode == AES_GCM and aes_gcm_available():
            plain = _nacl.crypto_aead_aes256gcm_decrypt(ciphertext, aad, tail + _GCM_PAD, secret_key)
        else:
            raise RtpError(f"unsupported mode {mode!r}")
    except _CryptoError as exc:
        raise RtpError("transport decryption failed (wrong key or corrupt packet)") from exc
    except (TypeError, ValueError) as exc:
        if isinstance(exc, RtpError):
            raise
        raise RtpError(f"transport decryption failed: {exc}") from exc

    start = ext_words * 4
    end = len(plain)
    if header.padding:
        if end == 0:
            raise RtpError("padding bit set on an empty payload")
        pad = plain[-1]
        if pad == 0 or pad > end - start:
            raise RtpError(f"bad RTP padding length {pad}")
        end -= pad
    if start > end:
        raise RtpError("extension longer than the payload")
    if start == 0 and end == len(plain):
        return header, plain
    return header, plain[start:end]
